"""ClientThread: one client for a stage, used from the worker threads Prefect runs tasks in.

The batches here run in a thread pool as Prefect's task runner would run them, so what the
server sees (how many connections) is what a stage would cost.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from syncpoint.core.http import ApiClient, ClientThread


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.ports: set[int] = set()  # one client port per TCP connection
        self.requests = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()
        self.held = threading.Event()  # a /slow request has arrived
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.ports.add(self.client_address[1])
            self.server.requests += 1
        if self.path.startswith("/slow"):
            self.server.held.set()
            self.server.release.wait(10)
        threading.Event().wait(self.server.delay)
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(delay=0.01)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()


def _url(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}"


def _batch(clients: ClientThread, items: int) -> int:
    """One batch as a Prefect task runs it: from a worker thread, waiting for the result."""

    async def work(client: ApiClient) -> int:
        await asyncio.gather(*(client.get_json("/x", {"i": str(i)}) for i in range(items)))
        return client.requests_sent

    return clients.run(work)


def test_batches_from_many_threads_reuse_one_set_of_connections(server: _Server) -> None:
    concurrency, batches, items = 4, 12, 8
    with (
        ClientThread(ApiClient(_url(server), concurrency=concurrency)) as clients,
        ThreadPoolExecutor(max_workers=3) as pool,
    ):
        counted = list(pool.map(lambda _: _batch(clients, items), range(batches)))
    assert server.requests == batches * items
    # A client per batch would connect at least once per batch: 12 or more connections.
    assert len(server.ports) <= concurrency, sorted(server.ports)
    # Each batch counts its own requests, though they share the pools.
    assert counted == [items] * batches


def test_a_request_takes_a_free_connection_while_another_is_held(server: _Server) -> None:
    """A pool per connection, and each request to the pool with the fewest in flight: the
    answers held up on one connection hold up no request behind them."""
    server.release.clear()  # /slow waits until released

    async def work(client: ApiClient) -> int:
        held = asyncio.ensure_future(client.get_json("/slow"))
        assert await asyncio.to_thread(server.held.wait, 5)
        for i in range(3):  # one after another: each finds the held pool busy
            await asyncio.wait_for(client.get_json("/x", {"i": str(i)}), 5)
        server.release.set()
        await held
        return client.requests_sent

    with ClientThread(ApiClient(_url(server), concurrency=2)) as clients:
        assert clients.run(work) == 4
    assert len(server.ports) == 2


def test_closing_closes_the_pools_and_stops_the_thread(server: _Server) -> None:
    client = ApiClient(_url(server), concurrency=2)
    clients = ClientThread(client)
    with clients:
        assert _batch(clients, 2) == 2
        loop_thread = clients._thread
        assert loop_thread is not None
        assert loop_thread.is_alive()
    assert not loop_thread.is_alive()
    with pytest.raises(RuntimeError, match="outside `with`"):
        _batch(clients, 1)
    with pytest.raises(RuntimeError, match="outside `async with`"):
        asyncio.run(client.get_json("/x"))


def test_a_caller_interrupted_while_waiting_cancels_its_work(server: _Server) -> None:
    server.release.clear()  # every answer waits until released
    cancelled = threading.Event()

    async def work(client: ApiClient) -> None:
        try:
            await client.get_json("/slow")
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def interrupt_after(seconds: float) -> None:
        # Ctrl+C as the terminal sends it: a real SIGINT, which wakes the blocked wait.
        main = threading.main_thread().ident
        assert main is not None
        threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGINT)).start()

    with ClientThread(ApiClient(_url(server), concurrency=1)) as clients:
        interrupt_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            clients.run(work)
        assert cancelled.wait(5)
        server.release.set()


def test_share_needs_an_open_client() -> None:
    with pytest.raises(RuntimeError, match="open client"):
        ApiClient("http://127.0.0.1:9").share()


def test_closing_cancels_work_left_on_the_client_loop(server: _Server) -> None:
    # A batch whose item raised leaves its siblings behind; closing must end them, or
    # whatever they wait for (a request here, a global-limit slot in a run) keeps the
    # process from exiting.
    server.release.clear()
    started, cancelled = threading.Event(), threading.Event()

    async def work(client: ApiClient) -> None:
        async def sibling() -> None:
            started.set()
            try:
                await client.get_json("/slow")
            except asyncio.CancelledError:
                cancelled.set()
                raise

        asyncio.get_running_loop().create_task(sibling())  # left running on purpose
        await asyncio.sleep(0.05)
        raise ValueError("one item failed")

    clients = ClientThread(ApiClient(_url(server), concurrency=1))
    with clients:
        with pytest.raises(ValueError, match="one item failed"):
            clients.run(work)
        assert started.wait(5)
        loop_thread = clients._thread
    assert cancelled.is_set()
    assert loop_thread is not None
    assert not loop_thread.is_alive()
    server.release.set()
