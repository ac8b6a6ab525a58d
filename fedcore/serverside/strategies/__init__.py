"""Server strategies: one per module, registered by name."""

from __future__ import annotations

from fedcore.core.records import Rejection
from fedcore.serverside.strategies.base import (
    EvaluateResult,
    Strategy,
    TrainResult,
    WeightedMetrics,
)
from fedcore.serverside.strategies.fedavg import FedAvg

__all__ = [
    "EvaluateResult",
    "FedAvg",
    "Rejection",
    "Strategy",
    "TrainResult",
    "WeightedMetrics",
]
