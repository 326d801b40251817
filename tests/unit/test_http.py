"""The HTTP boundary: one table of what each answer means, the retry schedule, secrets,
and the bounds no answer can break (size, time, waits, redirects).

Status and header cases use httpx.MockTransport; what only a real socket shows (a body
that trickles, one too large to read, a connection reset mid-body) uses a small loopback
server in this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from syncpoint.blocks.dip_api import DipApi
from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.errors import ApiError, FatalApiError, ItemError, RetriableApiError
from syncpoint.core.http import ApiClient, AuthMode, RetryPolicy, parse_retry_after
from syncpoint.core.interrupts import StopFlag, clear_stop_request
from syncpoint.core.rate_limit import RateLimiter, drop_limiter
from syncpoint.core.redact import redact

KEY = "sekrit-KEY-123"


@pytest.fixture(autouse=True)
def no_stop_requested() -> Iterator[None]:
    """The stop event is process-wide: no test starts or leaves one behind."""
    clear_stop_request()
    yield
    clear_stop_request()


class FakeTime:
    """A clock that moves only when someone sleeps; every wait is recorded by who waited."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.waits: list[tuple[str, float]] = []

    def clock(self) -> float:
        return self.now

    def sleeper(self, who: str) -> Callable[[float], Any]:
        async def sleep(seconds: float) -> None:
            self.waits.append((who, seconds))
            self.now += seconds

        return sleep


def client_for(
    handler: Any,
    *,
    attempts: int = 3,
    sleeps: list[float] | None = None,
    **options: Any,
) -> ApiClient:
    """A client on a fake clock: `sleeps` gets every wait, retry or limiter, in order."""
    recorded = sleeps if sleeps is not None else []
    t = FakeTime()

    async def sleep(seconds: float) -> None:
        recorded.append(seconds)
        t.now += seconds

    return ApiClient(
        "http://api.test",
        api_key=SecretStr(KEY),
        policy=RetryPolicy(attempts=attempts, jitter=0.0),
        limiter=RateLimiter(None, clock=t.clock, sleep=sleep),
        sleep=sleep,
        transport=httpx.MockTransport(handler),
        **options,
    )


def answer(status: int, body: bytes = b"[]", **headers: str) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers=headers)

    return handler


async def fetch(client: ApiClient) -> Any:
    async with client:
        return await client.get_json("/stable/x", {"symbol": "AAPL"})


@pytest.mark.parametrize(
    ("status", "body", "error", "requests"),
    [
        pytest.param(200, b'[{"a": 1}]', None, 1, id="200-json"),
        pytest.param(200, b"<html>oops</html>", ItemError, 1, id="200-not-json"),
        pytest.param(200, b"", ItemError, 1, id="200-empty"),
        pytest.param(204, b"", ItemError, 1, id="204-no-content"),
        pytest.param(301, b"", ItemError, 1, id="301-not-followed"),
        pytest.param(304, b"", ItemError, 1, id="304-unexpected"),
        pytest.param(400, b"bad symbol", ItemError, 1, id="400-item"),
        pytest.param(404, b"", ItemError, 1, id="404-item"),
        pytest.param(401, b"", FatalApiError, 1, id="401-fatal"),
        pytest.param(403, b"", FatalApiError, 1, id="403-fatal"),
        pytest.param(408, b"", RetriableApiError, 3, id="408-retried"),
        pytest.param(429, b"", RetriableApiError, 3, id="429-retried"),
        pytest.param(500, b"", RetriableApiError, 3, id="500-retried"),
        pytest.param(502, b"", RetriableApiError, 3, id="502-retried"),
        pytest.param(503, b"", RetriableApiError, 3, id="503-retried"),
        pytest.param(504, b"", RetriableApiError, 3, id="504-retried"),
    ],
)
def test_each_status_is_classified_once(
    status: int, body: bytes, error: type[Exception] | None, requests: int
) -> None:
    client = client_for(answer(status, body))
    if error is None:
        assert asyncio.run(fetch(client)) == [{"a": 1}]
    else:
        with pytest.raises(error) as caught:
            asyncio.run(fetch(client))
        assert KEY not in str(caught.value)
        assert KEY not in caught.value.url  # type: ignore[attr-defined]
    assert client.requests_sent == requests
    assert client.retries == requests - 1


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(httpx.ReadTimeout("timed out"), id="read-timeout"),
        pytest.param(httpx.ConnectError("refused"), id="connect-error"),
        pytest.param(httpx.RemoteProtocolError("peer closed"), id="reset"),
    ],
)
def test_transport_failures_are_retried_then_transient(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    client = client_for(handler)
    with pytest.raises(RetriableApiError) as caught:
        asyncio.run(fetch(client))
    assert client.requests_sent == 3
    assert KEY not in str(caught.value)
    assert "apikey=***" in str(caught.value)


def test_backoff_is_exponential_and_recovers() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503 if len(calls) < 3 else 200, json=[{"ok": True}])

    sleeps: list[float] = []
    client = client_for(handler, attempts=5, sleeps=sleeps)
    assert asyncio.run(fetch(client)) == [{"ok": True}]
    assert sleeps == [0.5, 1.0]
    assert client.responses_by_status == {503: 2, 200: 1}


