"""One request pace for the whole process, shared by every batch, task and event loop.

Prefect runs async tasks on their own event loops in worker threads, so an asyncio lock
would not be shared: a threading.Lock reserves the next slot, the wait happens outside it.
A 429 pushes the shared next slot back, so every request slows down, not only the refused
one. Whatever the API asks for, a pause is capped (`max_wait`), and the default sleep ends
as soon as a stop is requested (syncpoint.core.interrupts).

A Prefect global concurrency limit with slot decay is one budget for every worker and
process (see GlobalBudget): slots are drawn in chunks by one drawer thread per process and
spent one per request. Drawing through Prefect's `rate_limit()` instead delivered 48-80%
of such a budget in bench case 2 (Prefect 3.8.8, SQLite-backed server, two cores): its
acquisitions queue one behind another per process; an increment often fails with
"database is locked" (a read-then-write transaction beside the server's own writes for
the run's task runs), which Prefect's client retries only after about two seconds; and a
denied increment comes back with a Retry-After that grows with the slots denied before
it. A limit holds only its slots' worth of budget (one second there): a draw stalled for
longer than the room left in it loses the rest for good. Drawn as below, the same case
delivered 101% with one process (the limit's burst at the start included) and 96-98% with
three processes sharing the limit, with no 429 (BENCHMARKS.md, case 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from syncpoint.core.errors import ConfigError, RetriableApiError
from syncpoint.core.interrupts import interruptible, interruptible_sleep

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# The one cap on any single wait an API can impose (Retry-After, a limiter pause, a retry's
# backoff): long enough to honour a real API's "come back in a minute or two", short
# enough that one hostile answer cannot stall a nightly run.
DEFAULT_MAX_WAIT = 120.0

# A draw from a global limit takes this many seconds of its budget (its slot decay), at
# most half its slots (so that two workers can each hold a chunk) and at least one. A
# draw made when the limit has room for exactly one chunk leaves the rest of the limit,
# here half a second, for the next draw's round trip: a draw that stalls for less loses
# nothing.
CHUNK_SECONDS = 0.5
# The longest one call to the Prefect API may take before the drawer gives up on it and
# asks again (a healthy one takes 10-40 ms here): a bound for a stuck connection, not a
# latency target. A short one did harm: on a SQLite-backed server an increment waiting for
# the write lock keeps waiting after its client has gone, so every call given up on left
# one more writer queued for the lock, the run's own task-run writes starved behind them
# (a three-process run stalled for a minute). An increment given up on may still have
# taken its slots: they are lost to this process, never spent twice.
DRAW_CALL_TIMEOUT = 10.0
# Pause after a failed call (a 503, a timeout, a transport error) before the drawer reads
# again; jittered up to twice as long, so that workers refused together do not retry
# together.
DRAW_RETRY_SECONDS = 0.05
# Workers waiting for the same room in the limit spread their draws over this share of a
# chunk's time, so that one of them gets it and the others read again, rather than all
# of them being denied together.
DRAW_JITTER = 0.1
# A drawer with nothing asked of it for this long ends its thread (and its client); the
# next request starts a new one.
DRAWER_IDLE_SECONDS = 30.0


def global_chunk(limit: int, decay_per_second: float) -> int:
    """Slots to take from a global limit per draw (see CHUNK_SECONDS)."""
    return max(1, min(limit // 2, math.ceil(decay_per_second * CHUNK_SECONDS)))


def draw_wait(limit: int, active: float, chunk: int, decay_per_second: float) -> float:
    """Seconds until a limit holding `active` slots has room for `chunk` more, at its decay."""
    excess = active + chunk - limit
    if excess <= 0:
        return 0.0
    return excess / decay_per_second


class Cover:
    """How many of this process's drawn slots the limit still counts, at most.

    The Prefect limit counts slots as they are taken and forgets them at its decay rate;
    this is the same leaky bucket fed only with this process's draws, each from the moment
    its request left (never later than the server took it), so it never exceeds this
    process's share of what the server counts. Unspent slots beyond it are dropped: spent
    later, they would add to slots the limit has already handed out again, and a worker
    that held its chunks (a slow API, a paused batch) could then send more than
    limit + decay x window in a window. Kept to it, every process together never does,
    but for the part of a slot each process may hold (see GlobalBudget._spendable).
    """

    def __init__(self, decay_per_second: float) -> None:
        self.decay = decay_per_second
        self._level = 0.0
        self._at = 0.0

    def level(self, now: float) -> float:
        if now <= self._at:
            return self._level
        return max(0.0, self._level - self.decay * (now - self._at))

    def credit(self, slots: int, drawn_at: float) -> None:
        """Slots drawn by a request that left at `drawn_at`."""
        if drawn_at >= self._at:
            self._level = self.level(drawn_at) + slots
            self._at = drawn_at
        else:
            # Counted from later than it was drawn, its decay would be understated: count
            # only what is left of it by the bucket's own time.
            self._level += max(0.0, slots - self.decay * (self._at - drawn_at))


def slots_still_counted(bank: int, cover: float) -> int:
    """Of `bank` slots in hand, those the limit still counts: its cover, rounded up (a slot
    still partly counted is kept; see GlobalBudget._spendable)."""
    return min(bank, math.ceil(cover))


def bounded_wait(seconds: float, cap: float) -> float:
    """`seconds` clamped to [0, cap]; infinity and NaN (nonsense from upstream) count as cap."""
    if math.isnan(seconds):
        return cap
    return min(max(0.0, seconds), cap)


def check_max_wait(cap: float) -> float:
    """A usable cap: finite and positive, or ValueError."""
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"the wait cap must be a positive number of seconds, not {cap!r}")
    return float(cap)


class RateLimiter:
    """Evenly spaced slots: at most `per_minute` requests in any minute, no bursts."""

    def __init__(
        self,
        per_minute: float | None,
        *,
        global_limit: str | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
        clock: Clock = time.monotonic,
        sleep: Sleep = interruptible_sleep,
    ) -> None:
        if per_minute is not None and per_minute <= 0:
            raise ValueError("per_minute must be positive or None (unlimited)")
        self.per_minute = per_minute
        self.max_wait = check_max_wait(max_wait)
        # A Prefect global concurrency limit with slot decay: one budget for every worker.
        self.global_limit = global_limit
        self.budget = GlobalBudget(global_limit) if global_limit else None
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0  # the earliest time the next request may go out
        self.sent = 0
        self.waited = 0.0

    @property
    def draws(self) -> int:
        """Chunks drawn from the global limit so far."""
        return self.budget.draws if self.budget else 0

    def _reserve(self) -> float:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
            self.sent += 1
            return slot - now

    async def acquire(self) -> None:
        """Wait for this request's slot."""
        delay = self._reserve()
        if delay > 0:
            self.waited += delay
            await self._sleep(delay)
        if self.budget:
            await interruptible(self.budget.take(self.max_wait), self.max_wait)

    def pause(self, seconds: float) -> None:
        """The API asked everyone to back off: no slot before now + seconds (at most max_wait).

        The cap matters most here: an uncapped pause (`Retry-After: 999999`) would hold back
        every request of the process, not only the one that was refused.
        """
        wait = bounded_wait(seconds, self.max_wait)
        with self._lock:
            self._next = max(self._next, self._clock() + wait)

    def close(self) -> None:
        """End the global budget's drawer, if any (its unspent slots decay unused)."""
        if self.budget:
            self.budget.close()


