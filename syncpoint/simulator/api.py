"""The FMP "stable" API surface (plus the DIP documents API under ``/api/v1/``): routing,
auth, rate limits and faults, HTTP-free.

Each request becomes a ``Response`` value; the HTTP layer only writes it out.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from syncpoint.simulator.config import SimulatorConfig
from syncpoint.simulator.dip import ENDPOINT_PREFIX as DIP_ENDPOINT_PREFIX
from syncpoint.simulator.dip import ENTITIES as DIP_ENTITIES
from syncpoint.simulator.dip import VALUE_FIELDS as DIP_VALUE_FIELDS
from syncpoint.simulator.dip import DipData, DipNotFound, DipRequestError
from syncpoint.simulator.faults import (
    ERROR_STATUS,
    PAYLOAD_FAULTS,
    Fault,
    FaultBook,
    FaultKind,
    corrupt,
)
from syncpoint.simulator.market_data import MarketData, dcf_entry
from syncpoint.simulator.rate_limit import TokenBucket
from syncpoint.simulator.stats import RequestStats

JSON_TYPE = "application/json;charset=UTF-8"
_PREFIX = "/stable/"
_DIP_PREFIX = "/api/v1/"
_SYMBOL_ENDPOINTS = frozenset({"historical-price-eod/full", "discounted-cash-flow"})
# The fields a payload fault damages, per endpoint.
_VALUE_FIELDS: dict[str, tuple[str, ...]] = {
    "historical-price-eod/full": ("close",),
    "discounted-cash-flow": ("dcf", "Stock Price"),
    "sp500-constituent": ("name",),
    "stock-list": ("companyName",),
}
_SERVER_ERRORS = (500, 502, 503, 504)
_INVALID_KEY = (
    "Invalid API KEY. Feel free to create a Free API Key or check the key you are sending."
)
_LIMIT_REACHED = "Limit Reach. Please upgrade your plan or slow down your requests."
# DIP's documented 401 text (openapi.yaml, components/responses/UnauthorizedError).
DIP_UNAUTHORIZED = (
    "An API key is required to access this service. Please refer to "
    "https://dip.bundestag.de/über-dip/hilfe/api how to apply for a key. Misuse of this "
    "service may lead to blocking your requests."
)
# DIP reads the key from `Authorization: ApiKey <key>` or from the `apikey` parameter.
_DIP_AUTH_RE = re.compile(r"\s*ApiKey\s+(\S+)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    # Drop the connection without answering at all.
    reset: bool = False


def json_response(
    status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    # allow_nan (the default) is deliberate: the nan_price fault needs the bare NaN token.
    return Response(status, json.dumps(payload).encode(), headers=headers)


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"Error Message": message})


def dip_error(status: int, message: str) -> Response:
    """DIP's documented error body: {"code": 400, "message": "Invalid cursor"}."""
    return json_response(status, {"code": status, "message": message})


def format_seconds(seconds: float, round_up: bool = False) -> str:
    """Retry-After text: configured values as given ("1", "0.2"); computed waits rounded up
    to whole milliseconds so a client that honours them is never early.
    """
    if round_up:
        seconds = math.ceil(seconds * 1000) / 1000
    if float(seconds).is_integer():
        return str(int(seconds))
    return repr(float(seconds))


def rate_limited(seconds: float, round_up: bool = False) -> Response:
    header = ("Retry-After", format_seconds(seconds, round_up))
    return json_response(429, {"Error Message": _LIMIT_REACHED}, headers=(header,))