def test_jitter_stays_within_its_bound() -> None:
    policy = RetryPolicy(initial_wait=1.0, jitter=0.5, max_backoff=4.0)
    waits = [policy.wait_seconds(n, None) for n in range(1, 6) for _ in range(20)]
    assert all(1.0 <= w <= 4.5 for w in waits)
    assert len({round(w, 6) for w in waits}) > 10  # actually random
    assert max(policy.wait_seconds(10, None) for _ in range(20)) <= 4.5  # capped


def paced_client(handler: Any, t: FakeTime, *, attempts: int, max_wait: float = 120.0) -> ApiClient:
    """A client whose retry sleep and limiter share one fake clock that only sleeps move."""
    return ApiClient(
        "http://api.test",
        api_key=SecretStr(KEY),
        policy=RetryPolicy(attempts=attempts, jitter=0.0, max_wait=max_wait),
        limiter=RateLimiter(None, max_wait=max_wait, clock=t.clock, sleep=t.sleeper("limiter")),
        sleep=t.sleeper("retry"),
        transport=httpx.MockTransport(handler),
    )


def test_retry_after_is_honoured_and_slows_the_shared_limiter() -> None:
    refused = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["symbol"] == "AAPL" and not refused:
            refused.append(request)
            return httpx.Response(429, headers={"Retry-After": "7"})
        return httpx.Response(200, json=[])

    t = FakeTime()
    client = paced_client(handler, t, attempts=1)

    async def two_tickers() -> tuple[BaseException | None, Any]:
        async with client:
            try:
                await client.get_json("/stable/x", {"symbol": "AAPL"})
            except RetriableApiError as exc:
                first: BaseException | None = exc
            # Another ticker, on the same limiter: it waits out the pause the 429 set.
            return first, await client.get_json("/stable/x", {"symbol": "MSFT"})

    first, second = asyncio.run(two_tickers())
    assert isinstance(first, RetriableApiError)
    assert first.retry_after == 7.0
    assert second == []
    assert t.waits == [("limiter", 7.0)]


def test_a_retry_after_wait_also_serves_the_limiter_pause() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "7"})
        return httpx.Response(200, json=[])

    t = FakeTime()
    client = paced_client(handler, t, attempts=3)
    assert asyncio.run(fetch(client)) == []
    # The retry waited the 7 s; by then the limiter's pause is over: no second wait.
    assert t.waits == [("retry", 7.0)]
    assert t.now == 107.0


NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        pytest.param(None, None, id="missing"),
        pytest.param("", None, id="empty"),
        pytest.param("12", 12.0, id="seconds"),
        pytest.param(" 12 ", 12.0, id="seconds-padded"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("0.2", 0.2, id="fraction"),
        pytest.param("120", 120.0, id="exactly-the-cap"),
        pytest.param("999999", 120.0, id="huge"),
        pytest.param("9" * 400, 120.0, id="400-digits"),
        pytest.param("1e400", 120.0, id="overflows-to-inf"),
        pytest.param("inf", 120.0, id="inf"),
        pytest.param("Infinity", 120.0, id="infinity"),
        pytest.param("-inf", 0.0, id="minus-inf"),
        pytest.param("-5", 0.0, id="negative"),
        pytest.param("nan", None, id="nan"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("12abc", None, id="number-and-garbage"),
        pytest.param("1_000", None, id="underscore"),
        pytest.param("x" * 5000, None, id="long-garbage"),
        pytest.param("Mon, 23 Nov 2026 12:00:30 GMT", 30.0, id="http-date"),
        pytest.param("Mon, 23 Nov 2026 11:00:00 GMT", 0.0, id="http-date-past"),
        pytest.param("Fri, 31 Dec 9999 23:59:59 GMT", 120.0, id="http-date-year-9999"),
        pytest.param("Mon, 99 Nov 2026 12:00:30 GMT", None, id="http-date-impossible"),
    ],
)
def test_retry_after_values(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW, cap=120.0) == seconds


