"""The one exception type the CLI turns into a one-line message and exit code 2."""


class FastByolError(RuntimeError):
    """A user-facing error: bad config, bad data, non-finite loss. No traceback is shown."""
