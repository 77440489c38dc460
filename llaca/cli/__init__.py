"""`python -m llaca ...`: the command line (`main`), with the corrections commands in `corrections`."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