def test_every_policy_wait_is_capped() -> None:
    policy = RetryPolicy(max_wait=60, initial_wait=10, max_backoff=1000, jitter=0.0)
    waits = [
        policy.wait_seconds(1, RetriableApiError("x", retry_after=value))
        for value in (1e6, float("inf"), float("nan"), -5.0, 7.0)
    ]
    assert waits == [60.0, 60.0, 60.0, 0.0, 7.0]
    assert [policy.wait_seconds(n, None) for n in (1, 2, 3, 10_000)] == [10.0, 20.0, 40.0, 60.0]
    with pytest.raises(ValueError, match="positive"):
        RetryPolicy(max_wait=float("inf"))


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("inf", id="inf"),
        pytest.param("999999", id="huge"),
        pytest.param("Fri, 31 Dec 9999 23:59:59 GMT", id="http-date-year-9999"),
    ],
)
def test_a_hostile_retry_after_holds_nobody_longer_than_the_cap(header: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["symbol"] == "AAPL":
            return httpx.Response(429, headers={"Retry-After": header})
        return httpx.Response(200, json=[])

    t = FakeTime()
    client = paced_client(handler, t, attempts=3, max_wait=120.0)

    async def run() -> Any:
        async with client:
            with pytest.raises(RetriableApiError):
                await client.get_json("/stable/x", {"symbol": "AAPL"})
            return await client.get_json("/stable/x", {"symbol": "MSFT"})

    assert asyncio.run(run()) == []
    # Two capped retry waits for the refused ticker; the next ticker's limiter wait is the
    # last pause, capped too: nothing waits forever, whatever the header said.
    assert t.waits == [("retry", 120.0), ("retry", 120.0), ("limiter", 120.0)]


def test_fatal_is_not_retried_and_names_the_key_problem() -> None:
    client = client_for(answer(401), key_hint="DIP_API_KEY or the DIP block's api_key")
    with pytest.raises(FatalApiError, match="rejected the key") as caught:
        asyncio.run(fetch(client))
    assert client.requests_sent == 1
    assert "check DIP_API_KEY or the DIP block's api_key" in str(caught.value)
    assert "MARKET_API_KEY" not in str(caught.value)


def test_key_is_sent_but_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.get("apikey"))
        return httpx.Response(500, text=f"echo apikey={KEY}")

    client = client_for(handler)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ApiError) as caught:
        asyncio.run(fetch(client))
    assert seen == [KEY, KEY, KEY]
    assert KEY not in repr(client)
    assert KEY not in str(caught.value)
    assert KEY not in caplog.text
    assert "retrying" in caplog.text


# --- where the key goes, and where it never goes ---------------------------------------


@pytest.mark.parametrize("auth", ["query", "header"])
def test_the_key_goes_where_the_auth_mode_says(auth: AuthMode) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[])

    assert asyncio.run(fetch(client_for(handler, auth=auth))) == []
    (request,) = seen
    if auth == "header":
        assert request.headers["Authorization"] == f"ApiKey {KEY}"
        assert KEY not in str(request.url)
    else:
        assert request.url.params["apikey"] == KEY
        assert "Authorization" not in request.headers


@pytest.mark.parametrize("auth", ["query", "header"])
def test_a_redirect_to_another_host_never_receives_the_key(auth: AuthMode) -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "api.test":
            # The path and query of the target are the server's to choose: keep them out.
            location = f"https://evil.test:8443/collect?stolen={KEY}"
            return httpx.Response(301, headers={"Location": location})
        return httpx.Response(200, json=[{"stolen": True}])

    client = client_for(handler, auth=auth)
    with pytest.raises(ItemError) as caught:
        asyncio.run(fetch(client))
    assert hosts == ["api.test"]  # answered once, never followed, not retried
    message = str(caught.value)
    assert "answered 301, a redirect to https://evil.test:8443" in message
    assert KEY not in message
    assert "stolen" not in message


