"""Prefect blocks for syncpoint; `prefect block register -m blocks` registers them all."""

from blocks.checkpoint import CheckpointStore
from blocks.dip_api import DipApi
from blocks.market_api import MarketApi

__all__ = ["CheckpointStore", "DipApi", "MarketApi"]
