"""Prefect blocks for syncpoint; `prefect block register -m blocks` registers them all."""

from blocks.checkpoint import CheckpointStore
from blocks.market_api import MarketApi

__all__ = ["CheckpointStore", "MarketApi"]
