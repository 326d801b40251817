"""Ctrl+C and SIGTERM: the first asks for a clean stop, the second is final.

First signal: no new batch starts; the batches in flight finish and are stored, the
checkpoint is flushed, and the run ends partial with the signal recorded, so the CLI
exits 130 (SIGINT) or 143 (SIGTERM). Second signal: exit at once; the next run redoes
only the batches that were in flight.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopFlag:
    """Set by a signal or a lost run claim: no new batch starts once it is set."""

    reason: str | None = None
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str, signum: int | None = None) -> None:
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