def test_an_error_body_that_echoes_the_key_in_plain_words_is_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No "apikey=" in sight: only the registered value itself can be recognised.
    body = f"Invalid key {KEY} for this plan".encode()
    client = client_for(answer(400, body), auth="header")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ItemError) as caught:
        asyncio.run(fetch(client))
    assert str(caught.value).endswith(": Invalid key *** for this plan")
    assert KEY not in caplog.text


def test_control_characters_from_upstream_are_escaped() -> None:
    body = "bad symbol \x1b[2J\x1b[31mred\u202eevil\x00\r\nnext line".encode()
    with pytest.raises(ItemError) as caught:
        asyncio.run(fetch(client_for(answer(400, body))))
    message = str(caught.value)
    assert message.endswith(r"bad symbol \x1b[2J\x1b[31mred\u202eevil\x00\x0d\x0anext line")
    assert not any(ord(c) < 0x20 or c == "\u202e" for c in message)


def test_only_the_head_of_an_error_body_is_read_and_shown() -> None:
    body = b"E" * 10_000_000
    with pytest.raises(ItemError) as caught:
        asyncio.run(fetch(client_for(answer(404, body))))
    assert str(caught.value).endswith(": " + "E" * 117 + "...")


# --- decoding: nothing in a body can crash the run ---------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"[" * 5000 + b"]" * 5000, "JSON nested too deeply", id="5000-nested"),
        pytest.param(b"[" + b"9" * 5000 + b"]", "integer of 5000 digits", id="5000-digits"),
        pytest.param(b"[" + b"9" * 1001 + b"]", "integer of 1001 digits", id="1001-digits"),
        pytest.param(b'[{"a": 1', "not JSON (Expecting", id="truncated"),
        pytest.param(b'["\xff\xfe"]', "not JSON (not UTF-8 text)", id="not-utf8"),
        pytest.param(b"<html>oops</html>", "not JSON", id="html"),
        pytest.param(b"  \r\n ", "an empty body", id="whitespace"),
    ],
)
def test_undecodable_bodies_fail_the_item_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(ItemError, match="answered 200 with") as caught:
        asyncio.run(fetch(client_for(answer(200, body))))
    assert reason in str(caught.value)


def test_a_long_but_sane_integer_decodes_for_validation_to_judge() -> None:
    # 400 digits decode (cheaply); whether it fits a column is the source's check.
    payload = asyncio.run(fetch(client_for(answer(200, b"[" + b"7" * 400 + b"]"))))
    assert payload == [int("7" * 400)]


# --- size: refused while it streams -------------------------------------------------------


class CountingStream(httpx.AsyncByteStream):
    """A body that is produced only as it is read, and counts what was read."""

    def __init__(self, chunks: int, chunk: bytes) -> None:
        self.chunks, self.chunk, self.served = chunks, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.served += len(self.chunk)
            yield self.chunk


def test_a_declared_content_length_over_the_cap_is_refused_before_reading() -> None:
    stream = CountingStream(1000, b"x" * 65536)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(1000 * 65536)}, stream=stream)

    client = client_for(handler, max_response_bytes=1_000_000)
    with pytest.raises(ItemError, match="answered more than 1000000 bytes"):
        asyncio.run(fetch(client))
    assert stream.served == 0
    assert client.requests_sent == 1  # too large is not worth retrying


def test_an_undeclared_body_over_the_cap_stops_being_read_at_the_cap() -> None:
    stream = CountingStream(1000, b"x" * 65536)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=stream)

    with pytest.raises(ItemError, match="answered more than 1000000 bytes"):
        asyncio.run(fetch(client_for(handler, max_response_bytes=1_000_000)))
    assert stream.served == 16 * 65536  # the first chunk past 1,000,000 bytes, no more


def gzip_of_zeros(size: int) -> bytes:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    out = [squeeze.compress(block) for _ in range(size >> 20)]
    return b"".join([*out, squeeze.flush()])


