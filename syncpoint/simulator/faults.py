"""Injectable faults: what can go wrong with one symbol (or every request), and the book
that remembers which faults are armed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class FaultKind(StrEnum):
    SERVER_ERROR = "server_error"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    GARBAGE = "garbage"
    WRONG_SHAPE = "wrong_shape"
    MISSING_FIELDS = "missing_fields"
    NAN_PRICE = "nan_price"
    NEGATIVE_PRICE = "negative_price"
    EMPTY = "empty"
    RESET = "reset"
    SLOW = "slow"
    FLAKY = "flaky"


# Faults answered with a plain error status instead of data.
ERROR_STATUS: dict[FaultKind, int] = {
    FaultKind.SERVER_ERROR: 500,
    FaultKind.BAD_REQUEST: 400,
    FaultKind.NOT_FOUND: 404,
    FaultKind.UNAUTHORIZED: 401,
    FaultKind.FORBIDDEN: 403,
}

# Faults that answer 200 but corrupt the payload.
PAYLOAD_FAULTS = frozenset(
    {
        FaultKind.WRONG_SHAPE,
        FaultKind.MISSING_FIELDS,
        FaultKind.NAN_PRICE,
        FaultKind.NEGATIVE_PRICE,
        FaultKind.EMPTY,
    }
)

_OPTIONS: dict[FaultKind, frozenset[str]] = {
    FaultKind.SLOW: frozenset({"seconds"}),
    FaultKind.FLAKY: frozenset({"failures"}),
    FaultKind.RATE_LIMITED: frozenset({"retry_after"}),
}


@dataclass
class Fault:
    kind: FaultKind
    seconds: float = 1.0
    failures: int = 1
    # None: use the simulator's configured retry_after_seconds.
    retry_after: float | None = None
    failed: int = field(default=0, compare=False)

    @classmethod
    def create(cls, kind: FaultKind | str, **opts: Any) -> Fault:
        """Validate eagerly so a typo in a test fails at set-up, not as a puzzling response."""
        fault_kind = FaultKind(kind)
        unknown = set(opts) - _OPTIONS.get(fault_kind, frozenset())
        if unknown:
            raise TypeError(f"fault {fault_kind.value!r} takes no option(s) {sorted(unknown)}")
        fault = cls(fault_kind, **opts)
        if fault.seconds < 0 or fault.failures < 0:
            raise ValueError("fault options must be >= 0")
        return fault


class FaultBook:
    """Armed faults, shared by all handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_symbol: dict[str, Fault] = {}
        self._global: Fault | None = None

    def set(self, symbol: str, fault: Fault) -> None:
        with self._lock:
            self._by_symbol[symbol] = fault

    def clear(self, symbol: str | None = None) -> None:
        with self._lock:
            if symbol is None:
                self._by_symbol.clear()
            else:
                self._by_symbol.pop(symbol, None)

    def set_global(self, fault: Fault | None) -> None:
        with self._lock:
            self._global = fault

    def active(self, symbol: str | None) -> tuple[Fault | None, Fault | None]:
        """(the global fault, the symbol's own fault)."""
        with self._lock:
            own = self._by_symbol.get(symbol) if symbol is not None else None
            return self._global, own

    def should_fail(self, fault: Fault) -> bool:
        """Count one request against a flaky fault; True while failures remain."""
        with self._lock:
            if fault.failed < fault.failures:
                fault.failed += 1
                return True
            return False


def corrupt(kind: FaultKind, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> object:
    """Apply a payload fault to a list response; ``fields`` are the endpoint's value fields."""
    if kind is FaultKind.EMPTY:
        return []
    if kind is FaultKind.WRONG_SHAPE:
        # The legacy v3 shape: an object wrapping the list, a classic client-side surprise.
        symbol = rows[0].get("symbol") if rows else None
        return {"symbol": symbol, "historical": rows}
    if kind is FaultKind.MISSING_FIELDS:
        return [{k: v for k, v in row.items() if k not in fields} for row in rows]
    if kind is FaultKind.NAN_PRICE:
        return [row | {f: float("nan") for f in fields if _is_number(row.get(f))} for row in rows]
    if kind is FaultKind.NEGATIVE_PRICE:
        return [row | {f: -abs(row[f]) for f in fields if _is_number(row.get(f))} for row in rows]
    raise ValueError(f"{kind.value!r} is not a payload fault")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
