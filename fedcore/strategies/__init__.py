"""Server strategies: one per module, registered by name."""

from __future__ import annotations

from .base import EvaluateResult, Rejection, Strategy, TrainResult, WeightedMetrics
from .fedavg import FedAvg

__all__ = [
    "EvaluateResult",
    "FedAvg",
    "Rejection",
    "Strategy",
    "TrainResult",
    "WeightedMetrics",
]