def test_a_gzip_bomb_is_inflated_no_further_than_the_cap() -> None:
    bomb = gzip_of_zeros(64 << 20)  # 64 MiB of zeros in about 64 KB
    assert len(bomb) < 1 << 20

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, stream=CountingStream(1, bomb)
        )

    tracemalloc.start()
    try:
        with pytest.raises(ItemError, match="answered more than 2000000 bytes"):
            asyncio.run(fetch(client_for(handler, max_response_bytes=2_000_000)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20  # the cap and a few buffers, not 64 MiB


@pytest.mark.parametrize(
    ("encoding", "pack"),
    [
        pytest.param("gzip", gzip.compress, id="gzip"),
        pytest.param("deflate", zlib.compress, id="deflate-zlib"),
        pytest.param(
            "deflate",
            lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS),
            id="deflate-raw",
        ),
    ],
)
def test_compressed_answers_under_the_cap_decode(
    encoding: str, pack: Callable[[bytes], bytes]
) -> None:
    body = b'[{"symbol": "AAPL", "close": 1.5}]'
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Accept-Encoding"])
        return httpx.Response(
            200, headers={"Content-Encoding": encoding}, stream=CountingStream(1, pack(body))
        )

    assert asyncio.run(fetch(client_for(handler))) == [{"symbol": "AAPL", "close": 1.5}]
    assert seen == ["gzip, deflate"]  # only what can be inflated under the cap


def test_an_encoding_that_cannot_be_bounded_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Encoding": "br"}, stream=CountingStream(1, b"?")
        )

    with pytest.raises(ItemError, match=r"an encoding syncpoint cannot read \(br\)"):
        asyncio.run(fetch(client_for(handler)))


# --- a real socket: what only a network shows -------------------------------------------

Behaviour = Callable[[socket.socket, "Loopback"], None]


class Loopback:
    """A tiny HTTP server on 127.0.0.1 with one scripted behaviour per connection.

    Counts the body bytes it managed to hand to the kernel (`sent`) and keeps each
    request's head, so a test can tell how far a client read and what it sent.
    """

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.sent = 0
        self.heads: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()
        return f"http://{host}:{port}"

    def __enter__(self) -> Loopback:
        self._acceptor.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._closing.set()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.heads.append(head.decode("latin-1"))
            # The client hanging up mid-answer is what several tests are about.
            with contextlib.suppress(OSError):
                self.behaviour(conn, self)

    def send_body(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def stopping(self) -> bool:
        return self._closing.is_set()


def loopback_client(
    url: str, *, attempts: int = 1, sleeps: list[float] | None = None, **options: Any
) -> ApiClient:
    recorded = sleeps if sleeps is not None else []

    async def sleep(seconds: float) -> None:
        recorded.append(seconds)

    return ApiClient(
        url,
        api_key=SecretStr(KEY),
        policy=RetryPolicy(attempts=attempts, jitter=0.0),
        sleep=sleep,
        **options,
    )


def test_a_trickling_body_ends_at_the_request_deadline() -> None:
    def trickle(conn: socket.socket, server: Loopback) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        conn.sendall(b"Content-Length: 100000\r\n\r\n[")
        while not server.stopping():  # one byte every 20 ms: no read ever times out
            server.send_body(conn, b" ")
            time.sleep(0.02)

    sleeps: list[float] = []
    with Loopback(trickle) as server:
        client = loopback_client(server.url, attempts=2, sleeps=sleeps, timeout=5.0, deadline=0.4)
        started = time.monotonic()
        with pytest.raises(RetriableApiError, match=r"no complete answer within the 0.4s"):
            asyncio.run(fetch(client))
        elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 2.0  # two attempts of 0.4 s; httpx's 5 s read timeout never fired
    assert client.requests_sent == 2
    assert sleeps == [0.5]  # a deadline is worth a retry, on the usual schedule


def test_an_endless_body_is_cut_off_at_the_cap_while_it_streams() -> None:
    total = 512 << 20

    def endless(conn: socket.socket, server: Loopback) -> None:
        # No Content-Length: the size is known only by reading, so the cap must act mid-stream.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n["
        )
        chunk = b"1," * 32768
        while server.sent < total and not server.stopping():
            server.send_body(conn, chunk)

    with Loopback(endless) as server:
        client = loopback_client(server.url, max_response_bytes=1 << 20)
        with pytest.raises(ItemError, match=r"answered more than 1048576 bytes"):
            asyncio.run(fetch(client))
        time.sleep(0.2)  # let the server notice the hang-up
        sent = server.sent
    # The client stopped reading at 1 MiB: the server got no further than what the
    # kernel's socket buffers hold, a small fraction of the 512 MiB it had to give.
    assert sent < 8 << 20
    assert client.requests_sent == 1


