"""The HTTP boundary: one table of what each answer means, the retry schedule, secrets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from syncpoint.core.errors import ApiError, FatalApiError, ItemError, RetriableApiError
from syncpoint.core.http import ApiClient, RetryPolicy, parse_retry_after
from syncpoint.core.rate_limit import RateLimiter

KEY = "sekrit-KEY-123"


def client_for(handler: Any, *, attempts: int = 3, sleeps: list[float] | None = None) -> ApiClient:
    recorded = sleeps if sleeps is not None else []

    async def sleep(seconds: float) -> None:
        recorded.append(seconds)

    return ApiClient(
        "http://api.test",
        api_key=SecretStr(KEY),
        policy=RetryPolicy(attempts=attempts, jitter=0.0),
        sleep=sleep,
        transport=httpx.MockTransport(handler),
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
        pytest.param(400, b"bad symbol", ItemError, 1, id="400-item"),
        pytest.param(404, b"", ItemError, 1, id="404-item"),
        pytest.param(401, b"", FatalApiError, 1, id="401-fatal"),
        pytest.param(403, b"", FatalApiError, 1, id="403-fatal"),
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
    policy = RetryPolicy(initial_wait=1.0, jitter=0.5, max_wait=4.0)
    waits = [policy.wait_seconds(n, None) for n in range(1, 6) for _ in range(20)]
    assert all(1.0 <= w <= 4.5 for w in waits)
    assert len({round(w, 6) for w in waits}) > 10  # actually random
    assert max(policy.wait_seconds(10, None) for _ in range(20)) <= 4.5  # capped


def test_retry_after_is_honoured_and_slows_the_shared_limiter() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "7"})
        return httpx.Response(200, json=[])

    now = [100.0]
    limiter = RateLimiter(None, clock=lambda: now[0])
    sleeps: list[float] = []
    client = client_for(handler, sleeps=sleeps)
    client.limiter = limiter
    assert asyncio.run(fetch(client)) == []
    assert sleeps[0] == 7.0
    # Every other request sharing the limiter now waits for the same pause.
    waited: list[float] = []

    async def record(seconds: float) -> None:
        waited.append(seconds)

    limiter._sleep = record
    asyncio.run(limiter.acquire())
    assert waited
    assert waited[0] == pytest.approx(7.0)


def test_retry_after_as_http_date() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Mon, 23 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("12", now=now) == 12.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


def test_retry_after_is_capped() -> None:
    huge = RetriableApiError("x", retry_after=1e6)
    assert RetryPolicy(max_retry_after=60).wait_seconds(1, huge) == 60


def test_fatal_is_not_retried_and_names_the_key_problem() -> None:
    client = client_for(answer(401))
    with pytest.raises(FatalApiError, match="rejected the key"):
        asyncio.run(fetch(client))
    assert client.requests_sent == 1


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
