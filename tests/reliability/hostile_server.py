"""Scripted APIs on loopback for the reliability suites, and the FMP-style data they serve.

`LoopbackApi` is a real HTTP server on 127.0.0.1 whose every answer a test writes: a
normal JSON reply, or something no well-behaved server sends (a status line and then a
reset, a body trickled one byte at a time, more bytes than anyone should read). It keeps
what it saw (each request's path, query and arrival time) and how many body bytes it
managed to hand to the kernel per symbol, so a test can tell how far a client read.

The market data helpers (`served_bars`, `stored_prices`, `run_status`) are shared by the
poisoned-payload and hostile-API suites: what a normal ticker is served, and what the
database must then hold.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlparse

from tests.conftest import run_cli, table_rows

PRICES = "/stable/historical-price-eod/full"
DCF = "/stable/discounted-cash-flow"
# A server thread gives up on a client that neither reads nor hangs up after this long.
SOCKET_TIMEOUT = 10.0


@dataclass
class Request:
    """One request as the server saw it, and the means to answer it in any way at all."""

    api: LoopbackApi
    handler: BaseHTTPRequestHandler
    path: str
    query: dict[str, str]
    headers: Message
    at: float  # time.monotonic() on arrival

    @property
    def symbol(self) -> str:
        return self.query.get("symbol", "")

    def reply(
        self,
        status: int,
        body: str | bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """A complete answer with its Content-Length (none for 204 and 304)."""
        data = body.encode() if isinstance(body, str) else body
        sized = status not in (204, 304)
        self.head(
            status,
            {"Content-Type": content_type}
            | ({"Content-Length": str(len(data))} if sized else {})
            | (headers or {}),
        )
        if sized:
            self.send(data)

    def head(self, status: int, headers: dict[str, str]) -> None:
        """The status line and headers only; the body (if any) is the caller's to send."""
        self.handler.send_response(status)
        for name, value in headers.items():
            self.handler.send_header(name, value)
        self.handler.end_headers()

    def send(self, data: bytes) -> None:
        """Body bytes, counted for the symbol once the kernel has taken them."""
        self.handler.wfile.write(data)
        self.api.count_sent(self.symbol, len(data))

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing proxy does."""
        connection = self.handler.connection
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()


Answer = Callable[[Request], None]


class LoopbackApi:
    """A threaded HTTP/1.0 server on 127.0.0.1 answering every GET with `answer(request)`.

    Counts requests per (path, symbol), keeps each request, and the body bytes sent per
    symbol. An answer that raises OSError (the client hung up) ends that exchange only.
    """

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: Counter[tuple[str, str]] = Counter()
        self.seen: list[Request] = []
        self.sent: defaultdict[str, int] = defaultdict(int)
        self.closing = threading.Event()  # long answers (a trickle) end when it is set
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.connection.settimeout(SOCKET_TIMEOUT)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                request = Request(api, self, url.path, query, self.headers, time.monotonic())
                with api._lock:
                    api.requests[url.path, request.symbol] += 1
                    api.seen.append(request)
                # The client hanging up mid-answer is what several answers are about.
                with contextlib.suppress(OSError):
                    api.answer(request)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def count_sent(self, symbol: str, count: int) -> None:
        with self._lock:
            self.sent[symbol] += count

    def arrivals(self, path: str, symbol: str) -> list[float]:
        """When each request for (path, symbol) arrived, in order (monotonic seconds)."""
        with self._lock:
            return [r.at for r in self.seen if (r.path, r.symbol) == (path, symbol)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.seen.clear()
            self.sent.clear()


# --- FMP-style data: what a normal ticker is served and must be stored as ------------------


def served_bar(symbol: str, day: date) -> dict[str, Any]:
    """The bar the API serves for (symbol, day): deterministic, different per ticker."""
    base = 10 + sum(map(ord, symbol)) % 50 + day.day / 100
    return {
        "symbol": symbol,
        "date": day.isoformat(),
        "open": base + 0.25,
        "high": base + 1.5,
        "low": base - 0.5,
        "close": base + 0.75,
        "volume": 1000 * day.day + len(symbol),
    }


def served_bars(symbol: str, start: date, end: date) -> list[dict[str, Any]]:
    """The weekday bars of [start, end], newest first, as FMP orders them."""
    days = (end - timedelta(days=i) for i in range((end - start).days + 1))
    return [served_bar(symbol, d) for d in days if d.weekday() < 5]


def served_prices(symbols: list[str], start: date, end: date) -> list[tuple[Any, ...]]:
    """stock_prices rows (ticker, date, open, high, low, close, volume) for `symbols`."""
    return sorted(
        (
            b["symbol"], date.fromisoformat(b["date"]), b["open"], b["high"], b["low"],
            b["close"], b["volume"],
        )
        for s in symbols
        for b in served_bars(s, start, end)
    )  # fmt: skip


def stored_prices(url: str) -> list[tuple[Any, ...]]:
    """What stock_prices holds, in served_prices' form (SQLite gives dates as text)."""
    rows = table_rows(url, "stock_prices", "ticker, date, open, high, low, close, volume")
    return sorted((r[0], as_day(r[1]), *r[2:]) for r in rows)


def as_day(value: object) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def dcf_body(symbol: str, day: date, dcf: str = "123.5") -> str:
    return f'[{{"symbol": "{symbol}", "date": "{day}", "dcf": {dcf}, "Stock Price": 120.25}}]'


def run_status(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """`syncpoint status --json` of the latest run, its failures included."""
    result = run_cli(["status", "--json", "--failures", "100"], env, cwd)
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)
    return dict(run)


@dataclass
class Timer:
    """Wall time of a block: `with Timer() as t: ...; t.seconds`."""

    began: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self.began = time.monotonic()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.monotonic() - self.began
