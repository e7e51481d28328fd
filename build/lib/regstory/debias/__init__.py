"""Debiasing methods (the ``debias`` config group): each one a :class:`regstory.debias.base.DebiasPlugin`."""
