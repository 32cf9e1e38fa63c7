"""The one error class of fitting/: its message is a single line for the user (the CLI prints it, exit 2)."""

from __future__ import annotations


class FitInputError(Exception):
    """Bad input to a fit or a law: names the problem (column, value, law) and what would fix it."""
