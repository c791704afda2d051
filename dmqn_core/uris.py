"""Connection URIs as they may be shown: passwords hidden (redis://:***@host, postgresql://user:***@host).

Every message, summary or result that names a store or a study database goes through here, so a
password given in a URL never reaches a terminal or a log.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# redis-py (and SQLAlchemy URLs) also read a password from the query string (?password=...).
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def redact_uri(uri: str) -> str:
    """A store URI as it may be shown (messages, summaries, results): redis://:***@host:port/db.

    Everything between :// and the last @ counts as user info, so that a password holding an
    unescaped '/', '?', '#' or '@' is hidden as well; a user name before the first ':' is kept,
    user info without a ':' is hidden whole (it may be a password in the old redis://PASSWORD@host form).
    """
    head, sep, rest = uri.partition("://")
    if not sep:
        return uri
    userinfo, at, host = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{host}" if colon else f"***@{host}"
    return head + sep + _QUERY_PASSWORD.sub(r"\1***", rest)


def uri_secrets(uri: str) -> list[str]:
    """The texts of ``uri`` that redact_uri hides, raw, percent-decoded and cut where urllib ends the
    host part ('/', '?', '#': it then reads the piece before as a port, and quotes it), longest first."""
    _, sep, rest = uri.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    found = [m.group(2) for m in _QUERY_PASSWORD.finditer(rest)]
    if sep and at:
        _, colon, password = userinfo.partition(":")
        found.append(password if colon else userinfo)
    texts = {text for secret in found for text in (secret, unquote(secret), *re.split(r"[/?#]", secret))}
    return sorted(texts - {""}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` (a driver's error message, say) with each of ``secrets`` (uri_secrets of its URI) replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
