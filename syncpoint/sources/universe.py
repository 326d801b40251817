"""The universe of a run: which tickers it covers, read from a file or the API, validated.

Symbols are checked before anything else sees them, because they end up in URLs, in
SQL parameters and in logs; a bad one is reported with its reason and skipped. A line of
a tickers file is reported by its number, never by its text: the file may not be a
tickers file at all (a flow parameter pointed at `.env`), and a rejected line is exactly
the one that could hold a password.

Which files a flow run may read: those this process's `syncpoint` command was given
(`allow_file`, the user's own choice on their own machine), or files inside
SYNCPOINT_TICKERS_DIR (`readable_tickers_file`). Anyone who may start a deployment run
can set its parameters; a parameter must not reach any other file on the worker.
"""

from __future__ import annotations

import csv
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from syncpoint.core.errors import ConfigError

# Upper-case letters and digits with the class separators real exchanges use (BRK.B,
# BF-B, ^GSPC): short enough for any column, nothing a path or a query could abuse.
_SYMBOL = re.compile(r"^\^?[A-Z0-9]{1,10}([.\-][A-Z0-9]{1,5})?$")
_SHOWN = 40
_LINE_END = re.compile(r"\r\n?|\n")


@dataclass
class Universe:
    tickers: list[str] = field(default_factory=list)
    # Where a rejected symbol was (the symbol cut to 40 characters, or "line N" of a
    # tickers file) -> why it was rejected.
    rejected: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    requests: int = 0  # API requests it took to learn the list


def validate(raw_symbols: Sequence[str], where: Sequence[str] | None = None) -> Universe:
    """Normalise (strip, upper-case), drop duplicates, reject malformed symbols.

    `where` names each symbol's place (e.g. "line 7"): a rejected one is then reported
    by it instead of by its text.
    """
    universe = Universe()
    seen: set[str] = set()
    for i, raw in enumerate(raw_symbols):
        symbol = raw.strip().upper()
        if not symbol:
            continue
        reason = check_symbol(symbol)
        if reason:
            if where is not None:
                shown = where[i]
            else:
                shown = symbol if len(symbol) <= _SHOWN else symbol[:_SHOWN] + "..."
            universe.rejected[shown] = reason
        elif symbol in seen:
            universe.duplicates += 1
        else:
            seen.add(symbol)
            universe.tickers.append(symbol)
    return universe


def tickers_from_file(path: str | Path) -> Universe:
    """A tickers file's valid tickers, its rejected lines by number; ConfigError if it
    yields none. Reads `path` as it is: a flow checks it with readable_tickers_file."""
    numbered = read_tickers_file(path)
    universe = validate([s for _, s in numbered], [f"line {n}" for n, _ in numbered])
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


def read_tickers_file(path: str | Path) -> list[tuple[int, str]]:
    """(line number, symbol) pairs from a file: one symbol per line, or CSV with a `symbol`
    or `ticker` column. Line numbers count every line, as an editor shows them."""
    file = Path(path)
    if file.exists() and not file.is_file():
        raise ConfigError(f"tickers file {file} is not a file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"tickers file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read tickers file {file}: {exc}") from None
    # Split at line ends only: splitlines() also breaks at form feeds and the like, and
    # the numbers would no longer match the lines an editor shows.
    lines = [
        (number, line)
        for number, line in enumerate(_LINE_END.split(text), 1)
        if line.strip() and not line.startswith("#")
    ]
    if not lines:
        raise ConfigError(f"tickers file {file} is empty")
    header = [h.strip().lower() for h in _cells(lines[0][1])]
    column = next((name for name in ("symbol", "ticker") if name in header), None)
    if column is None:
        if len(header) > 1:
            raise ConfigError(
                f"tickers file {file} looks like CSV but has no 'symbol' or 'ticker' column"
            )
        return [(number, line.strip()) for number, line in lines]
    # One record per line: a quoted field spanning lines has no place in a tickers file,
    # and this way each symbol keeps the number of the line it is on.
    index = header.index(column)
    return [(number, _cell(_cells(line), index)) for number, line in lines[1:]]


def _cells(line: str) -> list[str]:
    return next(csv.reader([line]), [])


def _cell(cells: list[str], index: int) -> str:
    return cells[index].strip() if index < len(cells) else ""


# Files this process's `syncpoint` command was given; see allow_file. Process-local on
# purpose: nothing a flow run's parameters say can add to it.
_cli_files: set[Path] = set()
_cli_files_lock = threading.Lock()


def allow_file(path: str | Path) -> Path:
    """Let this process's flow runs read `path`, which the CLI's user named: it is their
    machine. Returns the absolute path to pass on (relative ones would be read against
    SYNCPOINT_TICKERS_DIR by the flow)."""
    resolved = _resolved(Path(path).expanduser(), str(path))
    with _cli_files_lock:
        _cli_files.add(resolved)
    return resolved


def readable_tickers_file(path: str, allowed_dir: Path | None) -> Path:
    """The file a flow run's `tickers_file` parameter may read, or ConfigError.

    A file the CLI was given (allow_file), or one inside `allowed_dir`
    (SYNCPOINT_TICKERS_DIR; a relative path is taken from there). Symlinks and `..` are
    resolved first, so the file must really be inside. A refused path is refused before
    anything looks at it: whether a file outside exists is not told either.
    """
    given = Path(path)
    resolved = _resolved(given if allowed_dir is None else allowed_dir / given, path)
    with _cli_files_lock:
        if resolved in _cli_files:
            return resolved
    if allowed_dir is None:
        raise ConfigError(
            f"tickers_file {path!r} is refused: a flow run reads tickers files only from "
            "SYNCPOINT_TICKERS_DIR, which is not set where it runs (the syncpoint "
            "command's --tickers-file reads any file you name)"
        )
    root = _resolved(allowed_dir, str(allowed_dir))
    if not resolved.is_relative_to(root):
        raise ConfigError(
            f"tickers_file {path!r} is refused: it is not inside SYNCPOINT_TICKERS_DIR "
            f"({allowed_dir})"
        )
    return resolved


def _resolved(path: Path, shown: str) -> Path:
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
        raise ConfigError(f"tickers file {shown!r} is not a usable path ({exc})") from None


SOURCES = ("sp500", "all", "custom")
