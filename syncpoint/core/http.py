"""The HTTP boundary: every response and transport error is classified here, once.

- 2xx with JSON          -> the decoded payload
- 401/403                -> FatalApiError (stop the run: the key is refused)
- 408/429/5xx, timeouts,
  dropped connections    -> RetriableApiError, retried by the one RetryPolicy
- other 4xx, non-JSON    -> ItemError (this item fails for good, the run goes on)

The key travels as the `apikey` query parameter; no URL leaves this module unredacted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from syncpoint.core.errors import ApiError, ConfigError, FatalApiError, ItemError, RetriableApiError
from syncpoint.core.rate_limit import RateLimiter
from syncpoint.core.redact import RedactingFilter, redact, redact_url

logger = logging.getLogger("syncpoint.core.http")


def _redact_library_loggers() -> None:
    """httpx logs every request URL at INFO, key included: mask it at the source."""
    for name in ("httpx", "httpcore"):
        library = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in library.filters):
            library.addFilter(RedactingFilter())


_redact_library_loggers()

Sleep = Callable[[float], Awaitable[None]]

# httpx's pool costs CPU per request that grows with its connection count; several small
# pools spread the same concurrency more cheaply than one large one.
CONNECTIONS_PER_POOL = 8
_RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify_response(response: httpx.Response) -> Any:
    """The JSON payload of a good response, or the ApiError that says what went wrong."""
    status = response.status_code
    url = redact_url(response.request.url) if _has_request(response) else ""
    where = f"{url} answered {status}"
    if status in (401, 403):
        raise FatalApiError(
            f"the API rejected the key ({status}); check MARKET_API_KEY or the block's key",
            status_code=status,
            url=url,
        )
    if status in _RETRIABLE_STATUS:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise RetriableApiError(where, status_code=status, url=url, retry_after=retry_after)
    if 400 <= status < 600:
        raise ItemError(where + _snippet(response), status_code=status, url=url)
    if not 200 <= status < 300:
        raise ItemError(f"{where}: unexpected status", status_code=status, url=url)
    try:
        return response.json()
    except ValueError:
        raise ItemError(f"{url} answered {status} with a body that is not JSON", url=url) from None


def classify_exception(exc: httpx.HTTPError, url: str = "") -> ApiError | ConfigError:
    """Transport failures: timeouts and dropped connections are worth retrying."""
    url = redact_url(url)
    kind = type(exc).__name__
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ConfigError(f"bad API URL {url}: {redact(str(exc))}")
    if isinstance(exc, httpx.TimeoutException | httpx.TransportError):
        detail = redact(str(exc)) or "no detail"
        return RetriableApiError(f"{url}: {kind} ({detail})", url=url)
    return RetriableApiError(f"{url}: {kind}", url=url)


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy: exponential backoff with jitter, Retry-After honoured."""

    attempts: int = 5
    initial_wait: float = 0.5
    max_wait: float = 30.0
    jitter: float = 0.5
    max_retry_after: float = 120.0

    def wait_seconds(self, attempt: int, error: BaseException | None) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after)
        backoff = min(self.max_wait, self.initial_wait * 2 ** (attempt - 1))
        return backoff + (random.uniform(0, self.jitter) if self.jitter else 0.0)

    def retrying(self, *, sleep: Sleep = asyncio.sleep) -> AsyncRetrying:
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
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: SecretStr | None = None,
        concurrency: int = 16,
        limiter: RateLimiter | None = None,
        policy: RetryPolicy | None = None,
        timeout: float = 30.0,
        sleep: Sleep = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self.concurrency = concurrency
        self.limiter = limiter or RateLimiter(None)
        self.policy = policy or RetryPolicy()
        self._timeout = timeout
        self._sleep = sleep
        self._transport = transport
        self._pools: list[httpx.AsyncClient] = []
        self._next_pool: itertools.cycle[httpx.AsyncClient] | None = None
        self.requests_sent = 0
        self.retries = 0
        self.responses_by_status: Counter[int] = Counter()

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r}, key={'***' if self._key else None})"

    async def __aenter__(self) -> ApiClient:
        count = 1 if self._transport else -(-self.concurrency // CONNECTIONS_PER_POOL)
        per_pool = -(-self.concurrency // count)
        self._pools = [
            httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                transport=self._transport,
                headers={"Accept": "application/json", "User-Agent": "syncpoint"},
            )
            for _ in range(count)
        ]
        self._next_pool = itertools.cycle(self._pools)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.gather(*(pool.aclose() for pool in self._pools), return_exceptions=True)
        self._pools, self._next_pool = [], None

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET path with params (the key added), retried per policy; the decoded JSON."""
        if self._next_pool is None:
            raise RuntimeError("ApiClient used outside `async with`")
        query = dict(params or {})
        if self._key is not None:
            query["apikey"] = self._key.get_secret_value()
        async for attempt in self.policy.retrying(sleep=self._sleep):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.retries += 1
                return await self._get_once(next(self._next_pool), path, query)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def _get_once(self, pool: httpx.AsyncClient, path: str, query: dict[str, str]) -> Any:
        await self.limiter.acquire()
        self.requests_sent += 1
        url = f"{self.base_url}{path}"
        try:
            response = await pool.get(path, params=query)
        except httpx.HTTPError as exc:
            # `from None`: the httpx exception's own text and chain may hold the raw URL.
            raise classify_exception(exc, _with_query(url, query)) from None
        self.responses_by_status[response.status_code] += 1
        if response.status_code == 429:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            self.limiter.pause(wait if wait is not None else self.policy.initial_wait)
        return classify_response(response)


def _with_query(url: str, query: Mapping[str, str]) -> str:
    return str(httpx.URL(url, params=dict(query)))


def _has_request(response: httpx.Response) -> bool:
    try:
        response.request  # noqa: B018 - raises when the response was built by hand
    except RuntimeError:
        return False
    return True


def _snippet(response: httpx.Response) -> str:
    text = redact(response.text[:120].strip()) if response.content else ""
    return f": {text}" if text else ""
