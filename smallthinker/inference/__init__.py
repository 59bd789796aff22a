"""CPU offloading inference: experts on disk behind a fixed-size cache, loaded as the router picks them."""

from smallthinker.inference.engine import (
    MemoryBudgetError,
    OffloadEngine,
    load_offloaded,
    minimum_budget,
    parse_bytes,
    plan_for_store,
)
from smallthinker.inference.store import ExpertStore, StoreError, convert_checkpoint

__all__ = [
    "ExpertStore",
    "MemoryBudgetError",
    "OffloadEngine",
    "StoreError",
    "convert_checkpoint",
    "load_offloaded",
    "minimum_budget",
    "parse_bytes",
    "plan_for_store",
]
