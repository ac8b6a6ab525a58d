"""fedcore: federated learning on Flower.

Weighted FedAvg with a streaming kernel, pluggable ``torch.nn.Module`` models and
data, an embedded simulation engine, and the same Flower apps on Flower's Ray
and deployment engines.
"""

from __future__ import annotations

from fedcore.clientside.partition import dirichlet, iid, shards
from fedcore.core.aggregation import WeightedMean, weighted_mean
from fedcore.core.config import Config, config_from_dict, config_from_flat, to_flat
from fedcore.core.errors import (
    AggregationError,
    CheckpointError,
    ConfigError,
    DataError,
    FedcoreError,
    ModelError,
    ReplyError,
    RoundFailedError,
    SecureAggregationError,
)
from fedcore.core.sampling import sample_clients
from fedcore.serverside.strategies import FedAvg, Strategy
from fedcore.storage.configfile import load_config

__version__ = "0.1.0"

__all__ = [
    "AggregationError",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "FedAvg",
    "FedcoreError",
    "ModelError",
    "ReplyError",
    "RoundFailedError",
    "SecureAggregationError",
    "Strategy",
    "WeightedMean",
    "config_from_dict",
    "config_from_flat",
    "dirichlet",
    "iid",
    "load_config",
    "sample_clients",
    "shards",
    "to_flat",
    "weighted_mean",
]
