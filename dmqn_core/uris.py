"""Connection URIs as they may be shown: passwords hidden (redis://:***@host, postgresql://user:***@host).

Every message, summary or result that names a store or a study database goes through here, so a
password given in a URL never reaches a terminal or a log.

All of them read a URI the same way: its user info is everything between :// and the LAST '@'
(a host never holds an '@'), so that a password holding an unescaped '/', '?', '#' or '@' stays
whole, where urllib ends the user info at the first '/', '?' or '#' and reads the rest of the
password as the host.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

# redis-py (and SQLAlchemy URLs) also read a password from the query string (?password=...).
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def _split(uri: str) -> tuple[str, str | None, str] | None:
    """(SCHEME://, the user info or None, the rest) of ``uri``; None for a URI without '://' (a path)."""
    head, sep, rest = uri.partition("://")
    if not sep:
        return None
    userinfo, at, after = rest.rpartition("@")  # without an '@': ("", "", rest)
    return head + sep, userinfo if at else None, after


def redact_uri(uri: str) -> str:
    """A store URI as it may be shown (messages, summaries, results): redis://:***@host:port/db.

    A user name before the first ':' of the user info is kept; user info without a ':' is hidden
    whole (it may be a password in the old redis://PASSWORD@host form).
    """
    parts = _split(uri)
    if parts is None:
        return uri
    head, userinfo, rest = parts
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{rest}" if colon else f"***@{rest}"
    return head + _QUERY_PASSWORD.sub(r"\1***", rest)


def quote_userinfo(uri: str) -> str:
    """``uri`` with its user name and password percent-encoded, for a URL parser (redis-py's, urllib's)
    to connect to the host the user gave with the whole password.

    Escapes the user wrote are kept: each part is percent-decoded, then encoded, so p%40ss and p@ss
    both become p%40ss (the password p@ss), as a parser decodes them.
    """
    parts = _split(uri)
    if parts is None:
        return uri
    head, userinfo, rest = parts
    if userinfo is None:
        return uri
    user, colon, password = userinfo.partition(":")
    return f"{head}{quote(unquote(user), safe='')}{colon}{quote(unquote(password), safe='')}@{rest}"


def uri_secrets(uri: str) -> list[str]:
    """The forms in which ``uri``'s password may show up in a driver's message, longest first: as
    given, percent-decoded and as quote_userinfo encodes it; the query string's password likewise.

    Whole passwords only: quote_userinfo keeps a parser from cutting a password into pieces, and a
    short piece looked for everywhere would hide letters of ordinary words ("kno***n").
    """
    parts = _split(uri)
    if parts is None:
        return []
    _, userinfo, rest = parts
    found = [m.group(2) for m in _QUERY_PASSWORD.finditer(rest)]
    if userinfo is not None:
        _, colon, password = userinfo.partition(":")
        found.append(password if colon else userinfo)
    texts = {text for secret in found for text in (secret, unquote(secret), quote(unquote(secret), safe=""))}
    return sorted(texts - {""}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` (a driver's error message, say) with each of ``secrets`` (uri_secrets of its URI) replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
