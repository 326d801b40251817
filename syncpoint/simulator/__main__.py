"""``python -m syncpoint.simulator``: run the market API in the foreground."""

from __future__ import annotations

import argparse
from datetime import date

from syncpoint.simulator.config import SimulatorConfig
from syncpoint.simulator.server import serve


def parse_args(argv: list[str] | None = None) -> SimulatorConfig:
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(prog="python -m syncpoint.simulator", description=__doc__)
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    parser.add_argument("--error-rate", type=float, default=defaults.error_rate)
    parser.add_argument(
        "--rate-limit-error-rate", type=float, default=defaults.rate_limit_error_rate
    )
    parser.add_argument("--retry-after-seconds", type=float, default=defaults.retry_after_seconds)
    parser.add_argument("--rate-limit-per-minute", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--as-of", type=date.fromisoformat, default=None)
    parser.add_argument("--stock-list-size", type=int, default=defaults.stock_list_size)
    parser.add_argument(
        "--dip-records-per-entity", type=int, default=defaults.dip_records_per_entity
    )
    parser.add_argument("--dip-page-size", type=int, default=defaults.dip_page_size)
    parser.add_argument("--dip-text-page-size", type=int, default=defaults.dip_text_page_size)
    parser.add_argument(
        "--dip-visibility-delay-seconds",
        type=float,
        default=defaults.dip_visibility_delay_seconds,
        help="how long a DIP change takes to become visible (default 900, DIP's 15 minutes)",
    )
    return SimulatorConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    serve(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
