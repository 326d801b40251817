"""Request counters, so tests and benchmarks can assert exactly what a client sent."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from simulator.dip import ENDPOINT_PREFIX, ENTITIES

ENDPOINTS = (
    "historical-price-eod/full",
    "discounted-cash-flow",
    "sp500-constituent",
    "stock-list",
)
# "dip/<entity>": counted with the entity as the "symbol", the key its faults are armed by.
DIP_ENDPOINTS = tuple(ENDPOINT_PREFIX + entity for entity in ENTITIES)


class RequestStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._by_endpoint: Counter[str] = Counter()
            self._by_symbol: Counter[str] = Counter()
            self._by_endpoint_symbol: Counter[tuple[str, str]] = Counter()
            self._responses: Counter[str] = Counter()
            self._resets = 0

    def record_request(self, endpoint: str | None, symbol: str | None) -> None:
        with self._lock:
            self._requests += 1
            if endpoint is not None:
                self._by_endpoint[endpoint] += 1
                if symbol is not None:
                    self._by_symbol[symbol] += 1
                    self._by_endpoint_symbol[endpoint, symbol] += 1

    def record_response(self, status: int) -> None:
        with self._lock:
            self._responses[str(status)] += 1

    def record_reset(self) -> None:
        with self._lock:
            self._resets += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._requests,
                # The market endpoints always; DIP ones only once asked for, so a market-only
                # snapshot keeps its shape.
                "by_endpoint": {e: self._by_endpoint[e] for e in ENDPOINTS}
                | {e: n for e in DIP_ENDPOINTS if (n := self._by_endpoint[e])},
                "by_symbol": dict(sorted(self._by_symbol.items())),
                "responses": dict(sorted(self._responses.items())),
                # A reset connection got no status code, so it is counted apart.
                "resets": self._resets,
            }

    def requests_for(self, symbol: str, endpoint: str | None = None) -> int:
        with self._lock:
            if endpoint is None:
                return self._by_symbol[symbol]
            if endpoint not in ENDPOINTS and endpoint not in DIP_ENDPOINTS:
                raise ValueError(
                    f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS + DIP_ENDPOINTS}"
                )
            return self._by_endpoint_symbol[endpoint, symbol]
