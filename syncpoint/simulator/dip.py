"""A DIP-style documents API (the Bundestag's public DIP API), HTTP-free.

It models what DIP documents (../shared/dip-api.md), so that a client tested here meets
no surprise in production:

- ``GET /api/v1/{entity}`` pages through the records matching the optional filters, in
  DIP's order: ``datum`` descending, then id descending, never by ``aktualisiert``.
  ``GET /api/v1/{entity}/{id}`` returns one record or 404.
- Cursors are Solr cursorMarks: opaque standard base64 naming the last record's sort
  values. Every non-empty page answers a new cursor, the last one included; the request
  after it gets no documents and the very cursor it sent: that is the end.
- At most ``dip_page_size`` (<= 100) documents a page, ``dip_text_page_size`` (<= 10) for
  the full-text entities.
- ``aktualisiert`` is Europe/Berlin local time with its offset, daylight saving included.
- A change made at time t becomes visible at t + the visibility delay (15 minutes by
  default): until then the API serves the record's previous version (or, for a new
  record, nothing). numFound counts the matches visible now, so it moves while a stream
  runs; the records' order does not (an edit keeps its ``datum``).

Records are derived from SHA-256 of the seed, entity and index, never from Python's
``hash()``, so two simulators with the same seed serve identical data. Each version of a
record is kept as its JSON text: a page is assembled from stored bytes, so a 200,000-record
stream measures the client, not the simulator's JSON encoder.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import random
import re
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

ENTITIES: tuple[str, ...] = (
    "person",
    "vorgang",
    "vorgangsposition",
    "aktivitaet",
    "drucksache",
    "drucksache-text",
    "plenarprotokoll",
    "plenarprotokoll-text",
)
ENDPOINT_PREFIX = "dip/"
# "*": the first page; also what an empty first answer echoes back.
INITIAL_CURSOR = "*"
# DIP's timestamps are Berlin local time with the offset of the day: +01:00 or +02:00.
BERLIN = ZoneInfo("Europe/Berlin")
# What DIP documents: pages of at most 100 documents, 10 for the full-text entities, and
# "about 15 minutes" before a change is visible.
MAX_PAGE_SIZE = 100
MAX_TEXT_PAGE_SIZE = 10
VISIBILITY_DELAY = timedelta(minutes=15)
# Ids are numeric strings of one width, so string order is numeric order.
ID_BASE = 1_000_000
MAX_RECORDS_PER_ENTITY = 8_999_999 - ID_BASE
AKTUALISIERT_DAYS = 60
DATUM_DAYS = 730
# The fields a payload fault (missing_fields, nan_price, negative_price) damages.
VALUE_FIELDS = ("aktualisiert", "wahlperiode")

# The "-text" entities are their base entity's documents plus the full text, as in DIP.
_TEXT_OF = {"drucksache-text": "drucksache", "plenarprotokoll-text": "plenarprotokoll"}
# A run of records sharing one timestamp (bulk edits do that upstream) tests the id
# tie-break: every tenth record copies its predecessor's "aktualisiert".
_TIE_EVERY, _TIE_AT = 10, 7
_WAHLPERIODEN = ((date(2025, 3, 25), 21), (date(2021, 10, 26), 20), (date.min, 19))
_THEMEN = (
    "Klimaschutz", "Digitalisierung der Verwaltung", "Mietrecht", "Bundeswehr",
    "Energiewende", "Rentenversicherung", "Krankenhausreform", "Bürgergeld", "Datenschutz",
    "Fachkräfteeinwanderung", "Wasserstoffwirtschaft", "Bahninfrastruktur",
    "Cybersicherheit", "Landwirtschaft", "Grundsteuer", "sozialen Wohnungsbau",
)  # fmt: skip
_FRAKTIONEN = ("SPD", "CDU/CSU", "BÜNDNIS 90/DIE GRÜNEN", "FDP", "AfD", "Die Linke", "BSW")
_VORNAMEN = (
    "Anna", "Jörg", "Katrin", "Lars", "Sevim", "Matthias", "Ulrike", "Omid", "Britta",
    "Friedrich", "Jessica", "Ralf", "Özlem", "Thomas", "Gesine", "Kai",
)  # fmt: skip
_NACHNAMEN = (
    "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
    "Schulz", "Hoffmann", "Schäfer", "Koch", "Bauer", "Richter", "Klein", "Wolf",
)  # fmt: skip
_VORGANGSTYPEN = (
    "Gesetzgebung", "Antrag", "Kleine Anfrage", "Große Anfrage", "Entschließungsantrag",
    "Bericht, Gutachten, Programm",
)  # fmt: skip
_POSITIONEN = (
    "Gesetzentwurf", "1. Beratung", "Beschlussempfehlung und Bericht",
    "2. Beratung", "3. Beratung", "Antwort", "Überweisung",
)  # fmt: skip
_AKTIVITAETSARTEN = (
    "Rede", "Kleine Anfrage", "Antrag", "Zwischenfrage", "Mündliche Frage",
    "Erklärung zur Abstimmung",
)  # fmt: skip
_DRUCKSACHETYPEN = (
    "Antrag", "Gesetzentwurf", "Kleine Anfrage", "Antwort",
    "Beschlussempfehlung und Bericht", "Unterrichtung",
)  # fmt: skip

_WORDS = struct.Struct(">8I")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
# A "+01:00" sent unencoded in a query string arrives as " 01:00".
_LOST_PLUS_RE = re.compile(r"(.*T.*) (\d{2}:?\d{2})")
# A cursor is base64 of these two bytes (Solr's cursorMarks start "AoJ" the same way), a
# 3-byte check and "datum|id": opaque, and tampering is caught rather than served.
_CURSOR_MAGIC = b"\x02\x82"
_CURSOR_CHECK = 3
_CURSOR_RE = re.compile(r"(\d{4}-\d{2}-\d{2})\|(\d{1,12})")
INVALID_CURSOR = "Invalid cursor"

# (-datum, -id): ascending order of these keys is the API's order.
OrderKey = tuple[int, int]
_T = TypeVar("_T")


class DipRequestError(ValueError):
    """A request the API answers with 400 (bad cursor, bad filter value)."""


class DipNotFound(LookupError):
    """``GET /{entity}/{id}`` for an id the API does not serve (404)."""


@dataclass(frozen=True)
class DipPage:
    num_found: int
    cursor: str
    bodies: list[bytes]  # each document as JSON, in API order

    @property
    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body in self.bodies]

    def payload(self) -> dict[str, Any]:
        return {"numFound": self.num_found, "documents": self.documents, "cursor": self.cursor}

    def to_json(self) -> bytes:
        """The answer body, joined from the stored documents without re-encoding them."""
        head = b'{"numFound":%d,"documents":[' % self.num_found
        tail = b'],"cursor":' + json.dumps(self.cursor).encode() + b"}"
        return head + b",".join(self.bodies) + tail


@dataclass(frozen=True, slots=True)
class _Version:
    at: datetime  # the parsed "aktualisiert", aware
    # When the API starts serving this version; None: from the start (generated history).
    visible_from: datetime | None
    body: bytes


@dataclass(slots=True)
class _Record:
    id: str
    datum: date  # never edited: a record keeps its place in the API's order
    base_titel: str
    versions: list[_Version]  # oldest first; older than the one visible now are dropped
    changes: int = 0

    @property
    def order(self) -> OrderKey:
        return order_key(self.datum, self.id)

    def visible(self, now: datetime) -> _Version | None:
        """The newest version visible at ``now``; None while a new record is not yet."""
        for version in reversed(self.versions):
            if version.visible_from is None or version.visible_from <= now:
                return version
        return None


@dataclass
class _Entity:
    records: list[_Record]  # in API order
    keys: list[OrderKey]  # the records' order keys, ascending, for bisect
    by_id: dict[str, _Record]
    next_index: int
    updates: int = 0
    stuck: bool = False
    # Bumped by every edit: numFound is cached per filter until something changes.
    edits: int = 0
    # visible_from of the versions not visible yet when they were made, sorted: how many
    # of them the clock has passed is the other half of a cached count's validity.
    reveals: list[datetime] = field(default_factory=list)
    counts: dict[tuple[Any, ...], tuple[int, int, int]] = field(default_factory=dict)
    requests: int = 0
    # (request number, action): upstream changes timed to land in the middle of a stream.
    planned: list[tuple[int, Callable[[], object]]] = field(default_factory=list)

    def insert(self, record: _Record) -> None:
        at = bisect.bisect_left(self.keys, record.order)
        self.keys.insert(at, record.order)
        self.records.insert(at, record)
        self.by_id[record.id] = record


# -- formats -------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """DIP's form: Berlin local time with its offset, whole seconds unless there is a
    fraction: ``2024-03-01T10:15:02+01:00``, ``2024-07-01T10:15:02+02:00``."""
    local = moment.astimezone(BERLIN)
    return local.isoformat(timespec="seconds" if local.microsecond == 0 else "microseconds")


def parse_timestamp(value: str, name: str, end: bool = False) -> datetime:
    """An ISO 8601 timestamp; without an offset it is Berlin time, as DIP reads it. A bare
    YYYY-MM-DD is that Berlin day's first moment (``end``: its last).
    """
    if _DATE_RE.fullmatch(value):
        day = _parse_day(value, name)
        return datetime.combine(day, time.max if end else time.min, BERLIN)
    if match := _LOST_PLUS_RE.fullmatch(value):
        value = f"{match.group(1)}+{match.group(2)}"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise DipRequestError(
            f"Invalid '{name}' {value!r}: expected an ISO 8601 timestamp or YYYY-MM-DD"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=BERLIN)


def _parse_day(value: str, name: str) -> date:
    try:
        if not _DATE_RE.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise DipRequestError(f"Invalid '{name}' date {value!r}: expected YYYY-MM-DD") from None


def order_key(datum: date, rid: str) -> OrderKey:
    return -datum.toordinal(), -int(rid)


def encode_cursor(datum: date, rid: str) -> str:
    """A Solr-style cursorMark after the record (datum, id): standard base64, padded."""
    payload = f"{datum.isoformat()}|{rid}".encode()
    check = hashlib.blake2s(payload, digest_size=_CURSOR_CHECK).digest()
    return base64.b64encode(_CURSOR_MAGIC + check + payload).decode()


def decode_cursor(cursor: str) -> OrderKey:
    """The order key a cursor names; DipRequestError ("Invalid cursor") for anything else,
    including a cursor whose "+" a client sent unencoded (it arrives as a space)."""
    try:
        raw = base64.b64decode(cursor, validate=True)
        magic, check, payload = raw[:2], raw[2 : 2 + _CURSOR_CHECK], raw[2 + _CURSOR_CHECK :]
        match = _CURSOR_RE.fullmatch(payload.decode())
        if magic != _CURSOR_MAGIC or match is None:
            raise ValueError(cursor)
        if hashlib.blake2s(payload, digest_size=_CURSOR_CHECK).digest() != check:
            raise ValueError(cursor)
        return order_key(date.fromisoformat(match.group(1)), match.group(2))
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        raise DipRequestError(INVALID_CURSOR) from None


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _aware(moment: datetime) -> datetime:
    """Naive means UTC here: these are the simulator's own controls, not DIP's filters."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# -- synthetic records -----------------------------------------------------------------------