def test_a_connection_reset_mid_body_is_retried_then_transient() -> None:
    def reset(conn: socket.socket, server: Loopback) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        server.send_body(conn, b"[" + b"1," * 500)
        # SO_LINGER with a zero timeout: close() sends a RST, not a FIN.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    sleeps: list[float] = []
    with Loopback(reset) as server:
        client = loopback_client(server.url, attempts=3, sleeps=sleeps)
        with pytest.raises(RetriableApiError) as caught:
            asyncio.run(fetch(client))
    assert client.requests_sent == 3
    assert sleeps == [0.5, 1.0]
    assert "ReadError" in str(caught.value) or "RemoteProtocolError" in str(caught.value)
    assert KEY not in str(caught.value)


def answer_401(conn: socket.socket, server: Loopback) -> None:
    body = b'{"code":401,"message":"An API key is required"}'
    conn.sendall(
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


@pytest.mark.parametrize(
    ("block", "in_header", "hint"),
    [
        pytest.param(DipApi, True, "DIP_API_KEY", id="dip-header"),
        pytest.param(DipApi, False, "DIP_API_KEY", id="dip-query"),
        pytest.param(MarketApi, False, "MARKET_API_KEY", id="market-query"),
    ],
)
def test_each_block_sends_its_key_its_way_and_names_its_own_variables(
    block: type[MarketApi], in_header: bool, hint: str
) -> None:
    dip_key = "k" * 42
    with Loopback(answer_401) as server:
        options: dict[str, Any] = {"key_in_header": in_header} if block is DipApi else {}
        api = block(base_url=server.url, api_key=SecretStr(dip_key), **options)
        try:
            with pytest.raises(FatalApiError) as caught:
                asyncio.run(fetch(api.client()))
        finally:
            drop_limiter(server.url)
    request_line, headers = server.heads[0].split("\r\n", 1)
    assert (f"Authorization: ApiKey {dip_key}" in headers) is in_header
    assert (dip_key in request_line) is not in_header
    message = str(caught.value)
    assert f"check {hint} or the Syncpoint" in message
    assert ({"DIP_API_KEY", "MARKET_API_KEY"} - {hint}).pop() not in message
    # Building the client registered the key: it is masked in any words from now on.
    assert redact(f"the server said {dip_key}") == "the server said ***"


# --- a stop cuts every wait short ---------------------------------------------------------


def stop_soon(after: float) -> threading.Thread:
    """Request a stop from another thread, as a signal handler or Prefect would."""
    flag = StopFlag()

    def later() -> None:
        time.sleep(after)
        flag.request("test stop")

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def test_a_stop_cuts_a_100_second_retry_after_short_and_ends_the_request() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(429, headers={"Retry-After": "100"})

    # The real, interruptible sleep: only the clock of the limiter is ours.
    t = FakeTime()
    client = ApiClient(
        "http://api.test",
        api_key=SecretStr(KEY),
        policy=RetryPolicy(attempts=5, jitter=0.0),
        limiter=RateLimiter(None, clock=t.clock),
        transport=httpx.MockTransport(handler),
    )
    stopper = stop_soon(0.2)
    started = time.monotonic()
    with pytest.raises(RetriableApiError, match=r"stopped while waiting 100.0s") as caught:
        asyncio.run(fetch(client))
    elapsed = time.monotonic() - started
    stopper.join(1)
    assert 0.2 <= elapsed < 1.5
    assert len(calls) == 1  # no attempt after the stop
    assert KEY not in str(caught.value)


def test_after_a_stop_no_retry_starts_even_for_a_short_wait() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        StopFlag().request("stopped by the first answer")
        return httpx.Response(503)

    client = ApiClient(
        "http://api.test",
        policy=RetryPolicy(attempts=5, jitter=0.0, initial_wait=0.0),
        transport=httpx.MockTransport(handler),
    )
    with pytest.raises(RetriableApiError, match=r"stopped while waiting 0\.0s"):
        asyncio.run(fetch(client))
    assert len(calls) == 1
