"""A built-in FMP-style market API over real HTTP, for the demo, the tests and benchmarks."""

from __future__ import annotations

from syncpoint.simulator.config import SimulatorConfig
from syncpoint.simulator.faults import FaultKind
from syncpoint.simulator.server import MarketSimulator, serve

__all__ = ["FaultKind", "MarketSimulator", "SimulatorConfig", "serve"]
