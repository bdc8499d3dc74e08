"""One exception type for every input a user can get wrong.

The CLI prints `BudgetReasonerError` as a single line (no traceback) and exits with code 2; everything
else is a bug and keeps its traceback.
"""


class BudgetReasonerError(Exception):
    """A problem with the user's input: a preset, a data file, an output folder, an option."""
