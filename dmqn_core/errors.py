"""Errors that the command line turns into a one-line message and a non-zero exit."""


class DmqnError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def exception_summary(exc: BaseException, limit: int = 200) -> str:
    """An exception as the short detail of a DmqnError: its type and its words, on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]
