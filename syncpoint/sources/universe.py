"""The universe of a run: which tickers it covers, read from a file or the API, validated.

Symbols are checked before anything else sees them, because they end up in URLs, in
SQL parameters and in logs; a bad one is reported with its reason and skipped.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from syncpoint.core.errors import ConfigError

# Upper-case letters and digits with the class separators real exchanges use (BRK.B,
# BF-B, ^GSPC): short enough for any column, nothing a path or a query could abuse.
_SYMBOL = re.compile(r"^\^?[A-Z0-9]{1,10}([.\-][A-Z0-9]{1,5})?$")
_SHOWN = 40


@dataclass
class Universe:
    tickers: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # shown symbol -> reason
    duplicates: int = 0
    requests: int = 0  # API requests it took to learn the list


def validate(raw_symbols: list[str]) -> Universe:
    """Normalise (strip, upper-case), drop duplicates, reject malformed symbols."""
    universe = Universe()
    seen: set[str] = set()
    for raw in raw_symbols:
        symbol = raw.strip().upper()
        if not symbol:
            continue
        reason = check_symbol(symbol)
        if reason:
            shown = symbol if len(symbol) <= _SHOWN else symbol[:_SHOWN] + "..."
            universe.rejected[shown] = reason
        elif symbol in seen:
            universe.duplicates += 1
        else:
            seen.add(symbol)
            universe.tickers.append(symbol)
    return universe


def tickers_from_file(path: str | Path) -> Universe:
    """A tickers file's valid tickers; ConfigError if it yields none."""
    universe = validate(read_tickers_file(path))
    if not universe.tickers:
        raise ConfigError(f"tickers file {path} has no valid tickers")
    return universe


def check_symbol(symbol: str) -> str | None:
    """Why `symbol` is not a ticker, or None if it is one."""
    if len(symbol) > 16:
        return f"malformed symbol: {len(symbol)} characters (at most 16)"
    if not symbol.isascii():
        return "malformed symbol: non-ASCII characters"
    if not _SYMBOL.match(symbol):
        return "malformed symbol: only A-Z, 0-9 and one '.' or '-' class suffix are allowed"
    return None


def read_tickers_file(path: str | Path) -> list[str]:
    """Symbols from a file: one per line, or CSV with a `symbol` or `ticker` column."""
    file = Path(path)
    if file.exists() and not file.is_file():
        raise ConfigError(f"tickers file {file} is not a file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"tickers file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read tickers file {file}: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"tickers file {file} is empty")
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    column = next((name for name in ("symbol", "ticker") if name in header), None)
    if column is None:
        if len(header) > 1:
            raise ConfigError(
                f"tickers file {file} looks like CSV but has no 'symbol' or 'ticker' column"
            )
        return [line.strip() for line in lines]
    # The header was read above; the reader gets the data lines only.
    reader = csv.DictReader(io.StringIO("\n".join(lines[1:])), fieldnames=header)
    return [(row.get(column) or "").strip() for row in reader]


SOURCES = ("sp500", "all", "custom")
