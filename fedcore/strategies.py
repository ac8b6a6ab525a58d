"""Public strategy API: ``from fedcore.strategies import FedAvg, Strategy``.

The strategies live in :mod:`fedcore.serverside.strategies`; this module re-exports
what a user's own strategy needs (see docs/strategies.md).
"""

from __future__ import annotations

from fedcore.serverside.exchange import Aggregate, ClientUpdate
from fedcore.serverside.strategies import (
    STRATEGIES,
    FedAvg,
    NoOptions,
    Sampling,
    Strategy,
    apply_update,
    arrays_to_numpy,
    strategy_class,
)

__all__ = [
    "STRATEGIES",
    "Aggregate",
    "ClientUpdate",
    "FedAvg",
    "NoOptions",
    "Sampling",
    "Strategy",
    "apply_update",
    "arrays_to_numpy",
    "strategy_class",
]
