"""User-facing errors."""


class UsageError(Exception):
    """A user-facing input error; the CLI prints its one-line message and exits 2."""
