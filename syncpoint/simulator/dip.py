"""A DIP-style documents API (the shape of the Bundestag's public DIP API), HTTP-free.

``GET /api/v1/{entity}`` pages through an entity's records matching the optional filters,
ordered by ``(aktualisiert, id)`` ascending. The ``cursor`` it answers with is an opaque
token naming the last ``(aktualisiert, id)`` the page delivered (keyset paging, so records
edited mid-walk are not skipped: they move to the end). When nothing is left after a page,
the answer echoes the request's own cursor (``"*"`` when none was sent): that is how a DIP
client knows it is done.

Records are derived from SHA-256 of the seed, entity and index, never from Python's
``hash()``, so two simulators with the same seed serve identical data. ``dip_update`` /
``dip_add`` model upstream edits: the changed records move to the end of the order, which
is exactly what an ``f.aktualisiert.start`` incremental sync relies on.
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
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any, TypeVar

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
# "*": the first page; also what a finished first request echoes back.
INITIAL_CURSOR = "*"
# DIP's timestamps carry the Berlin offset; the simulator keeps a fixed +01:00.
DIP_TZ = timezone(timedelta(hours=1))
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

Key = tuple[datetime, str]
_T = TypeVar("_T")


class DipRequestError(ValueError):
    """A request the API answers with 400 (bad cursor, bad filter value)."""


@dataclass(frozen=True)
class DipPage:
    num_found: int
    cursor: str
    documents: list[dict[str, Any]]

    def payload(self) -> dict[str, Any]:
        return {"numFound": self.num_found, "cursor": self.cursor, "documents": self.documents}


@dataclass
class _Record:
    at: datetime  # aware; the parsed "aktualisiert"
    id: str
    datum: date
    base_titel: str
    # Replaced, never mutated, so a page can hand out its dicts outside the lock.
    doc: dict[str, Any]
    changes: int = 0

    @property
    def key(self) -> Key:
        return self.at, self.id


@dataclass
class _Entity:
    records: list[_Record]  # kept sorted by key
    by_id: dict[str, _Record]
    next_index: int
    updates: int = 0
    stuck: bool = False

    def resort(self) -> None:
        self.records.sort(key=lambda r: r.key)


# -- formats -------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """DIP's form: +01:00 offset, whole seconds unless the moment has a fraction."""
    local = moment.astimezone(DIP_TZ)
    return local.isoformat(timespec="seconds" if local.microsecond == 0 else "microseconds")