def _units(text: str) -> tuple[float, ...]:
    """8 uniforms in [0, 1) from SHA-256 of ``text``."""
    words = _WORDS.unpack(hashlib.sha256(text.encode()).digest())
    return tuple(w * 2.0**-32 for w in words)


def _pick(options: tuple[str, ...], unit: float) -> str:
    return options[int(unit * len(options))]


def _wahlperiode(day: date) -> int:
    return next(period for start, period in _WAHLPERIODEN if day >= start)


def record_id(index: int) -> str:
    return str(ID_BASE + index)


class _Generator:
    """Record ``index`` of an entity, a pure function of (seed, as_of, size, entity, index)."""

    def __init__(self, seed: int, as_of: date, size: int) -> None:
        self.seed = seed
        self.size = size
        # In UTC: minutes added to a Berlin-zoned datetime would be wall-clock minutes,
        # wrong by an hour across a daylight-saving change.
        self.window_start = datetime.combine(
            as_of - timedelta(days=AKTUALISIERT_DAYS), time.min, BERLIN
        ).astimezone(UTC)

    def units(self, source: str, index: int) -> tuple[float, ...]:
        return _units(f"dip|{self.seed}|{source}|{index}")

    def aktualisiert(self, source: str, index: int) -> datetime:
        if index % _TIE_EVERY == _TIE_AT:
            index -= 1
        minutes = int(self.units(source, index)[0] * AKTUALISIERT_DAYS * 24 * 60)
        return self.window_start + timedelta(minutes=minutes)

    def record(
        self,
        entity: str,
        index: int,
        at: datetime | None = None,
        visible_from: datetime | None = None,
    ) -> _Record:
        source = _TEXT_OF.get(entity, entity)
        u = self.units(source, index)
        generated = self.aktualisiert(source, index)
        datum = generated.astimezone(BERLIN).date() - timedelta(days=int(u[1] * DATUM_DAYS))
        if at is not None:  # added upstream just now: dated the day it appears
            generated, datum = at, at.astimezone(BERLIN).date()
        titel, extra = self._content(source, u, _wahlperiode(datum))
        if source != entity:
            extra["text"] = self._text(titel, extra, datum)
        rid = record_id(index)
        doc = {
            "id": rid,
            "aktualisiert": format_timestamp(generated),
            "datum": datum.isoformat(),
            "titel": titel,
            **extra,
        }
        version = _Version(generated, visible_from, _json(doc))
        return _Record(id=rid, datum=datum, base_titel=titel, versions=[version])

    def _content(
        self, source: str, u: tuple[float, ...], wahlperiode: int
    ) -> tuple[str, dict[str, Any]]:
        thema = _pick(_THEMEN, u[2])
        fraktion = _pick(_FRAKTIONEN, u[3])
        name = f"{_pick(_VORNAMEN, u[5])} {_pick(_NACHNAMEN, u[6])}"
        if source == "person":
            vorname, nachname = name.split(" ")
            extra: dict[str, Any] = {
                "vorname": vorname,
                "nachname": nachname,
                "fraktion": fraktion,
            }
            return f"{name}, MdB, {fraktion}", extra
        if source == "vorgang":
            typ = _pick(_VORGANGSTYPEN, u[4])
            return f"{typ}: {thema}", {"vorgangstyp": typ, "wahlperiode": wahlperiode}
        if source == "vorgangsposition":
            position = _pick(_POSITIONEN, u[4])
            extra = {
                "vorgangsposition": position,
                "vorgang_id": record_id(int(u[7] * max(self.size, 1))),
                "wahlperiode": wahlperiode,
            }
            return f"{position} zum Thema {thema}", extra
        if source == "aktivitaet":
            art = _pick(_AKTIVITAETSARTEN, u[4])
            titel = f"{art} von {name} ({fraktion}) zum Thema {thema}"
            return titel, {"aktivitaetsart": art, "wahlperiode": wahlperiode}
        if source == "drucksache":
            typ = _pick(_DRUCKSACHETYPEN, u[4])
            extra = {
                "drucksachetyp": typ,
                "dokumentnummer": f"{wahlperiode}/{1 + int(u[7] * 15_000)}",
                "wahlperiode": wahlperiode,
            }
            return f"{typ} der Fraktion {fraktion}: {thema}", extra
        # plenarprotokoll
        sitzung = 1 + int(u[7] * 250)
        extra = {
            "dokumentnummer": f"{wahlperiode}/{sitzung}",
            "herausgeber": "BT",
            "wahlperiode": wahlperiode,
        }
        return f"Protokoll der {sitzung}. Sitzung des {wahlperiode}. Deutschen Bundestages", extra

    @staticmethod
    def _text(titel: str, extra: dict[str, Any], datum: date) -> str:
        return (
            f"Deutscher Bundestag, {extra['wahlperiode']}. Wahlperiode, "
            f"Dokument {extra['dokumentnummer']} vom {datum:%d.%m.%Y}.\n\n{titel}\n\n"
            "Der Bundestag wolle beschließen: Die Bundesregierung wird aufgefordert, "
            "dem Parlament bis zum Ende des Jahres zu berichten."
        )


