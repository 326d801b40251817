"""The HTTP boundary: every response and transport error is classified here, once.

- 2xx with JSON          -> the decoded payload
- 401/403                -> FatalApiError (stop the run: the key is refused)
- 408/429/5xx, timeouts,
  dropped connections,
  the request deadline   -> RetriableApiError, retried by the one RetryPolicy
- 3xx                    -> ItemError, never followed (the key would go along)
- other 4xx, non-JSON,
  too large, too deep    -> ItemError (this item fails for good, the run goes on)

Nothing an API answers is trusted: the body is read as a stream and refused once it passes
`max_response_bytes` (compressed bodies are inflated under the same cap), every attempt has
a total deadline (httpx's timeout is per read, so a server trickling a byte a second would
otherwise hold a request forever), JSON is decoded with bounded integers and nesting, every
wait is capped (RetryPolicy.max_wait) and ends early when a stop is requested.

The key travels as the `apikey` query parameter or in the `Authorization: ApiKey` header;
no URL leaves this module unredacted, and upstream text in messages goes through
`printable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import random
import re
import ssl
import threading
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import httpx
import orjson
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from syncpoint.core.errors import ApiError, ConfigError, FatalApiError, ItemError, RetriableApiError
from syncpoint.core.interrupts import WaitInterrupted, interruptible_sleep
from syncpoint.core.rate_limit import DEFAULT_MAX_WAIT, RateLimiter, bounded_wait, check_max_wait
from syncpoint.core.redact import RedactingFilter, printable, redact, redact_url, register_secret

logger = logging.getLogger("syncpoint.core.http")


def _redact_library_loggers() -> None:
    """httpx logs every request URL at INFO, key included: mask it at the source."""
    for name in ("httpx", "httpcore"):
        library = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in library.filters):
            library.addFilter(RedactingFilter())


_redact_library_loggers()

Sleep = Callable[[float], Awaitable[None]]

# A pool per connection. Each time a request joins or leaves an httpx pool, httpcore checks
# every connection in it (getpeername and a poll, two system calls that each let go of
# the GIL; with the stage's thread busy in Python, taking it back waits up to a switch
# interval). A backfill at concurrency 16 (bench case 8, by hand) took 32 s with 8
# connections a pool, 26 s with one, and the hand-written script 29 s. With one there is
# one to check; a request goes to the pool with the fewest in flight (ApiClient._get_once).
CONNECTIONS_PER_POOL = 1
_RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# A few MiB holds any answer these endpoints give (five years of daily bars is ~250 KB; the
# full stock list ~6 MB) while 16 requests in flight stay far below a worker's memory.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# The whole attempt, connect to last byte: twice the default per-read timeout, so only an
# answer that keeps arriving too slowly for too long is cut.
DEFAULT_REQUEST_DEADLINE = 60.0
# Error answers are read only this far: enough for a message, nothing for a hostile body.
ERROR_BODY_BYTES = 4096
SNIPPET_CHARS = 120
# Far beyond any column type (a BIGINT has 19 digits) yet below Python's own 4,300-digit
# ceiling, so a body of huge integers costs linear time and says what it was. Values that
# decode but do not fit a column are the sources' validation to refuse.
MAX_INT_DIGITS = 1000
DEFAULT_KEY_HINT = "the configured API key"
# Only the encodings this module can inflate under the size cap (httpx would add br/zstd
# when their packages happen to be installed).
ACCEPT_ENCODING = "gzip, deflate"

AuthMode = Literal["query", "header"]

# RFC 9110 delta-seconds is digits; real servers also send "0.2". Anything else numeric
# looking ("1e9", "inf", "nan", "-5") is matched too, so it can be judged rather than
# mistaken for a date.
_NUMERIC = re.compile(
    r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf(?:inity)?|nan)", re.IGNORECASE
)
# Longer is not a header value a server means; it is not worth parsing.
_MAX_HEADER_CHARS = 1000


def parse_retry_after(
    value: str | None, *, now: datetime | None = None, cap: float = DEFAULT_MAX_WAIT
) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), in [0, cap].

    None when the header is missing or means nothing (garbage, NaN): the caller's own
    backoff applies. Never infinite, never negative, never above `cap`: "inf" or a date in
    the year 9999 is an API asking for the longest wait there is, which is `cap`.
    """
    if not value:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_HEADER_CHARS:
        return None
    if _NUMERIC.fullmatch(value):
        seconds = float(value)  # a 400-digit value is inf here, never an error
        return None if math.isnan(seconds) else bounded_wait(seconds, cap)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return bounded_wait((when - (now or datetime.now(UTC))).total_seconds(), cap)


