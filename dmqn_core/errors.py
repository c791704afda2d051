"""Errors that the command line turns into a one-line message and a non-zero exit, and the one
sanitiser of text shown on a terminal."""

from __future__ import annotations

import re


class DmqnError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def exception_summary(exc: BaseException, limit: int = 200) -> str:
    """An exception as the short detail of a DmqnError: its type and its words, on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]


# Characters that a terminal acts on instead of showing: C0 and C1 controls with DEL (ESC starts
# cursor moves, screen clears and title changes; CR and BS overwrite what was printed), the line and
# paragraph separators, the bidirectional overrides and isolates that reorder a line (Trojan Source),
# and lone surrogates (os.fsdecode's stand-ins for undecodable bytes, which a UTF-8 stream refuses).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """``text`` as it may reach a terminal: every character the terminal would act on, escaped as
    Python writes it (``\\x1b``, ``\\n``, ``\\u202e``), so that a name, an id or a line quoted from a
    log is shown as data, on one line, and never clears the screen or retitles the window."""
    return _UNSAFE.sub(_escape, text)


def has_unsafe_characters(text: str) -> bool:
    """Whether ``text`` holds a character printable() escapes (not allowed in names that become folders)."""
    return _UNSAFE.search(text) is not None
