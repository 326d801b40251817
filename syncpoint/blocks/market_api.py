"""The market data API (FMP "stable" style): where it is, the key, and how hard to push it."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from syncpoint.blocks.form import optional
from syncpoint.core.http import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_REQUEST_DEADLINE,
    ApiClient,
    AuthMode,
    RetryPolicy,
)
from syncpoint.core.rate_limit import DEFAULT_MAX_WAIT, shared_limiter


class MarketApi(Block):
    """Connection settings for a market data API serving FMP's /stable endpoints.

    Every request of a process to the same base URL shares one rate limiter, so the
    whole run paces itself below `requests_per_minute` before the API answers 429.
    Whatever the API answers, a request is bounded: in size (`max_response_bytes`), in
    time (`request_deadline_seconds` per attempt) and in any wait it asks for
    (`max_wait_seconds`).

    Example:
        Load a saved block and open a client:
        ```python
        from syncpoint.blocks.market_api import MarketApi

        api = MarketApi.load("BLOCK_NAME")
        async with api.client() as client:
            rows = await client.get_json("/stable/sp500-constituent")
        ```
    """

    _block_type_name = "Syncpoint Market API"
    _block_type_slug = "syncpoint-market-api"
    _description = "Base URL, key and pacing for the market data API syncpoint reads."
    _documentation_url = HttpUrl("https://github.com/syncpoint/syncpoint#configuration")
    # Named in the message when the API refuses the key: where this API's key is set.
    key_hint: ClassVar[str] = "MARKET_API_KEY or the Syncpoint Market API block's api_key"

    base_url: str = Field(
        default="https://financialmodelingprep.com",
        title="Base URL",
        description=(
            "Root URL of the API; requests go to this URL followed by /stable/ and the "
            "endpoint path."
        ),
    )
    api_key: SecretStr | None = optional(
        title="API key",
        description=(
            "The key the API gave you, sent as the apikey query parameter; never logged or "
            "shown again. Empty: the worker's MARKET_API_KEY, if any."
        ),
    )
    requests_per_minute: float | None = optional(
        title="Requests per minute",
        gt=0,
        description="Pace this process's requests to this many per minute. Empty: unlimited.",
    )
    global_rate_limit: str | None = optional(
        title="Global rate limit",
        description=(
            "Name of a Prefect global concurrency limit with slot decay; every request takes "
            "a slot, so runs on different workers share one requests-per-minute budget. "
            "Empty: none."
        ),
    )
    concurrency: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Requests in flight at once; a stage's two batches being fetched share them.",
    )
    timeout_seconds: float = Field(
        default=30.0, gt=0, description="Per-request timeout; a timeout is retried."
    )
    max_attempts: int = Field(
        default=5, ge=1, le=20, description="Attempts per request for retriable failures."
    )
    max_wait_seconds: float = Field(
        default=DEFAULT_MAX_WAIT,
        gt=0,
        le=3600,
        description=(
            "The longest any single wait may last: a retry's backoff, a Retry-After the API "
            "sends (seconds or a date; larger values are cut to this) and the pause of the "
            "shared rate limiter after a 429. A stop request ends any wait at once."
        ),
    )
    request_deadline_seconds: float = Field(
        default=DEFAULT_REQUEST_DEADLINE,
        gt=0,
        le=3600,
        description=(
            "Total time one attempt may take, connect to last byte (the timeout bounds "
            "each read only); an attempt past it is retried."
        ),
    )
    max_response_bytes: int = Field(
        default=DEFAULT_MAX_RESPONSE_BYTES,
        ge=1024,
        description=(
            "Largest answer accepted, in bytes after decompression; a larger one is refused "
            "while it streams and that item fails with the reason."
        ),
    )

    def _auth(self) -> AuthMode:
        return "query"

    def client(self) -> ApiClient:
        """A new async client; open it with `async with`."""
        return ApiClient(
            self.base_url,
            api_key=self.api_key,
            auth=self._auth(),
            key_hint=self.key_hint,
            concurrency=self.concurrency,
            limiter=shared_limiter(
                self.base_url,
                self.requests_per_minute,
                self.global_rate_limit,
                max_wait=self.max_wait_seconds,
            ),
            policy=RetryPolicy(attempts=self.max_attempts, max_wait=self.max_wait_seconds),
            timeout=self.timeout_seconds,
            deadline=self.request_deadline_seconds,
            max_response_bytes=self.max_response_bytes,
        )