def classify_response(
    response: httpx.Response,
    body: bytes | None = None,
    *,
    key_hint: str = DEFAULT_KEY_HINT,
    max_wait: float = DEFAULT_MAX_WAIT,
) -> Any:
    """The JSON payload of a good response, or the ApiError that says what went wrong.

    `body` is what was read of it (all of a 2xx body, the head of an error body); by
    default the response's own content, for a response already read.
    """
    if body is None:
        body = response.content
    status = response.status_code
    url = redact_url(response.request.url) if _has_request(response) else ""
    where = f"{url} answered {status}"
    if status in (401, 403):
        raise FatalApiError(
            f"the API rejected the key ({status}); check {key_hint}",
            status_code=status,
            url=url,
        )
    if status in _RETRIABLE_STATUS:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), cap=max_wait)
        raise RetriableApiError(where, status_code=status, url=url, retry_after=retry_after)
    if 300 <= status < 400:
        raise ItemError(
            f"{where}, a redirect to {_location(response)}: not followed, so the key never "
            "goes to another address; point the base URL at the final address",
            status_code=status,
            url=url,
        )
    if 400 <= status < 600:
        raise ItemError(where + _snippet(body), status_code=status, url=url)
    if not 200 <= status < 300:
        raise ItemError(f"{where}: unexpected status", status_code=status, url=url)
    return decode_json(body, where, url=url)


