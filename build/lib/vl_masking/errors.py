"""The two kinds of refusal the command line turns into one line on stderr and exit code 2.

Kept free of torch and transformers so that bad input is reported before either is imported.
"""


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


class UnsupportedModelError(Exception):
    """The model has an attention or layer feature that the engine does not reproduce."""


class OutputError(UsageError):
    """The result files could not be written (disk full, a directory in the way): one line, no partial set."""
