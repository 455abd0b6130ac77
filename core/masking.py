"""Masking secrets out of everything tierpool writes: logs, replies, events, dead letters.

A secret reaches tierpool inside URLs: a password in ``REDIS_URL`` or
``TIER_CONFIG_URL`` (``user:pass@``), a token in a query string, or a
producer's malformed field (an ``endpoint`` with credentials, which is
refused, and whose refusal would otherwise quote it). One rule masks them,
:func:`mask_url`, and :func:`mask_text` applies it to every URL inside free
text; each place that writes text a person or another service will read
(the log formatters, the dead-letter/``invalid`` reply call, the upstream
fetch's error) goes through :func:`mask_text`, so no path can forget a case.

What is kept: the scheme, host, port, path and the values of query keys
known to be harmless (``db``, ``protocol``...). What is masked as ``***``:
the whole userinfo (user name and password: a user name given alone is often
a misplaced password, and ``user:`` prefixes tell an attacker which ACL user
to aim at), every other query value, any fragment.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK: Final = "***"

_HARMLESS_QUERY_KEYS: Final = frozenset(
    {
        "db",
        "protocol",
        "ssl_cert_reqs",
        "decode_responses",
        "health_check_interval",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "max_connections",
        "client_name",
    }
)

_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>\\`]+")
"""A URL inside free text: it ends at whitespace, a quote, an angle bracket or a backslash
(what surrounds a URL in a repr, a JSON string or a sentence)."""


def mask_url(url: str) -> str:
    """``url`` with its userinfo and any query value that may be a secret replaced by ``***``.

    The whole userinfo goes: ``redis://user:pw@host`` shows as ``redis://***@host``
    (a user name alone is often a misplaced password: ``redis://secret@host``).
    Query values are kept only for keys known to be harmless (``db``,
    ``protocol``...), so an unfamiliar key such as ``token`` or
    ``X-Amz-Signature`` is never printed; a fragment is masked.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        _userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, v if k.lower() in _HARMLESS_QUERY_KEYS else MASK) for k, v in pairs],
            safe="*",
        )
    if netloc == parts.netloc and query == parts.query and not parts.fragment:
        return url  # nothing to hide: show it exactly as given
    # Built by hand: urlunsplit would turn "unix:///path" into "unix:/path".
    tail = (f"?{query}" if query else "") + (f"#{MASK}" if parts.fragment else "")
    return f"{parts.scheme}://{netloc}{parts.path}{tail}"


def mask_text(text: str) -> str:
    """``text`` with every URL in it masked by :func:`mask_url`; other text unchanged."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """``(url without userinfo, user, password)``; user and password are percent-decoded.

    For clients that must not see credentials in the URL itself (``urllib``
    reads ``user:pass@host`` as a host with a port named ``pass@host`` and
    quotes it in its error).
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    _, _, hostport = parts.netloc.rpartition("@")
    bare = parts._replace(netloc=hostport).geturl()
    return bare, parts.username, parts.password