class _TooManyDigits(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(f"an integer of {digits} digits")


def _bounded_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise _TooManyDigits(digits)
    return int(text)


def decode_json(body: bytes, where: str, *, url: str = "") -> Any:
    """`body` as JSON, or an ItemError saying why not; nothing it holds can crash the run.

    `where` begins the message ("URL answered 200"). Nesting is bounded by the
    interpreter's recursion limit, caught here: a body of 5,000 `[` is one failed item.
    """
    if not body.strip():
        raise ItemError(f"{where} with an empty body", url=url)
    try:
        # orjson (Prefect's own dependency) decodes a backfill's answers three times as
        # fast, within its own bounds: nesting to 1,024, integers to 64 bits (a longer
        # one arrives as the nearest float, which no column here takes as an integer).
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # the standard decoder below says why, or takes what orjson does not (NaN)
    try:
        return json.loads(body, parse_int=_bounded_int)
    except RecursionError:
        reason = "JSON nested too deeply"
    except UnicodeDecodeError:
        reason = "a body that is not JSON (not UTF-8 text)"
    except _TooManyDigits as exc:
        reason = f"JSON holding {exc}"
    except ValueError as exc:
        reason = f"a body that is not JSON ({printable(str(exc), 80)})"
    raise ItemError(f"{where} with {reason}", url=url)


def classify_exception(exc: httpx.HTTPError, url: str = "") -> ApiError | ConfigError:
    """Transport failures: timeouts and dropped connections are worth retrying."""
    url = redact_url(url)
    kind = type(exc).__name__
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ConfigError(f"bad API URL {url}: {printable(redact(str(exc)))}")
    if isinstance(exc, httpx.TimeoutException | httpx.TransportError):
        detail = printable(redact(str(exc))) or "no detail"
        return RetriableApiError(f"{url}: {kind} ({detail})", url=url)
    return RetriableApiError(f"{url}: {kind}", url=url)


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy: exponential backoff with jitter, Retry-After honoured.

    `max_backoff` shapes the schedule; `max_wait` is the one cap on any wait, Retry-After
    included (the same cap the rate limiter's pauses have).
    """

    attempts: int = 5
    initial_wait: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.5
    max_wait: float = DEFAULT_MAX_WAIT

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        check_max_wait(self.max_wait)

    def wait_seconds(self, attempt: int, error: BaseException | None) -> float:
        """The pause after failed attempt number `attempt` (1-based), within [0, max_wait]."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return bounded_wait(float(retry_after), self.max_wait)
        # The exponent is bounded so a long policy cannot overflow a float.
        backoff = min(self.max_backoff, self.initial_wait * 2 ** min(attempt - 1, 64))
        jitter = random.uniform(0, self.jitter) if self.jitter else 0.0
        return bounded_wait(backoff + jitter, self.max_wait)

    def retrying(self, *, sleep: Sleep = interruptible_sleep) -> AsyncRetrying:
        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(state.attempt_number, error)

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            logger.info(
                "retrying in %.1fs after attempt %d/%d: %s",
                state.next_action.sleep if state.next_action else 0.0,
                state.attempt_number,
                self.attempts,
                redact(str(error)),
            )

        return AsyncRetrying(
            sleep=sleep,
            stop=stop_after_attempt(self.attempts),
            wait=wait,
            retry=retry_if_exception_type(RetriableApiError),
            before_sleep=before_sleep,
            reraise=True,
        )


class ApiClient:
    """Async JSON client for one API: pacing, retries and classification in one place.

    Open with `async with`; counters tell what it cost (requests, retries, statuses).
    `auth` says where the key goes: the `apikey` query parameter, or the header
    `Authorization: ApiKey <key>` (which keeps it out of every URL). `key_hint` names
    where the key is configured, for the message when the API refuses it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: SecretStr | None = None,
        auth: AuthMode = "query",
        key_hint: str = DEFAULT_KEY_HINT,
        concurrency: int = 16,
        limiter: RateLimiter | None = None,
        policy: RetryPolicy | None = None,
        timeout: float = 30.0,
        deadline: float = DEFAULT_REQUEST_DEADLINE,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        sleep: Sleep = interruptible_sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        if auth not in ("query", "header"):
            raise ConfigError(f"auth must be 'query' or 'header', not {auth!r}")
        if not (math.isfinite(deadline) and deadline > 0):
            raise ConfigError("the request deadline must be a positive number of seconds")
        if max_response_bytes < 1:
            raise ConfigError("max_response_bytes must be at least 1")
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        # An upstream error body may echo the key in any words: mask the value itself.
        register_secret(api_key)
        self._auth = auth
        self.key_hint = key_hint
        self.concurrency = concurrency
        self.policy = policy or RetryPolicy()
        self.limiter = limiter or RateLimiter(None, max_wait=self.policy.max_wait)
        self._timeout = timeout
        self.deadline = float(deadline)
        self.max_response_bytes = max_response_bytes
        self._sleep = sleep
        self._transport = transport
        self._pools: list[httpx.AsyncClient] = []
        # Requests each pool has in flight, shared with every share() view: a request
        # goes to the least busy pool.
        self._load: list[int] = []
        # False for a view from share(): its pools belong to the client it was made from.
        self._owns_pools = True
        self.requests_sent = 0
        self.retries = 0
        self.responses_by_status: Counter[int] = Counter()

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r}, key={'***' if self._key else None})"

    async def __aenter__(self) -> ApiClient:
        if not self._owns_pools:
            return self  # a view from share(): the pools are open already
        count = 1 if self._transport else -(-self.concurrency // CONNECTIONS_PER_POOL)
        per_pool = -(-self.concurrency // count)
        # One SSL context for all the pools: httpx loads the CA bundle for each it makes.
        verify: ssl.SSLContext | bool = True if self._transport else httpx.create_ssl_context()
        self._pools = [
            httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                transport=self._transport,
                verify=verify,
                headers={
                    "Accept": "application/json",
                    "Accept-Encoding": ACCEPT_ENCODING,
                    "User-Agent": "syncpoint",
                },
            )
            for _ in range(count)
        ]
        self._load = [0] * count
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_pools:
            await asyncio.gather(*(pool.aclose() for pool in self._pools), return_exceptions=True)
        self._pools, self._load = [], []

    def share(self) -> ApiClient:
        """A view of this open client with counters of its own: same pools, limiter and
        policy, so a batch counts its own requests while connections outlive it.

        Use it on the event loop this client was opened on (httpx pools belong to one
        loop); leaving it with `async with` leaves the pools open.
        """
        if not self._pools:
            raise RuntimeError("share() needs an open client (inside `async with`)")
        view = copy.copy(self)
        view._owns_pools = False
        view.requests_sent, view.retries = 0, 0
        view.responses_by_status = Counter()
        return view

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET path with params (the key added), retried per policy; the decoded JSON.

        A stop request during any wait (pacing, backoff, Retry-After) ends the request as
        a RetriableApiError without another attempt: the item stays pending for the next
        run.
        """
        if not self._pools:
            raise RuntimeError("ApiClient used outside `async with`")
        query = dict(params or {})
        headers: dict[str, str] = {}
        if self._key is not None:
            if self._auth == "header":
                headers["Authorization"] = f"ApiKey {self._key.get_secret_value()}"
            else:
                query["apikey"] = self._key.get_secret_value()
        try:
            async for attempt in self.policy.retrying(sleep=self._sleep):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.retries += 1
                    return await self._get_once(path, query, headers)
        except WaitInterrupted as stopped:
            shown = redact_url(_with_query(f"{self.base_url}{path}", query))
            raise RetriableApiError(
                f"stopped while waiting {stopped.seconds:.1f}s to request {shown}: "
                "a stop was requested; the item is left for the next run",
                url=shown,
            ) from None
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def _get_once(self, path: str, query: dict[str, str], headers: dict[str, str]) -> Any:
        await self.limiter.acquire()
        self.requests_sent += 1
        load = self._load
        pool = load.index(min(load))
        load[pool] += 1
        try:
            # httpx's timeout bounds each read; this bounds the whole exchange.
            async with asyncio.timeout(self.deadline):
                return await self._exchange(self._pools[pool], path, query, headers)
        except TimeoutError:
            shown = redact_url(_with_query(f"{self.base_url}{path}", query))
            raise RetriableApiError(
                f"{shown}: no complete answer within the {self.deadline:g}s request deadline",
                url=shown,
            ) from None
        except httpx.HTTPError as exc:
            # `from None`: the httpx exception's own text and chain may hold the raw URL.
            raise classify_exception(exc, _with_query(f"{self.base_url}{path}", query)) from None
        finally:
            load[pool] -= 1

    async def _exchange(
        self,
        pool: httpx.AsyncClient,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
    ) -> Any:
        async with pool.stream("GET", path, params=query, headers=headers) as response:
            status = response.status_code
            self.responses_by_status[status] += 1
            if status == 429:
                wait = parse_retry_after(
                    response.headers.get("Retry-After"), cap=self.policy.max_wait
                )
                self.limiter.pause(wait if wait is not None else self.policy.initial_wait)
            if 200 <= status < 300:
                body = await read_capped(response, self.max_response_bytes)
                if body is None:
                    url = redact_url(response.request.url)
                    raise ItemError(
                        f"{url} answered more than {self.max_response_bytes} bytes "
                        "(max_response_bytes); the rest was not read",
                        status_code=status,
                        url=url,
                    )
            else:
                # Only a message's worth of an error body; nothing else in it matters.
                body = await read_capped(response, ERROR_BODY_BYTES, truncate=True) or b""
            return classify_response(
                response, body, key_hint=self.key_hint, max_wait=self.policy.max_wait
            )


T = TypeVar("T")


class ClientThread:
    """One open ApiClient for a whole stage, on an event loop of its own.

    Prefect runs each task run in a worker thread, and an httpx pool belongs to the event
    loop that first used it. A client per task run therefore means new pools, new
    connections and an SSL context per batch (httpx loads the CA bundle for every client,
    http:// included): at 50 tickers a batch that was a fifth of a run's CPU. Here the
    client lives on one loop in one daemon thread, opened once; `run()` hands a batch's
    work to that loop and waits for it in the task's thread. Connections stay alive across
    batches, as in a hand-written script.

    A batch costs a thread hop instead of new pools and new connections. Work a batch
    leaves behind on the loop (an item still waiting when a sibling raised) is cancelled
    when the stage closes the client, so nothing outlives the stage.
    """

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ClientThread:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name="syncpoint-http", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop
        try:
            asyncio.run_coroutine_threadsafe(self.client.__aenter__(), loop).result()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is None:
            return
        try:
            closing = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
            closing.result(timeout=30)
        finally:
            self._stop()

    async def _close(self) -> None:
        """Cancel whatever still runs on the loop, then close the client.

        As asyncio.run does on exit: work left pending on a stopped loop never finishes,
        and anything it waits for (a Prefect global-limit slot) keeps the process alive.
        """
        me = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not me]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await self.client.__aexit__(None, None, None)

    def _stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop, self._thread = None, None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=30)
        if not loop.is_running():
            loop.close()

    def call_soon(self, callback: Callable[[], object]) -> None:
        """`callback()` on the client's loop, from any thread; nothing once it has closed."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closing meanwhile
                loop.call_soon_threadsafe(callback)

    def run(self, work: Callable[[ApiClient], Awaitable[T]]) -> T:
        """`work(view)` on the client's loop, waited for from the calling thread (a Prefect
        task's worker thread, which has no loop of its own); `view` is a share() of the
        client, so its counters are this call's alone. If the wait ends early (an
        exception in the caller), the work is cancelled."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("ClientThread used outside `with`")

        async def on_loop() -> T:
            return await work(self.client.share())

        # The coroutine is created here but runs on `loop`: its context (a Prefect task
        # run's) is not there, which is why callers take their logger beforehand.
        future = asyncio.run_coroutine_threadsafe(on_loop(), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


class _Inflater(Protocol):
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class _Identity:
    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        return data


class _Deflate:
    """zlib-wrapped deflate, or raw deflate from servers that skip the wrapper (as httpx)."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj()
        self._first = True

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes:
        if self._first:
            self._first = False
            try:
                return self._inner.decompress(data, max_length)
            except zlib.error:
                self._inner = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._inner.decompress(data, max_length)


def _inflater(encoding: str | None) -> _Inflater | None:
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return _Identity()
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if name == "deflate":
        return _Deflate()
    return None


async def read_capped(
    response: httpx.Response, limit: int, *, truncate: bool = False
) -> bytes | None:
    """The response body, decoded, read as it streams and never more than `limit` bytes.

    None when it is longer (the rest is not read; the connection is dropped), or with
    `truncate` its first `limit` bytes. A declared Content-Length over the limit is refused
    before a byte is read. Compressed bodies are inflated with zlib's `max_length`, so a
    small gzip of a gigabyte of zeros costs at most `limit` bytes too.
    """
    declared = response.headers.get("Content-Length", "").strip()
    if not truncate and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        return None
    if response.is_stream_consumed:
        # A transport that hands over whole bodies (httpx.MockTransport with bytes): the
        # body is in memory already, decoded by httpx; only the cap is left to apply.
        content = response.content
        if len(content) > limit:
            return content[:limit] if truncate else None
        return content
    inflater = _inflater(response.headers.get("Content-Encoding"))
    if inflater is None:
        if truncate:
            return b""
        url = redact_url(response.request.url)
        encoding = printable(response.headers.get("Content-Encoding", ""), 40)
        raise ItemError(f"{url} answered in an encoding syncpoint cannot read ({encoding})")
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            # zlib's max_length 0 means "all": room is at least 1 while body <= limit.
            body += inflater.decompress(chunk, limit + 1 - len(body))
            if len(body) > limit:
                return bytes(body[:limit]) if truncate else None
    except zlib.error:
        if truncate:
            return bytes(body)
        url = redact_url(response.request.url)
        raise ItemError(f"{url} answered a compressed body that does not inflate") from None
    return bytes(body)


def _with_query(url: str, query: Mapping[str, str]) -> str:
    return str(httpx.URL(url, params=dict(query)))


def _has_request(response: httpx.Response) -> bool:
    try:
        response.request  # noqa: B018 - raises when the response was built by hand
    except RuntimeError:
        return False
    return True


def _snippet(body: bytes) -> str:
    # Redact before cutting, so a cut never leaves a key's first half unmasked.
    text = printable(redact(body.decode("utf-8", "replace")).strip(), SNIPPET_CHARS)
    return f": {text}" if text else ""


def _location(response: httpx.Response) -> str:
    """Where a redirect points, as scheme://host[:port] only: its path or query may hold
    anything, the key included."""
    location = response.headers.get("Location")
    if not location:
        return "nowhere (no Location header)"
    try:
        target = httpx.URL(location)
        if _has_request(response):
            target = response.request.url.join(target)
    except (httpx.InvalidURL, ValueError, TypeError):
        return "an unreadable Location"
    port = f":{target.port}" if target.port else ""
    return printable(f"{target.scheme}://{target.host}{port}", 120)
