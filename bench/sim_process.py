"""The market API as its own process, with a control port that times its requests.

The throughput cases must not share a process (and its GIL) with the API they measure:
the simulator's threaded HTTP server would otherwise take CPU from the bench's own
watcher and, worse, its latency would depend on what the bench process does. So the
bench starts `python -m bench.sim_process`, which runs the same MarketSimulator that
`syncpoint simulate` serves, plus a second loopback port for the bench alone:

    GET  /stats         the simulator's counters (as /_sim/stats)
    POST /reset         reset the counters
    POST /watch/start   start timing requests (a thread samples the counter every 5 ms)
    POST /watch/stop    stop; answers {count, first, last, stalls, stalls_at, in_flight,
                        per_second} (stalls_at: where each stall began, seconds after the
                        first request; in_flight: mean requests being answered, sampled;
                        per_second: requests in each second from the first one on)

Times are time.monotonic() of this process: CLOCK_MONOTONIC is one clock for every process
on the machine, so the bench compares them with its own process start and exit times.
Sampling here, next to the counter, costs no HTTP round trip per sample.

The first line on stdout is JSON: {"base_url": ..., "control_url": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from syncpoint.simulator import MarketSimulator, SimulatorConfig

SAMPLE_SECONDS = 0.005
# A stretch this long with no new request is a stall (see bench.harness.STALL_SECONDS).
STALL_SECONDS = 0.1


class Watch:
    """First and last request seen while running, and the gaps without any."""

    def __init__(self, sim: MarketSimulator) -> None:
        self.sim = sim
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base = 0
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.stalls: list[float] = []
        self.stalls_at: list[float] = []  # where each stall began, seconds after the first
        self.in_flight_sum, self.in_flight_n = 0, 0  # requests being answered, sampled
        self.per_second: list[int] = []

    def start(self) -> None:
        self.stop()
        self._stop.clear()
        self.base = self.sim.live()[0]
        self.count, self.first, self.last, self.stalls = 0, None, None, []
        self.stalls_at = []
        self.in_flight_sum, self.in_flight_n = 0, 0
        self.per_second = []
        self._thread = threading.Thread(target=self._poll, name="sim-watch", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._sample()
        return {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "stalls": self.stalls,
            "stalls_at": self.stalls_at,
            "in_flight": self.in_flight_sum / max(1, self.in_flight_n),
            "per_second": self.per_second,
        }

    def _sample(self) -> None:
        # The live counters only: the whole snapshot, every 5 ms, cost the API process
        # a few percent of a core.
        requests, in_flight = self.sim.live()
        if self.first is not None:
            self.in_flight_sum += in_flight
            self.in_flight_n += 1
        seen = requests - self.base
        if seen != self.count:
            now = time.monotonic()
            if self.first is None:
                self.first = now
            elif self.last is not None and now - self.last >= STALL_SECONDS:
                self.stalls.append(now - self.last)
                self.stalls_at.append(self.last - self.first)
            self.last = now
            second = int(now - self.first)
            self.per_second.extend([0] * (second + 1 - len(self.per_second)))
            self.per_second[second] += seen - self.count
            self.count = seen

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(SAMPLE_SECONDS)


def control_server(sim: MarketSimulator, watch: Watch) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/stats":
                self._answer(sim.stats())
            else:
                self.send_error(404)

        def do_POST(self) -> None:
            if self.path == "/reset":
                sim.reset_stats()
                self._answer({"ok": True})
            elif self.path == "/watch/start":
                watch.start()
                self._answer({"ok": True})
            elif self.path == "/watch/stop":
                self._answer(watch.stop())
            else:
                self.send_error(404)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_process", description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit-per-minute", type=int, default=None)
    args = parser.parse_args(argv)
    sim = MarketSimulator(
        SimulatorConfig(
            latency_ms=args.latency_ms, rate_limit_per_minute=args.rate_limit_per_minute
        )
    )
    base_url = sim.start()
    watch = Watch(sim)
    control = control_server(sim, watch)
    host, port = control.server_address[:2]
    print(json.dumps({"base_url": base_url, "control_url": f"http://{host!s}:{port}"}), flush=True)
    try:
        control.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
