"""Prefect blocks for syncpoint; `prefect block register -m syncpoint.blocks` registers them all."""

from syncpoint.blocks.checkpoint import CheckpointStore
from syncpoint.blocks.dip_api import DipApi
from syncpoint.blocks.market_api import MarketApi

__all__ = ["CheckpointStore", "DipApi", "MarketApi"]
