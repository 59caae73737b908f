"""Passwords never leave the process: URLs and error texts are redacted before they are shown."""

from __future__ import annotations

import re

from stage_a.errors import first_line

SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Query parameters that carry secrets (libpq's password/sslpassword, tokens of other services).
_SECRET_PARAM = re.compile(r"(?i)([?&;]\s*[\w.-]*(?:pass(?:word)?|passwd|pwd|secret|token)[\w.-]*=)[^&;#\s]*")
MASK = "***"


def userinfo_end(rest: str) -> int:
    """Index of the ``@`` ending the userinfo of ``rest`` (a URL after ``scheme://``), or -1.

    Hosts never contain ``@``, passwords may (unencoded, as people type them): the userinfo ends at
    the last ``@`` of the authority, like urllib and kombu parse it. An ``@`` inside a query
    (``?application_name=a@b``) does not count; a path-only URL (``sqlite:////x@y.db``) has none.
    """
    if rest.startswith("/"):
        return -1
    at = rest.rfind("@")
    q = rest.find("?")
    if 0 <= q < at and "=" in rest[q:at]:
        at = rest.rfind("@", 0, q)
    return at


def url_passwords(url: str) -> list[str]:
    """Every password written in ``url`` (userinfo and secret query values), for scrubbing messages."""
    from urllib.parse import unquote

    found: list[str] = []
    starts = [m.end() for m in SCHEME.finditer(url)]
    for i, start in enumerate(starts):
        rest = url[start:starts[i + 1] if i + 1 < len(starts) else len(url)]
        at = userinfo_end(rest)
        if at > 0 and ":" in rest[:at]:
            found.append(rest[:at].split(":", 1)[1])
    found += [m.group(0)[len(m.group(1)):] for m in _SECRET_PARAM.finditer(url)]
    found = [p for p in found if p]
    return sorted({*found, *(unquote(p) for p in found)}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``, for logs and messages.

    Covers userinfo passwords (also with ``@`` or ``:`` in them, and ``redis://:pass@host``), secret
    query parameters (``?password=`` of libpq), several URLs in one string (kombu's
    ``sentinel://...;sentinel://...`` failover lists) and multi-host authorities
    (``postgresql://u:p@h1:5432,h2:5432/db``). Never raises: any text goes in, text comes out.
    """
    out: list[str] = []
    pos = 0
    matches = list(SCHEME.finditer(url))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(url)
        out.append(url[pos:m.end()])
        rest = url[m.end():end]
        at = userinfo_end(rest)
        if at > 0 and ":" in rest[:at]:
            rest = rest[:at].split(":", 1)[0] + ":" + MASK + rest[at:]
        out.append(rest)
        pos = end
    out.append(url[pos:])
    return _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, "".join(out))


def hide_secrets(text: str, *urls: str) -> str:
    """``text`` (an error message, say) with every password of ``urls`` and any URL in it redacted."""
    for url in urls:
        for secret in url_passwords(url):
            text = text.replace(secret, MASK)
    return redact_url(text)


def broker_error(url: str, exc: BaseException, doing: str = "cannot reach broker") -> str:
    """One line naming the broker (password hidden) and the first line of what went wrong."""
    return f"{doing} {redact_url(url)}: {hide_secrets(first_line(exc), url)}"
