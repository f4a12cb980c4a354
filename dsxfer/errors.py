"""One exception type for every user-facing error.

The CLI prints a `DsxferError` as one line (what is wrong and what to do) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class DsxferError(Exception):
    """An error caused by the user's input: a config, a file, a record, a flag."""


class ConfigError(DsxferError):
    """A configuration value or key that cannot work."""


class DataError(DsxferError):
    """A data file or record that cannot be read: names the file, the record and the field."""
