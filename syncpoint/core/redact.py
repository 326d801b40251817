"""Masking secrets in anything that leaves the process: logs, errors, artifacts, rows.

httpx puts the full URL, query string included, into its exceptions and log lines; the
market API takes its key as `apikey=`. Everything user-visible goes through `redact`.

Patterns only catch a secret that is labelled as one. An upstream error body can echo the
key in any form ("Invalid key sekrit123 for this plan"), so the configured secret values
themselves are registered (`register_secret`, by the API blocks and the database) and
masked wherever they appear.

Text from upstream is data: `printable` escapes the control characters (terminal escape
sequences, bidi overrides) an answer could use to rewrite what `syncpoint status` prints.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import quote, quote_plus

from pydantic import SecretStr

# key=value pairs in query strings, JSON-ish text and reprs whose name says "secret".
_SECRET_PAIR = re.compile(
    r"(?P<name>\b(?:apikey|api_key|api-key|access_token|token|key|password|secret)"
    r"[\"']?\s*[=:]\s*[\"']?)(?P<value>[^&\s\"',;)}\]]+)",
    re.IGNORECASE,
)
# userinfo in URLs: scheme://user:password@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?=@)", re.I)

MASK = "***"

# Shorter values are not masked: "postgres" is a fine password to mask, but masking "abc"
# would shred ordinary words in every message.
MIN_SECRET_LENGTH = 6

_secrets: set[str] = set()
_secrets_pattern: re.Pattern[str] | None = None
_secrets_lock = threading.Lock()


def register_secret(value: str | SecretStr | None) -> None:
    """Mask `value` (and its URL-encoded forms) in everything `redact` sees, process-wide.

    Values shorter than MIN_SECRET_LENGTH are ignored. Registering is idempotent and cheap.
    """
    global _secrets_pattern
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    # A key with "+" or "/" reaches a URL percent-encoded: mask every spelling of it.
    forms = {value, quote(value, safe=""), quote_plus(value, safe="")}
    with _secrets_lock:
        if forms <= _secrets:
            return
        _secrets.update(forms)
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_pattern = re.compile("|".join(re.escape(v) for v in ordered))


def redact(text: str) -> str:
    """`text` with every registered secret and every recognisable secret value as ***."""
    pattern = _secrets_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _SECRET_PAIR.sub(lambda m: m.group("name") + MASK, text)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


# C0 controls, DEL, C1 controls; the bidi embeddings, overrides and isolates (they reorder
# what a terminal shows); line/paragraph separators and the BOM (they break lines or hide).
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]"
)
ELLIPSIS = "..."


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int = 200) -> str:
    """`text` safe to store and print: control characters escaped (ESC as \\x1b, RLO as
    \\u202e), at most `limit` characters, "..." marking a cut.

    The cut never splits an escape, and only the first `limit` characters are looked at,
    so a megabyte of upstream text costs no more than a line.
    """
    if limit < len(ELLIPSIS) + 1:
        raise ValueError("limit too small to show anything")
    head = text[: limit + 1]
    escaped = _UNPRINTABLE.sub(lambda m: _escape(m.group()), head)
    if len(escaped) <= limit:
        return escaped
    # Too long: cut at a boundary of the escaped text, never inside an escape sequence.
    budget = limit - len(ELLIPSIS)
    out: list[str] = []
    used = 0
    for char in head:
        piece = _escape(char) if _UNPRINTABLE.fullmatch(char) else char
        if used + len(piece) > budget:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out) + ELLIPSIS


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
