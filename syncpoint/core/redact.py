"""Masking secrets in anything that leaves the process: logs, errors, artifacts, rows.

httpx puts the full URL, query string included, into its exceptions and log lines; the
market API takes its key as `apikey=`. Everything user-visible goes through `redact`.
"""

from __future__ import annotations

import logging
import re

# key=value pairs in query strings, JSON-ish text and reprs whose name says "secret".
_SECRET_PAIR = re.compile(
    r"(?P<name>\b(?:apikey|api_key|api-key|access_token|token|key|password|secret)"
    r"[\"']?\s*[=:]\s*[\"']?)(?P<value>[^&\s\"',;)}\]]+)",
    re.IGNORECASE,
)
# userinfo in URLs: scheme://user:password@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?=@)", re.I)

MASK = "***"


def redact(text: str) -> str:
    """`text` with every recognisable secret value replaced by ***."""
    text = _SECRET_PAIR.sub(lambda m: m.group("name") + MASK, text)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def redact_url(url: object) -> str:
    """A URL (str or httpx.URL) with its key and password masked."""
    return redact(str(url))


class RedactingFilter(logging.Filter):
    """Rewrites every record's message through `redact` before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is not ours to fix here
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if redact(str(exc)) != str(exc):
                # The traceback would print the raw message: keep only the clean text.
                record.msg = f"{clean} ({type(exc).__name__}: {redact(str(exc))})"
                record.args, record.exc_info, record.exc_text = None, None, None
        return True
