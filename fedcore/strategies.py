"""Public strategy API: ``from fedcore.strategies import FedAvg, Strategy``.

The strategies live in :mod:`fedcore.serverside.strategies`; this module re-exports
what a user's own strategy needs (see docs/strategies.md).
"""

from __future__ import annotations

from fedcore.serverside.exchange import Aggregate, ClientUpdate
from fedcore.serverside.strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedOpt,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    NoOptions,
    Sampling,
    Scaffold,
    Strategy,
    apply_update,
    arrays_to_numpy,
    strategy_class,
)
from fedcore.serverside.strategies.base import prefixed, stacked_updates, unprefixed

__all__ = [
    "STRATEGIES",
    "Aggregate",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "NoOptions",
    "Sampling",
    "Scaffold",
    "Strategy",
    "apply_update",
    "arrays_to_numpy",
    "prefixed",
    "stacked_updates",
    "strategy_class",
    "unprefixed",
]