class MarketApi:
    def __init__(
        self, config: SimulatorConfig, data: MarketData, dip: DipData | None = None
    ) -> None:
        self.config = config
        self.data = data
        self.dip = dip if dip is not None else new_dip_data(config)
        self.faults = FaultBook()
        self.stats = RequestStats(timeline=config.record_timeline)
        self._limiter = (
            TokenBucket(config.rate_limit_per_minute) if config.rate_limit_per_minute else None
        )
        self._rng = random.Random(config.seed)
        self._rng_lock = threading.Lock()

    def handle(self, target: str, authorization: str | None = None) -> Response:
        """Answer one GET request target (path plus query string); ``authorization`` is
        the request's Authorization header, which the DIP API reads its key from."""
        url = urlsplit(target)
        if url.path.startswith("/_sim/"):
            return self._control(url.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        endpoint, symbol = self._route(url.path, query)
        started = self.stats.record_request(endpoint, symbol)
        # A crashed handler drops the connection without a status: to the client, a reset.
        status: int | None = None
        try:
            if endpoint is not None and endpoint.startswith(DIP_ENDPOINT_PREFIX):
                response = self._answer_dip(endpoint, url.path, query, authorization)
            elif endpoint is None and url.path.startswith(_DIP_PREFIX):
                response = dip_error(404, f"Not found: {url.path}")
            else:
                response = self._answer(endpoint, symbol, query)
            status = None if response.reset else response.status
        finally:
            self.stats.record_end(endpoint, symbol, started, status)
        return response

    @staticmethod
    def _route(path: str, query: dict[str, str]) -> tuple[str | None, str | None]:
        """(endpoint, symbol); None for an unknown path. A DIP endpoint is "dip/<entity>"
        and its entity stands in for the symbol: faults and counters are keyed by it.
        """
        if path.startswith(_DIP_PREFIX):
            # /api/v1/{entity} lists, /api/v1/{entity}/{id} answers one record.
            entity, _, rid = path.removeprefix(_DIP_PREFIX).partition("/")
            if entity in DIP_ENTITIES and "/" not in rid:
                return DIP_ENDPOINT_PREFIX + entity, entity
            return None, None
        endpoint = path.removeprefix(_PREFIX) if path.startswith(_PREFIX) else None
        if endpoint not in _VALUE_FIELDS:
            return None, None
        symbol = (query.get("symbol") or None) if endpoint in _SYMBOL_ENDPOINTS else None
        return endpoint, symbol

    def _control(self, path: str) -> Response:
        if path == "/_sim/stats":
            return json_response(200, self.stats.snapshot())
        return error_response(404, f"Unknown control path {path}")

    def _answer(self, endpoint: str | None, symbol: str | None, query: dict[str, str]) -> Response:
        if endpoint is None:
            return error_response(404, "Unknown endpoint")
        if self.config.latency_ms:
            time.sleep(self.config.latency_ms / 1000)
        global_fault, symbol_fault = self.faults.active(symbol)
        # The global fault models the whole API misbehaving, so it outranks auth and quota.
        if global_fault is not None and (early := self._early_fault(global_fault)) is not None:
            return early
        if (denied := self._gatekeep(query)) is not None:
            return denied
        if endpoint in _SYMBOL_ENDPOINTS and symbol is None:
            return error_response(400, "Missing required parameter: symbol")
        if symbol_fault is not None and (early := self._early_fault(symbol_fault)) is not None:
            return early
        faults = [f for f in (global_fault, symbol_fault) if f is not None]
        if symbol is not None and not self.data.is_known(symbol):
            return error_response(404, f"Unknown symbol {symbol}")
        return self._payload(endpoint, symbol, query, faults)

    def _gatekeep(
        self, query: dict[str, str], key: str | None = None, refusal: Response | None = None
    ) -> Response | None:
        """API key, then quota, then random faults: the order a real gateway checks them.

        ``key`` and ``refusal``: where the API reads its key from and how it refuses one
        (the market API's defaults: the `apikey` parameter, FMP's 401 body)."""
        if key is None and refusal is None:
            key = query.get("apikey")
        if self.config.api_key is not None and key != self.config.api_key:
            return refusal or error_response(401, _INVALID_KEY)
        if self._limiter is not None and (wait := self._limiter.acquire()) > 0:
            return rate_limited(wait, round_up=True)
        with self._rng_lock:
            throttle = self._rng.random() < self.config.rate_limit_error_rate
            fail = self._rng.random() < self.config.error_rate
            status = self._rng.choice(_SERVER_ERRORS)
        if throttle:
            return rate_limited(self.config.retry_after_seconds)
        if fail:
            return error_response(status, "Internal error (simulated)")
        return None

    def _early_fault(self, fault: Fault) -> Response | None:
        """Faults that replace the answer (or delay it); None to carry on."""
        kind = fault.kind
        if kind in ERROR_STATUS:
            return error_response(ERROR_STATUS[kind], f"Simulated {kind.value}")
        if kind is FaultKind.RATE_LIMITED:
            retry_after = fault.retry_after
            if retry_after is None:
                retry_after = self.config.retry_after_seconds
            return rate_limited(retry_after)
        if kind is FaultKind.GARBAGE:
            return Response(200, b"<html>oops</html>", content_type="text/html")
        if kind is FaultKind.RESET:
            return Response(0, reset=True)
        if kind is FaultKind.SLOW:
            time.sleep(fault.seconds)
        elif kind is FaultKind.FLAKY and self.faults.should_fail(fault):
            return error_response(503, "Service temporarily unavailable (simulated)")
        return None

    def _payload(
        self, endpoint: str, symbol: str | None, query: dict[str, str], faults: list[Fault]
    ) -> Response:
        rows: list[dict[str, Any]]
        if endpoint == "stock-list":
            rows, cached = self.data.stock_list, self.data.stock_list_json
        elif endpoint == "sp500-constituent":
            rows, cached = self.data.sp500, self.data.sp500_json
        elif endpoint == "discounted-cash-flow":
            assert symbol is not None
            rows, cached = [dcf_entry(symbol, self._today())], None
        else:
            assert symbol is not None
            try:
                start, end = self._window(query)
            except ValueError as exc:
                return error_response(400, str(exc))
            rows, cached = self.data.eod(symbol, start, end), None
        payload: object = rows
        for fault in faults:
            if fault.kind in PAYLOAD_FAULTS:
                payload = corrupt(fault.kind, rows, _VALUE_FIELDS[endpoint])
                cached = None
                if not isinstance(payload, list):
                    break
                rows = payload
        if cached is not None:
            return Response(200, cached)
        return json_response(200, payload)

    # -- the DIP documents API -------------------------------------------------------------

    def _answer_dip(
        self, endpoint: str, path: str, query: dict[str, str], authorization: str | None
    ) -> Response:
        entity = endpoint.removeprefix(DIP_ENDPOINT_PREFIX)
        self.dip.arrived(entity)  # upstream changes planned for this request happen first
        if self.config.latency_ms:
            time.sleep(self.config.latency_ms / 1000)
        global_fault, entity_fault = self.faults.active(entity)
        if global_fault is not None and (early := self._early_fault(global_fault)) is not None:
            return early
        key = self._dip_key(query, authorization)
        if (denied := self._gatekeep(query, key, dip_error(401, DIP_UNAUTHORIZED))) is not None:
            return denied
        if entity_fault is not None and (early := self._early_fault(entity_fault)) is not None:
            return early
        rid = path.removeprefix(_DIP_PREFIX).partition("/")[2]
        if rid:
            try:
                return Response(200, self.dip.document(entity, rid))
            except DipNotFound:
                return dip_error(404, f"ID not found: {rid}")
        faults = [f for f in (global_fault, entity_fault) if f is not None]
        return self._dip_payload(entity, query, faults)

    def _dip_key(self, query: dict[str, str], authorization: str | None) -> str | None:
        """The key from `Authorization: ApiKey <key>`, else from `apikey`; counts which."""
        if authorization and (match := _DIP_AUTH_RE.fullmatch(authorization)):
            self.stats.record_key_form("header")
            return match.group(1)
        if "apikey" in query:
            self.stats.record_key_form("query")
            return query["apikey"]
        self.stats.record_key_form("none")
        return None

    def _dip_payload(self, entity: str, query: dict[str, str], faults: list[Fault]) -> Response:
        text = entity.endswith("-text")
        size = min(self.config.dip_page_size, self.config.dip_text_page_size) if text else None
        try:
            page = self.dip.page(entity, query, size or self.config.dip_page_size)
        except DipRequestError as exc:
            return dip_error(400, str(exc))
        if not faults:
            return Response(200, page.to_json())
        documents: list[dict[str, Any]] = page.documents
        for fault in faults:
            if fault.kind is FaultKind.WRONG_SHAPE:
                # The bare documents list, without the numFound/cursor envelope.
                return json_response(200, documents)
            if fault.kind in PAYLOAD_FAULTS:
                corrupted = corrupt(fault.kind, documents, DIP_VALUE_FIELDS)
                assert isinstance(corrupted, list)
                documents = corrupted
        return json_response(200, page.payload() | {"documents": documents})

    def _today(self) -> date:
        return self.config.as_of or date.today()

    def _window(self, query: dict[str, str]) -> tuple[date, date]:
        end = _parse_date(query["to"], "to") if query.get("to") else self._today()
        if query.get("from"):
            return _parse_date(query["from"], "from"), end
        try:
            return end.replace(year=end.year - 5), end
        except ValueError:  # 29 February
            return end.replace(year=end.year - 5, day=28), end


def new_dip_data(config: SimulatorConfig) -> DipData:
    return DipData(
        config.seed,
        config.as_of or date.today(),
        config.dip_records_per_entity,
        visibility_delay=timedelta(seconds=config.dip_visibility_delay_seconds),
    )


def _parse_date(value: str, name: str) -> date:
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise ValueError(f"Invalid '{name}' date {value!r}: expected YYYY-MM-DD") from None
