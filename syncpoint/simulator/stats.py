"""Request counters, so tests and benchmarks can assert exactly what a client sent."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from syncpoint.simulator.dip import ENDPOINT_PREFIX, ENTITIES

ENDPOINTS = (
    "historical-price-eod/full",
    "discounted-cash-flow",
    "sp500-constituent",
    "stock-list",
)
# "dip/<entity>": counted with the entity as the "symbol", the key its faults are armed by.
DIP_ENDPOINTS = tuple(ENDPOINT_PREFIX + entity for entity in ENTITIES)


@dataclass(frozen=True)
class Served:
    """One answered request, for the opt-in timeline (monotonic clock of this process)."""

    endpoint: str | None
    symbol: str | None
    started: float
    ended: float
    status: int | None  # None: the connection was reset


class RequestStats:
    def __init__(self, *, timeline: bool = False) -> None:
        self._lock = threading.Lock()
        self._keep_timeline = timeline
        self._in_flight = 0  # live, so never reset
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._most_in_flight = self._in_flight
            self._timeline: list[Served] = []
            self._requests = 0
            self._by_endpoint: Counter[str] = Counter()
            self._by_symbol: Counter[str] = Counter()
            self._by_endpoint_symbol: Counter[tuple[str, str]] = Counter()
            self._responses: Counter[str] = Counter()
            self._resets = 0
            self._key_forms: Counter[str] = Counter()

    def record_request(self, endpoint: str | None, symbol: str | None) -> float:
        """Count a request as it arrives; returns its start time for record_end."""
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            self._most_in_flight = max(self._most_in_flight, self._in_flight)
            if endpoint is not None:
                self._by_endpoint[endpoint] += 1
                if symbol is not None:
                    self._by_symbol[symbol] += 1
                    self._by_endpoint_symbol[endpoint, symbol] += 1
        return time.monotonic()

    def record_end(
        self, endpoint: str | None, symbol: str | None, started: float, status: int | None
    ) -> None:
        """The request is answered with `status`, or its connection reset (None)."""
        ended = time.monotonic()
        with self._lock:
            self._in_flight -= 1
            if status is None:
                self._resets += 1
            else:
                self._responses[str(status)] += 1
            if self._keep_timeline:
                self._timeline.append(Served(endpoint, symbol, started, ended, status))

    def record_key_form(self, form: str) -> None:
        """How a DIP request carried its key: "header", "query" or "none"."""
        with self._lock:
            self._key_forms[form] += 1

    def key_forms(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._key_forms.items()))

    def timeline(self) -> list[Served]:
        """Every request since the last reset, in the order they ended (empty unless the
        simulator was configured with record_timeline=True)."""
        with self._lock:
            return list(self._timeline)

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
                # The most requests being answered at once: what a client's concurrency
                # really was, as the server saw it.
                "most_in_flight": self._most_in_flight,
            }

    def live(self) -> tuple[int, int]:
        """Requests since the last reset and those being answered now: what a watcher
        polling every few milliseconds needs, without building the whole snapshot."""
        with self._lock:
            return self._requests, self._in_flight

    def requests_for(self, symbol: str, endpoint: str | None = None) -> int:
        with self._lock:
            if endpoint is None:
                return self._by_symbol[symbol]
            if endpoint not in ENDPOINTS and endpoint not in DIP_ENDPOINTS:
                raise ValueError(
                    f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS + DIP_ENDPOINTS}"
                )
            return self._by_endpoint_symbol[endpoint, symbol]
