"""Keeping a run's claim alive while it works, from a background thread.

Batches can take minutes against a slow API, so the heartbeat does not wait for them:
a daemon thread refreshes it every `interval` seconds. If the claim was lost (another
process took the run over as stale), the run is asked to stop.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from syncpoint.core.interrupts import StopFlag
from syncpoint.core.ledger import Ledger
from syncpoint.core.redact import redact


class Heartbeat:
    def __init__(
        self,
        ledger: Ledger,
        run_id: str,
        owner: str,
        *,
        interval: float,
        stop: StopFlag,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self._ledger, self._run_id, self._owner = ledger, run_id, owner
        self._interval, self._stop, self._logger = interval, stop, logger
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="syncpoint-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._done.wait(self._interval):
            try:
                held = self._tick()
            except SQLAlchemyError as exc:
                # The store step will hit the same outage and report it; keep trying.
                self._logger.warning("heartbeat failed: %s", redact(str(exc)).splitlines()[0])
                continue
            except Exception as exc:
                # Anything else must not end the thread silently: an unrenewed claim or
                # lease is lost to another process.
                self._logger.error("heartbeat failed: %s", redact(repr(exc))[:300])
                continue
            if not held:
                self._stop.request("another process took over this run")
                self._logger.error("this run was taken over by another process: stopping")
                return

    def _tick(self) -> bool:
        """One beat; False if the claim is lost."""
        return self._ledger.heartbeat(self._run_id, self._owner)


class LeaseKeeper(Heartbeat):
    """Renews a sharded run worker's batch leases (Ledger.renew) while it works on them.

    A worker that dies stops renewing, so its leases run out and other workers take its
    items; a live one keeps them however slow the API is. A lease that ran out anyway (a
    database outage longer than the lease) is not renewed: its marks fail and its items
    are someone else's.
    """

    def __init__(
        self,
        ledger: Ledger,
        run_id: str,
        owner: str,
        *,
        seconds: float,
        stop: StopFlag,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    ) -> None:
        # Four renewals a term: one or two lost to a slow database still leave time.
        super().__init__(ledger, run_id, owner, interval=seconds / 4, stop=stop, logger=logger)
        self._seconds = seconds

    def _tick(self) -> bool:
        self._ledger.renew(self._run_id, self._owner, self._seconds)
        return True