# -- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Filter:
    """A request's (inclusive, optional) filters, validated when built."""

    a_start: datetime | None = None
    a_end: datetime | None = None
    d_start: date | None = None
    d_end: date | None = None

    @classmethod
    def of(cls, query: Mapping[str, str]) -> _Filter:
        return cls(
            _opt(query, "f.aktualisiert.start", parse_timestamp),
            _opt(query, "f.aktualisiert.end", _parse_end),
            _opt(query, "f.datum.start", _parse_day),
            _opt(query, "f.datum.end", _parse_day),
        )

    def matches(self, record: _Record, version: _Version) -> bool:
        return (
            (self.a_start is None or version.at >= self.a_start)
            and (self.a_end is None or version.at <= self.a_end)
            and (self.d_start is None or record.datum >= self.d_start)
            and (self.d_end is None or record.datum <= self.d_end)
        )


class DipData:
    """Every entity's records, generated on first use, shared by all handler threads.

    ``clock`` is upstream's clock (default: the wall clock); ``advance`` moves it on, so a
    test can let the visibility delay pass without waiting for it.
    """

    def __init__(
        self,
        seed: int,
        as_of: date,
        records_per_entity: int,
        visibility_delay: timedelta = VISIBILITY_DELAY,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not 0 <= records_per_entity <= MAX_RECORDS_PER_ENTITY:
            raise ValueError(f"records_per_entity must be within [0, {MAX_RECORDS_PER_ENTITY}]")
        if visibility_delay < timedelta(0):
            raise ValueError("visibility_delay must be >= 0")
        self.seed = seed
        self.as_of = as_of
        self.records_per_entity = records_per_entity
        self.visibility_delay = visibility_delay
        self._clock = clock or (lambda: datetime.now(UTC))
        self._offset = timedelta(0)
        self._generator = _Generator(seed, as_of, records_per_entity)
        self._entities: dict[str, _Entity] = {}
        self._lock = threading.Lock()

    # -- the clock -------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock() + self._offset

    def advance(self, delta: timedelta) -> None:
        """Move upstream's clock on by ``delta`` (changes due by then become visible)."""
        if delta < timedelta(0):
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += delta

    # -- reading ---------------------------------------------------------------------------

    def records(self, entity: str) -> list[dict[str, Any]]:
        """The records visible now, in API order (datum descending, then id descending)."""
        with self._lock:
            now = self.now()
            found = [r.visible(now) for r in self._entity(entity).records]
        return [json.loads(v.body) for v in found if v is not None]

    def document(self, entity: str, rid: str) -> bytes:
        """``GET /{entity}/{id}``: the visible version's JSON; DipNotFound if none."""
        with self._lock:
            record = self._entity(entity).by_id.get(rid)
            version = record.visible(self.now()) if record is not None else None
        if version is None:
            raise DipNotFound(rid)
        return version.body

    def page(self, entity: str, query: Mapping[str, str], page_size: int) -> DipPage:
        """One page for a request's query parameters; raises DipRequestError for a 400."""
        cursor = query.get("cursor") or None
        after = decode_cursor(cursor) if cursor not in (None, INITIAL_CURSOR) else None
        matches = _Filter.of(query)
        with self._lock:
            state = self._entity(entity)
            now = self.now()
            found = self._count(state, matches, now)
            if state.stuck and after is not None:
                # A broken upstream: past the first page, the second page under the first
                # page's cursor, forever.
                first, end = self._scan(state, matches, now, 0, page_size)
                hits, _ = self._scan(state, matches, now, end, page_size)
                following = encode_cursor(first[-1].datum, first[-1].id) if first else None
            else:
                start = 0 if after is None else bisect.bisect_right(state.keys, after)
                hits, _ = self._scan(state, matches, now, start, page_size)
                # Every non-empty page names its last record, the last page too: the end
                # is the next, empty answer, which echoes the cursor it was sent.
                following = encode_cursor(hits[-1].datum, hits[-1].id) if hits else None
            bodies = [version.body for version in (r.visible(now) for r in hits) if version]
        return DipPage(found, following or cursor or INITIAL_CURSOR, bodies)

    # -- upstream changes ------------------------------------------------------------------

    def update(
        self,
        entity: str,
        ids: list[str] | None = None,
        count: int | None = None,
        at: datetime | None = None,
        visible_at: datetime | None = None,
    ) -> list[str]:
        """Edit ``ids`` (or ``count`` records picked deterministically): ``aktualisiert``
        becomes ``at`` (default: upstream's now) and the title gets a " (geändert N)" suffix,
        N counting that record's edits. The edit is served from ``visible_at`` (default:
        ``at`` + the visibility delay); until then the previous version is. Returns the ids.
        """
        if (ids is None) == (count is None):
            raise ValueError("pass exactly one of ids and count")
        with self._lock:
            state = self._entity(entity)
            if ids is None:
                assert count is not None
                if not 0 <= count <= len(state.records):
                    raise ValueError(f"count must be within [0, {len(state.records)}]")
                # Seeded by the update's ordinal, so a replayed test picks the same records.
                rng = random.Random(f"dip-update|{self.seed}|{entity}|{state.updates + 1}")
                ids = sorted(rng.sample(sorted(state.by_id), count))
            ids = list(dict.fromkeys(ids))
            unknown = [i for i in ids if i not in state.by_id]
            if unknown:
                raise ValueError(f"unknown {entity} id(s) {unknown}")
            state.updates += 1
            now = self.now()
            moment, shown = self._when(now, at, visible_at)
            for rid in ids:
                record = state.by_id[rid]
                record.changes += 1
                doc = json.loads(record.versions[-1].body) | {
                    "aktualisiert": format_timestamp(moment),
                    "titel": f"{record.base_titel} (geändert {record.changes})",
                }
                self._push(state, record, _Version(moment, shown, _json(doc)), now)
            return ids

    def add(
        self,
        entity: str,
        count: int = 1,
        at: datetime | None = None,
        visible_at: datetime | None = None,
    ) -> list[str]:
        """Add ``count`` new records, ``aktualisiert`` = ``at`` (default: upstream's now),
        ``datum`` = that Berlin day (so they sort first), served from ``visible_at``
        (default: ``at`` + the visibility delay). Returns their ids.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            state = self._entity(entity)
            if state.next_index + count > MAX_RECORDS_PER_ENTITY:
                raise ValueError("too many records")
            now = self.now()
            moment, shown = self._when(now, at, visible_at)
            added = []
            for index in range(state.next_index, state.next_index + count):
                record = self._generator.record(entity, index, at=moment, visible_from=shown)
                state.insert(record)
                added.append(record.id)
            state.next_index += count
            self._changed(state, shown, now)
            return added

    def plan(self, entity: str, after_requests: int, action: Callable[[], object]) -> None:
        """Run ``action`` (e.g. an update, an add, arming a fault) as the entity's request
        number ``after_requests + 1`` (counted from now) arrives, before it is looked at: a
        change landing mid-stream, on cue."""
        if after_requests < 0:
            raise ValueError("after_requests must be >= 0")
        with self._lock:
            state = self._entity(entity)
            state.planned.append((state.requests + after_requests, action))

    def set_stuck(self, entity: str, on: bool) -> None:
        with self._lock:
            self._entity(entity).stuck = on

    def clear_stuck(self) -> None:
        with self._lock:
            for state in self._entities.values():
                state.stuck = False

    # -- internals -------------------------------------------------------------------------

    def _entity(self, entity: str) -> _Entity:
        """The entity's state, generated on first use; call with the lock held."""
        state = self._entities.get(entity)
        if state is None:
            if entity not in ENTITIES:
                raise ValueError(f"unknown DIP entity {entity!r}; expected one of {ENTITIES}")
            records = [self._generator.record(entity, i) for i in range(self.records_per_entity)]
            records.sort(key=lambda r: r.order)
            state = _Entity(
                records,
                [r.order for r in records],
                {r.id: r for r in records},
                self.records_per_entity,
            )
            self._entities[entity] = state
        return state

    def arrived(self, entity: str) -> None:
        """A request for the entity arrived: count it and run the actions planned for it."""
        with self._lock:
            state = self._entity(entity)
            due = [action for n, action in state.planned if n <= state.requests]
            state.planned = [(n, a) for n, a in state.planned if n > state.requests]
            state.requests += 1
        for action in due:
            action()  # outside the lock: actions are update()/add() calls that take it

    def _when(
        self, now: datetime, at: datetime | None, visible_at: datetime | None
    ) -> tuple[datetime, datetime]:
        moment = _aware(at) if at is not None else now.replace(microsecond=0)
        shown = _aware(visible_at) if visible_at is not None else moment + self.visibility_delay
        return moment, shown

    def _push(self, state: _Entity, record: _Record, version: _Version, now: datetime) -> None:
        """Add a version; drop those older than the one visible now (the clock never goes
        back, so nothing can serve them again)."""
        record.versions.append(version)
        current = record.visible(now)
        if current is not None:
            record.versions = record.versions[record.versions.index(current) :]
        self._changed(state, version.visible_from, now)

    @staticmethod
    def _changed(state: _Entity, shown: datetime | None, now: datetime) -> None:
        state.edits += 1
        if shown is not None and shown > now:
            bisect.insort(state.reveals, shown)

    @staticmethod
    def _count(state: _Entity, matches: _Filter, now: datetime) -> int:
        """numFound: the matches visible now, cached until an edit or a reveal."""
        revealed = bisect.bisect_right(state.reveals, now)
        key = (matches.a_start, matches.a_end, matches.d_start, matches.d_end)
        cached = state.counts.get(key)
        if cached is not None and cached[:2] == (state.edits, revealed):
            return cached[2]
        found = 0
        for record in state.records:
            version = record.visible(now)
            if version is not None and matches.matches(record, version):
                found += 1
        if len(state.counts) > 64:  # every distinct window is a key: keep it bounded
            state.counts.clear()
        state.counts[key] = (state.edits, revealed, found)
        return found

    @staticmethod
    def _scan(
        state: _Entity, matches: _Filter, now: datetime, start: int, size: int
    ) -> tuple[list[_Record], int]:
        """Up to ``size`` visible matches from position ``start``; and where the scan ended."""
        hits: list[_Record] = []
        index = start
        records = state.records
        while index < len(records) and len(hits) < size:
            record = records[index]
            index += 1
            version = record.visible(now)
            if version is not None and matches.matches(record, version):
                hits.append(record)
        return hits, index


def _parse_end(value: str, name: str) -> datetime:
    return parse_timestamp(value, name, end=True)


def _opt(query: Mapping[str, str], name: str, parse: Callable[[str, str], _T]) -> _T | None:
    value = query.get(name)
    return parse(value, name) if value else None
