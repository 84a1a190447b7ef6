"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class HnsegError(Exception):
    """A user-facing problem: bad input, missing file, refused overwrite.

    The message must be one line naming the file or value and what to do about it.
    """
