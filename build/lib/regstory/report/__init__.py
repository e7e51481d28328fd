"""Reports: run folders -> pandas DataFrames -> tables and figures (``regstory-report``)."""
from regstory.report.load import find_runs, load_epochs, load_rounds, load_runs

__all__ = ["find_runs", "load_epochs", "load_rounds", "load_runs"]
