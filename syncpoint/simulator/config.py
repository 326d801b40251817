"""Simulator settings. The defaults are a well-behaved API: no latency, no faults, no key."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from syncpoint.simulator.dip import (
    MAX_PAGE_SIZE,
    MAX_RECORDS_PER_ENTITY,
    MAX_TEXT_PAGE_SIZE,
    VISIBILITY_DELAY,
)
from syncpoint.simulator.market_data import DEFAULT_STOCK_LIST_SIZE, SP500_SIZE


@dataclass
class SimulatorConfig:
    """Latency, error rates and the retry hint are read per request, so a running simulator
    picks up changes to them; the rest take effect at construction/start.
    """

    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port
    latency_ms: float = 0
    error_rate: float = 0
    rate_limit_error_rate: float = 0
    retry_after_seconds: float = 1
    rate_limit_per_minute: int | None = None
    api_key: str | None = None
    seed: int = 0
    as_of: date | None = None
    stock_list_size: int = DEFAULT_STOCK_LIST_SIZE
    # The DIP documents API (/api/v1/{entity}): records per entity, the page sizes (read
    # per request; DIP's own are 100, and 10 for the -text entities), and how long a change
    # takes to become visible (DIP: "about 15 minutes").
    dip_records_per_entity: int = 250
    dip_page_size: int = MAX_PAGE_SIZE
    dip_text_page_size: int = MAX_TEXT_PAGE_SIZE
    dip_visibility_delay_seconds: float = VISIBILITY_DELAY.total_seconds()
    # Keep every request's (endpoint, symbol, start, end, status) for MarketSimulator.timeline():
    # memory grows with each request, so only for tests and short benchmarks.
    record_timeline: bool = False

    def __post_init__(self) -> None:
        for name in ("error_rate", "rate_limit_error_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.latency_ms < 0 or self.retry_after_seconds < 0:
            raise ValueError("latency_ms and retry_after_seconds must be >= 0")
        if self.rate_limit_per_minute is not None and self.rate_limit_per_minute <= 0:
            raise ValueError("rate_limit_per_minute must be positive or None")
        if self.stock_list_size < SP500_SIZE:
            raise ValueError(f"stock_list_size must be >= {SP500_SIZE}")
        if not 0 <= self.dip_records_per_entity <= MAX_RECORDS_PER_ENTITY:
            raise ValueError(f"dip_records_per_entity must be within [0, {MAX_RECORDS_PER_ENTITY}]")
        if not 1 <= self.dip_page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"dip_page_size must be within [1, {MAX_PAGE_SIZE}]")
        if not 1 <= self.dip_text_page_size <= MAX_TEXT_PAGE_SIZE:
            raise ValueError(f"dip_text_page_size must be within [1, {MAX_TEXT_PAGE_SIZE}]")
        if self.dip_visibility_delay_seconds < 0:
            raise ValueError("dip_visibility_delay_seconds must be >= 0")
