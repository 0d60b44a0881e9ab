"""The project's one error type for bad input.

Anything a user can get wrong (a flag, a path, a config key, a checkpoint)
raises `GuidedError` with a one-line message that says what to fix. The
command-line programs catch it, print `error: <message>` and exit with 2;
library callers get an ordinary exception.
"""


class GuidedError(Exception):
    """A user-facing error: the message is one line that says what to fix."""