class GlobalBudget:
    """This process's share of a Prefect global concurrency limit with slot decay.

    One drawer thread, with its own event loop and one Prefect client, keeps the process
    supplied: whenever less than a chunk is in hand and slots are being spent, it reads
    the limit (a read takes no write lock on the server and changes nothing), sleeps until
    the limit has room for a chunk, and takes it then, so the next chunk is in hand before
    the last one runs out and a draw is rarely denied. It calls the Prefect API itself
    rather than through `rate_limit()`, whose acquisitions queue one behind another per
    process and whose client sleeps out Retry-After and 503 answers itself; here a 503
    comes back at once and the drawer reads again shortly. Requests on any event loop
    take slots from the bank, or wait for the drawer to hand them one.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._bank = 0  # slots drawn and not yet spent
        self._cover: Cover | None = None  # set by the first read of the limit
        self._chunk = 1
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._spent_since_draw = False
        self._failure: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # What the drawer did: chunks taken, denials, calls given up on, unspent slots
        # dropped because the limit no longer counted them; for benchmarks.
        self.draws = 0
        self.denied = 0
        self.timeouts = 0
        self.dropped = 0

    async def take(self, max_wait: float) -> None:
        """One slot, from the bank or from the next draw (at most `max_wait` seconds)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._failure is not None:
                raise self._failure
            self._spent_since_draw = True
            if self._spendable(time.monotonic()) >= 1:
                self._bank -= 1
                if self._bank < self._chunk:
                    self._nudge()
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            self._nudge()
        try:
            await asyncio.wait_for(waiter, max_wait)
        except TimeoutError:
            raise RetriableApiError(
                f"no slot from Prefect global concurrency limit {self.name!r} within "
                f"{max_wait:.0f}s"
            ) from None
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._nudge()

    # --- under self._lock ------------------------------------------------------------

    def _spendable(self, now: float) -> int:
        """The bank, after dropping what the limit no longer counts (see Cover).

        A slot the limit still counts a part of stays spendable (ceil, not floor). Under
        a binding budget the bank runs dry between draws, so each chunk arrives with the
        cover at zero, already decayed by the draw's round trip (25/s x 20-80 ms: 0.5-2
        slots). Rounding that down dropped a whole slot of every 12-slot chunk: one worker
        got 86% of a 25/s budget against a PostgreSQL-backed server (bench case 10), 97%
        with ceil. The price is under one slot per process beyond limit + decay x window,
        less than the server itself forgets: it rounds its decay down at every write.
        """
        if self._cover is not None:
            kept = slots_still_counted(self._bank, self._cover.level(now))
            self.dropped += self._bank - kept
            self._bank = kept
        return self._bank

    def _nudge(self) -> None:
        """Wake the drawer, starting it if it is not running."""
        if self._thread is None:
            if self._closed:
                return
            context = contextvars.copy_context()  # the caller's Prefect settings
            self._thread = threading.Thread(
                target=context.run,
                args=(self._run,),
                name=f"syncpoint-budget-{self.name}",
                daemon=True,
            )
            self._thread.start()
        elif self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop closing: see _run's finally
                self._loop.call_soon_threadsafe(self._wake.set)

    def _wanted(self) -> bool:
        return bool(self._waiters) or (self._spent_since_draw and self._bank < self._chunk)

    def _fail(self, failure: BaseException, *, lasting: bool = True) -> None:
        """Fail the waiters; a lasting failure (the limit is unusable) fails every later
        request too, without asking the Prefect API again."""
        if lasting:
            self._failure = failure
        while self._waiters:
            _hand(self._waiters.popleft(), failure)

    def _deposit(self, slots: int, drawn_at: float) -> None:
        assert self._cover is not None
        self._cover.credit(slots, drawn_at)
        self._bank += slots
        self._spendable(time.monotonic())
        while self._waiters and self._bank >= 1:
            if _hand(self._waiters.popleft(), None):
                self._bank -= 1
        self._spent_since_draw = bool(self._waiters)
        self.draws += 1

    # --- the drawer thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._drawer())
        except Exception as exc:  # e.g. no Prefect API to open a client to
            # The waiters' requests fail as transient (retried, or the item left for a
            # later run) rather than wait out their cap; the next request starts a new
            # drawer.
            with self._lock:
                self._fail(
                    RetriableApiError(
                        f"no slot from Prefect global concurrency limit {self.name!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ),
                    lasting=False,
                )
        finally:
            with self._lock:
                self._thread = None
                self._loop = None
                self._wake = None
                if self._waiters and not self._closed and self._failure is None:
                    self._nudge()  # asked for while it was winding down

    async def _drawer(self) -> None:
        from prefect.client.orchestration import get_client

        wake = asyncio.Event()
        with self._lock:
            self._loop, self._wake = asyncio.get_running_loop(), wake
        # A 503 ("database is locked" on a SQLite-backed server) is raised at once instead
        # of being slept out by Prefect's client for about two seconds.
        async with get_client(httpx_settings={"event_hooks": {"response": [_busy]}}) as client:
            while True:
                with self._lock:
                    if self._closed:
                        self._loop = self._wake = None
                        return
                    wanted = self._wanted()
                    if not wanted:
                        wake.clear()
                if not wanted:
                    try:
                        await asyncio.wait_for(wake.wait(), DRAWER_IDLE_SECONDS)
                    except TimeoutError:
                        with self._lock:
                            if not self._wanted():
                                # From here on a request starts a new drawer, or is
                                # handed to one by _run's finally.
                                self._loop = self._wake = None
                                return
                    continue
                try:
                    await self._draw(client)
                except ConfigError as exc:
                    with self._lock:
                        self._fail(exc)
                    return
                except Exception:  # a 503, a timeout, a transport error: ask again shortly
                    await asyncio.sleep(DRAW_RETRY_SECONDS * random.uniform(1, 2))

    async def _draw(self, client: PrefectClient) -> None:
        """Read the limit, wait for room for a chunk, take it."""
        import httpx
        from prefect.exceptions import ObjectNotFound

        try:
            limit = await self._call(client.read_global_concurrency_limit_by_name(self.name))
        except ObjectNotFound:
            raise self._missing() from None
        decay = limit.slot_decay_per_second or 0.0
        if decay <= 0:
            raise self._missing()
        chunk = global_chunk(limit.limit, decay)
        with self._lock:
            self._chunk = chunk
            if self._cover is None or self._cover.decay != decay:
                self._cover = Cover(decay)
        wait = draw_wait(limit.limit, limit.active_slots, chunk, decay)
        if wait > 0:
            # Then read again rather than increment blind: another worker may have taken
            # the room meanwhile, and a denied increment costs more than a read. The
            # server stamps a denied limit as updated without decaying its slots, so a
            # denial throws away the decay since the last write (up to a chunk's worth).
            await asyncio.sleep(wait + random.uniform(0, DRAW_JITTER * chunk / decay))
            return
        drawn_at = time.monotonic()
        try:
            response = await self._call(
                client.increment_concurrency_slots(
                    names=[self.name], slots=chunk, mode="rate_limit"
                )
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:  # another worker took the room: read again
                self.denied += 1
                return
            if exc.response.status_code in (404, 422):
                raise self._missing() from None
            raise
        if not response.json():  # the server skips a limit that does not exist
            raise self._missing()
        with self._lock:
            self._deposit(chunk, drawn_at)

    async def _call(self, call: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(call, DRAW_CALL_TIMEOUT)
        except TimeoutError:
            self.timeouts += 1
            raise

    def _missing(self) -> ConfigError:
        return ConfigError(
            f"Prefect global concurrency limit {self.name!r} does not exist (or has no slot "
            f"decay); create it with: prefect gcl create {self.name} --limit 10 "
            "--slot-decay-per-second 1.5"
        )


class PrefectApiBusy(Exception):
    """The Prefect API answered 503: try again shortly."""


async def _busy(response: Any) -> None:
    """An httpx response hook: a 503 raises before Prefect's client can retry it itself."""
    if response.status_code == 503:
        raise PrefectApiBusy(f"Prefect API busy: {response.request.url}")


def _hand(waiter: asyncio.Future[None], failure: BaseException | None) -> bool:
    """Settle a waiter from the drawer's thread; False if its loop has already closed."""
    try:
        waiter.get_loop().call_soon_threadsafe(_settle, waiter, failure)
    except RuntimeError:
        return False
    return True


def _settle(waiter: asyncio.Future[None], failure: BaseException | None) -> None:
    """On the waiter's own loop: hand it its slot, or the drawer's failure."""
    if waiter.done():
        return
    if failure is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(failure)


_shared: dict[tuple[str, str | None], RateLimiter] = {}
_shared_lock = threading.Lock()


def shared_limiter(
    key: str,
    per_minute: float | None,
    global_limit: str | None = None,
    max_wait: float = DEFAULT_MAX_WAIT,
) -> RateLimiter:
    """The process-wide limiter for `key` (a base URL); created on first use."""
    with _shared_lock:
        limiter = _shared.get((key, global_limit))
        if limiter is None or limiter.per_minute != per_minute:
            limiter = _shared[(key, global_limit)] = RateLimiter(
                per_minute, global_limit=global_limit, max_wait=max_wait
            )
        # The latest setting wins without resetting the pace: one API, one cap.
        limiter.max_wait = check_max_wait(max_wait)
        return limiter


def drop_limiter(key: str, global_limit: str | None = None) -> None:
    """Forget a shared limiter (tests and the end of a run)."""
    with _shared_lock:
        limiter = _shared.pop((key, global_limit), None)
    if limiter is not None:
        limiter.close()
