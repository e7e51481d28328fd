"""regstory: an experiment runner for regularization in deep networks (pruning and debiasing)."""

__version__ = "0.1.0"
