"""Ctrl+C and SIGTERM: the first asks for a clean stop, the second is final.

First signal: no new batch starts; the batches in flight finish and are stored, the
checkpoint is flushed, and the run ends partial with the signal recorded, so the CLI
exits 130 (SIGINT) or 143 (SIGTERM). Second signal: exit at once; the next run redoes
only the batches that were in flight.

A stop also cuts every wait short (a retry's backoff, a Retry-After, the rate limiter's
pause): the waits sleep through `interruptible_sleep`, which watches one process-wide
event that every `StopFlag.request` sets. An event rather than the flag itself, because
Prefect runs each async task on its own event loop in a worker thread, far from the
StopFlag the flow holds; a threading.Event is visible from all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TypeVar

from syncpoint.core.errors import SyncError

HANDLED = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")

# How often a sleeping wait looks at the stop event: the longest a stop waits for a
# sleeper to notice, and cheap (one timer per slice) even for a 120 s wait.
STOP_POLL_SECONDS = 0.1

_stop_event = threading.Event()


class WaitInterrupted(SyncError):
    """A wait was cut short because a stop was requested; `seconds` is what it was asked."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"stopped while waiting {seconds:.1f}s: a stop was requested")
        self.seconds = seconds


def stop_requested() -> bool:
    """Whether a stop was requested in this process since the current run began."""
    return _stop_event.is_set()


def clear_stop_request() -> None:
    """Forget an earlier stop request: a new run (or test) in the same process waits again."""
    _stop_event.clear()


async def interruptible_sleep(seconds: float) -> None:
    """asyncio.sleep that raises WaitInterrupted as soon as a stop is requested.

    Sleeps in short slices and looks at the process-wide event between them, which works
    on any event loop in any thread (an asyncio.Event would belong to one loop). A stop
    that was requested before the call raises at once, even for a zero wait, so a request
    never starts another retry after a stop.
    """
    if _stop_event.is_set():
        raise WaitInterrupted(seconds)
    if not seconds > 0:  # also NaN: nothing sensible to wait for
        return
    if math.isinf(seconds):
        raise ValueError("refusing to sleep forever: cap the wait first")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, STOP_POLL_SECONDS))
        if _stop_event.is_set():
            raise WaitInterrupted(seconds)


async def interruptible(awaitable: Awaitable[T], seconds: float) -> T:
    """The result of `awaitable`, or WaitInterrupted (and it cancelled) once a stop comes.

    For waits that are not ours to slice (a Prefect concurrency slot); `seconds` is the
    bound the caller already put on it, for the message.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            if _stop_event.is_set():
                raise WaitInterrupted(seconds)
            done, _ = await asyncio.wait({task}, timeout=STOP_POLL_SECONDS)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


@dataclass
class StopFlag:
    """Set by a signal or a lost run claim: no new batch starts once it is set.

    Creating one starts a run's stop state afresh: a stop requested for an earlier run of
    this process (tests run many) no longer cuts this run's waits short.
    """

    reason: str | None = None
    signum: int | None = None

    def __post_init__(self) -> None:
        if self.reason is None:
            clear_stop_request()
        else:
            _stop_event.set()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str, signum: int | None = None) -> None:
        # Set the event even when the flag was already set: it may have been cleared by a
        # run started since (the event is per process, the flag per run).
        _stop_event.set()
        if self.reason is None:
            self.reason, self.signum = reason, signum


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


@contextmanager
def graceful_stop(stop: StopFlag, resume_hint: str) -> Iterator[None]:
    """Route SIGINT/SIGTERM to `stop` while the block runs (main thread only).

    Elsewhere (a worker thread) signals cannot be caught and Prefect's own handling applies.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.requested:
            _say(f"{name} again: exiting now. {resume_hint}")
            os._exit(exit_code(signum))
        stop.request(f"interrupted by {name}", signum)
        _say(
            f"{name} received: finishing the batches in flight, then stopping "
            f"(send it again to exit at once). {resume_hint}"
        )

    previous = {sig: signal.signal(sig, handle) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread (and in processes started meanwhile); deliver it after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _say(message: str) -> None:
    # Straight to the terminal: logging may be buffered or shipped to the Prefect API.
    try:
        sys.stderr.write(f"syncpoint: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
