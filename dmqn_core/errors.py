"""Errors that the command line turns into a one-line message and a non-zero exit."""


class DmqnError(Exception):
    """A problem with the user's input or environment, explained in one line."""
