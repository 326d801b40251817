"""The HTTP plumbing: a threaded keep-alive server around ``MarketApi``, and ``serve()``."""

from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

from syncpoint.simulator.api import MarketApi, new_dip_data
from syncpoint.simulator.config import SimulatorConfig
from syncpoint.simulator.dip import DipData
from syncpoint.simulator.faults import Fault, FaultKind
from syncpoint.simulator.market_data import MarketData
from syncpoint.simulator.stats import Served

# Long enough for any polite keep-alive pool; short enough that vanished clients do not
# pin threads in a long-running demo server forever.
_IDLE_TIMEOUT_SECONDS = 300
_POLL_SECONDS = 0.05


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "syncpoint-simulator/1"
    timeout = _IDLE_TIMEOUT_SECONDS
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; with Nagle on, a small body would wait for
        # the client's delayed ACK (~40 ms) on every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        response = self.server.api.handle(self.path, self.headers.get("Authorization"))
        if response.reset:
            # Linger 0 makes close() send RST: the client sees a reset, not a tidy EOF.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Closed here, the real close lands when rfile is released, before the
            # server's graceful shutdown(SHUT_WR) could send a FIN ahead of the RST.
            self.connection.close()
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Per-request stderr lines would drown benchmark and test output."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], api: MarketApi) -> None:
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), slow on some hosts.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Keep-alive handler threads outlive serve_forever(); cut them off so a stopped
        simulator really stops answering.
        """
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # the client hung up; nothing to report
        super().handle_error(request, client_address)


class MarketSimulator:
    """An FMP-style market API on loopback, with injectable faults and request counters; the
    same server also answers the DIP documents API under ``/api/v1/{entity}``.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.data = MarketData(self.config.stock_list_size)
        self.dip: DipData = new_dip_data(self.config)
        self._api = MarketApi(self.config, self.data, self.dip)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Serve from a daemon thread; returns the base URL."""
        httpd = self._bind()
        self._thread = threading.Thread(
            target=self._run, args=(httpd,), name="syncpoint-simulator", daemon=True
        )
        self._thread.start()
        return self.base_url

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until stop() is called from elsewhere (or an exception,
        e.g. KeyboardInterrupt, escapes); ``on_ready`` gets the URL once the port is bound.
        """
        httpd = self._bind()
        if on_ready is not None:
            on_ready(self.base_url)
        try:
            self._run(httpd)
        finally:
            self._close(httpd)

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        if self._thread is not None:
            # Safe even if the thread has not entered serve_forever yet: it then exits at once.
            httpd.shutdown()
            self._thread.join()
            self._thread = None
            self._close(httpd)
        elif self._serving.is_set():
            httpd.shutdown()  # serve_forever() in the other thread closes up

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("simulator is not running; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> MarketSimulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> _HTTPServer:
        if self._httpd is not None:
            raise RuntimeError("simulator is already running")
        self._httpd = _HTTPServer((self.config.host, self.config.port), self._api)
        return self._httpd

    def _run(self, httpd: _HTTPServer) -> None:
        self._serving.set()
        try:
            httpd.serve_forever(poll_interval=_POLL_SECONDS)
        finally:
            self._serving.clear()

    def _close(self, httpd: _HTTPServer) -> None:
        httpd.close_connections()
        httpd.server_close()
        if self._httpd is httpd:
            self._httpd = None

    # -- faults ----------------------------------------------------------------------------

    def set_fault(self, symbol: str, kind: FaultKind | str, **opts: Any) -> None:
        """Arm a fault for every request naming ``symbol``; replaces its previous fault. A DIP
        entity name ("drucksache") arms it for every request to that entity.

        Options: ``seconds`` (slow), ``failures`` (flaky), ``retry_after`` (rate_limited).
        """
        self._api.faults.set(symbol, Fault.create(kind, **opts))

    def clear_fault(self, symbol: str) -> None:
        self._api.faults.clear(symbol)

    def set_global_fault(self, kind: FaultKind | str, **opts: Any) -> None:
        """Arm a fault for every API request, checked before the API key and the quota."""
        self._api.faults.set_global(Fault.create(kind, **opts))

    def clear_global_fault(self) -> None:
        self._api.faults.set_global(None)

    def clear_faults(self) -> None:
        """Disarm everything: every symbol's fault, the global one and stuck DIP cursors."""
        self._api.faults.clear()
        self._api.faults.set_global(None)
        self.dip.clear_stuck()

    # -- DIP documents API -----------------------------------------------------------------

    def dip_update(
        self,
        entity: str,
        ids: list[str] | None = None,
        count: int | None = None,
        at: datetime | None = None,
        visible_at: datetime | None = None,
    ) -> list[str]:
        """An upstream edit: the records ``ids`` (or ``count`` deterministically picked ones)
        get ``aktualisiert`` = ``at`` (default: upstream's now, see dip_now; naive means UTC)
        and a " (geändert N)" title suffix. The API serves the edit from ``visible_at``
        (default: ``at`` plus the visibility delay), the previous version until then.
        Returns the changed ids.
        """
        return self.dip.update(entity, ids=ids, count=count, at=at, visible_at=visible_at)

    def dip_add(
        self,
        entity: str,
        count: int = 1,
        at: datetime | None = None,
        visible_at: datetime | None = None,
    ) -> list[str]:
        """Upstream adds ``count`` records dated today (so they sort first), with
        ``aktualisiert`` and visibility as for dip_update. Returns the new ids.
        """
        return self.dip.add(entity, count, at=at, visible_at=visible_at)

    def dip_records(self, entity: str) -> list[dict[str, Any]]:
        """The entity's records visible now, in API order (datum, then id, descending)."""
        return self.dip.records(entity)

    def dip_now(self) -> datetime:
        """Upstream's clock: the wall clock plus every dip_advance_clock()."""
        return self.dip.now()

    def dip_advance_clock(self, seconds: float) -> None:
        """Let upstream's time pass without waiting: changes due by then become visible."""
        self.dip.advance(timedelta(seconds=seconds))

    def dip_plan(self, entity: str, after_requests: int, action: Callable[[], object]) -> None:
        """Run ``action`` (e.g. ``lambda: sim.dip_add(...)``, or arming a fault) as the
        entity's request number ``after_requests + 1`` (counted from now) arrives, before
        anything else looks at it: an upstream change in the middle of a stream, at a known
        page."""
        self.dip.plan(entity, after_requests, action)

    def dip_key_forms(self) -> dict[str, int]:
        """How DIP requests since the last reset_stats() carried the key: counts of
        "header" (Authorization: ApiKey ...), "query" (apikey=...) and "none"."""
        return self._api.stats.key_forms()

    def dip_set_stuck_cursor(self, entity: str, on: bool) -> None:
        """A broken upstream: every request with a cursor gets the second page and the
        first page's cursor, forever. clear_faults() turns it off too.
        """
        self.dip.set_stuck(entity, on)

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self._api.stats.snapshot()

    def live(self) -> tuple[int, int]:
        """Requests since the last reset_stats() and requests being answered now."""
        return self._api.stats.live()

    def timeline(self) -> list[Served]:
        """Every request since the last reset_stats(), as it ended; needs
        SimulatorConfig(record_timeline=True)."""
        return self._api.stats.timeline()

    def reset_stats(self) -> None:
        self._api.stats.reset()

    def requests_for(self, symbol: str, endpoint: str | None = None) -> int:
        """Requests naming ``symbol``, optionally only those to ``endpoint`` (e.g.
        "historical-price-eod/full"). DIP: requests_for("drucksache", "dip/drucksache").
        """
        return self._api.stats.requests_for(symbol, endpoint)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(config: SimulatorConfig | None = None) -> None:
    """Run a simulator in the foreground until Ctrl-C or SIGTERM."""
    simulator = MarketSimulator(config)
    in_main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM gets the same clean exit as Ctrl-C (what `kill` and process managers send).
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
        simulator.serve_forever(
            on_ready=lambda url: print(f"syncpoint simulator listening on {url}", flush=True)
        )
    except KeyboardInterrupt:
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