def parse_timestamp(value: str, name: str, end: bool = False) -> datetime:
    """An ISO 8601 timestamp, with or without offset (none: UTC). A bare YYYY-MM-DD is that
    day's first moment (``end``: its last) in UTC.
    """
    if _DATE_RE.fullmatch(value):
        day = _parse_day(value, name)
        return datetime.combine(day, time.max if end else time.min, UTC)
    if match := _LOST_PLUS_RE.fullmatch(value):
        value = f"{match.group(1)}+{match.group(2)}"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise DipRequestError(
            f"Invalid '{name}' {value!r}: expected an ISO 8601 timestamp or YYYY-MM-DD"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parse_day(value: str, name: str) -> date:
    try:
        if not _DATE_RE.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise DipRequestError(f"Invalid '{name}' date {value!r}: expected YYYY-MM-DD") from None


def encode_cursor(key: Key) -> str:
    """Opaque to clients: URL-safe base64 (unpadded) of ``[aktualisiert as UTC, id]``."""
    raw = json.dumps([key[0].astimezone(UTC).isoformat(), key[1]], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Key:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, record_id = json.loads(raw)
        if not isinstance(stamp, str) or not isinstance(record_id, str):
            raise TypeError(cursor)
        moment = datetime.fromisoformat(stamp)
        if moment.tzinfo is None:
            raise ValueError(stamp)
    except (binascii.Error, ValueError, TypeError):  # JSONDecodeError is a ValueError
        raise DipRequestError(f"Invalid cursor {cursor!r}") from None
    return moment, record_id


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
        self.window_start = datetime.combine(
            as_of - timedelta(days=AKTUALISIERT_DAYS), time.min, DIP_TZ
        )

    def units(self, source: str, index: int) -> tuple[float, ...]:
        return _units(f"dip|{self.seed}|{source}|{index}")

    def aktualisiert(self, source: str, index: int) -> datetime:
        if index % _TIE_EVERY == _TIE_AT:
            index -= 1
        minutes = int(self.units(source, index)[0] * AKTUALISIERT_DAYS * 24 * 60)
        return self.window_start + timedelta(minutes=minutes)

    def record(self, entity: str, index: int, at: datetime | None = None) -> _Record:
        source = _TEXT_OF.get(entity, entity)
        u = self.units(source, index)
        generated = self.aktualisiert(source, index)
        datum = generated.date() - timedelta(days=int(u[1] * DATUM_DAYS))
        if at is not None:  # added upstream just now: dated the day it appears
            generated, datum = at, at.astimezone(DIP_TZ).date()
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
        return _Record(at=generated, id=rid, datum=datum, base_titel=titel, doc=doc)

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


class DipData:
    """Every entity's records, generated on first use, shared by all handler threads."""

    def __init__(self, seed: int, as_of: date, records_per_entity: int) -> None:
        if not 0 <= records_per_entity <= MAX_RECORDS_PER_ENTITY:
            raise ValueError(f"records_per_entity must be within [0, {MAX_RECORDS_PER_ENTITY}]")
        self.seed = seed
        self.as_of = as_of
        self.records_per_entity = records_per_entity
        self._generator = _Generator(seed, as_of, records_per_entity)
        self._entities: dict[str, _Entity] = {}
        self._lock = threading.Lock()

    def records(self, entity: str) -> list[dict[str, Any]]:
        """The current records in API order, (aktualisiert, id) ascending."""
        with self._lock:
            return [dict(r.doc) for r in self._entity(entity).records]

    def page(self, entity: str, query: Mapping[str, str], page_size: int) -> DipPage:
        """One page for a request's query parameters; raises DipRequestError for a 400."""
        cursor = query.get("cursor") or None
        after = decode_cursor(cursor) if cursor not in (None, INITIAL_CURSOR) else None
        matches = _filter(query)
        with self._lock:
            state = self._entity(entity)
            found = [r for r in state.records if matches(r)]
            stuck = state.stuck
        echo = cursor or INITIAL_CURSOR
        if stuck and after is not None:
            # A broken upstream: past the first page, the same page under the same cursor.
            first = found[:page_size]
            page = found[page_size : 2 * page_size]
            next_cursor = encode_cursor(first[-1].key) if first else echo
        else:
            start = 0 if after is None else bisect.bisect_right([r.key for r in found], after)
            page = found[start : start + page_size]
            more = start + page_size < len(found)
            next_cursor = encode_cursor(page[-1].key) if more else echo
        return DipPage(len(found), next_cursor, [r.doc for r in page])

    def update(
        self,
        entity: str,
        ids: list[str] | None = None,
        count: int | None = None,
        at: datetime | None = None,
    ) -> list[str]:
        """Edit ``ids`` (or ``count`` records picked deterministically): ``aktualisiert``
        becomes ``at`` (default: now, later than every existing value) and the title gets a
        " (geändert N)" suffix, N counting that record's edits. Returns the changed ids.
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
            moment = self._moment(state, at)
            for rid in ids:
                record = state.by_id[rid]
                record.changes += 1
                record.at = moment
                record.doc = record.doc | {
                    "aktualisiert": format_timestamp(moment),
                    "titel": f"{record.base_titel} (geändert {record.changes})",
                }
            state.resort()
            return ids

    def add(self, entity: str, count: int = 1, at: datetime | None = None) -> list[str]:
        """Append ``count`` new records, ``aktualisiert`` = ``at`` (default: now, later than
        every existing value), ``datum`` = that day. Returns their ids.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            state = self._entity(entity)
            if state.next_index + count > MAX_RECORDS_PER_ENTITY:
                raise ValueError("too many records")
            moment = self._moment(state, at)
            added = []
            for index in range(state.next_index, state.next_index + count):
                record = self._generator.record(entity, index, at=moment)
                state.records.append(record)
                state.by_id[record.id] = record
                added.append(record.id)
            state.next_index += count
            state.resort()
            return added

    def set_stuck(self, entity: str, on: bool) -> None:
        with self._lock:
            self._entity(entity).stuck = on

    def clear_stuck(self) -> None:
        with self._lock:
            for state in self._entities.values():
                state.stuck = False

    def _entity(self, entity: str) -> _Entity:
        """The entity's state, generated on first use; call with the lock held."""
        state = self._entities.get(entity)
        if state is None:
            if entity not in ENTITIES:
                raise ValueError(f"unknown DIP entity {entity!r}; expected one of {ENTITIES}")
            records = [self._generator.record(entity, i) for i in range(self.records_per_entity)]
            state = _Entity(records, {r.id: r for r in records}, self.records_per_entity)
            state.resort()
            self._entities[entity] = state
        return state

    @staticmethod
    def _moment(state: _Entity, at: datetime | None) -> datetime:
        if at is not None:
            return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        now = datetime.now(UTC).replace(microsecond=0)
        if state.records and now <= (latest := state.records[-1].at):
            now = latest.replace(microsecond=0) + timedelta(seconds=1)
        return now


def _filter(query: Mapping[str, str]) -> Callable[[_Record], bool]:
    """A predicate for the request's (inclusive, optional) filters, validated up front."""
    a_start = _opt(query, "f.aktualisiert.start", parse_timestamp)
    a_end = _opt(query, "f.aktualisiert.end", _parse_end)
    d_start = _opt(query, "f.datum.start", _parse_day)
    d_end = _opt(query, "f.datum.end", _parse_day)

    def matches(record: _Record) -> bool:
        return (
            (a_start is None or record.at >= a_start)
            and (a_end is None or record.at <= a_end)
            and (d_start is None or record.datum >= d_start)
            and (d_end is None or record.datum <= d_end)
        )

    return matches


def _parse_end(value: str, name: str) -> datetime:
    return parse_timestamp(value, name, end=True)


def _opt(query: Mapping[str, str], name: str, parse: Callable[[str, str], _T]) -> _T | None:
    value = query.get(name)
    return parse(value, name) if value else None
