"""Flower record conventions fedcore speaks, and torch <-> record conversions.

Server -> client: ``"arrays"`` (ArrayRecord, the global model) and ``"config"``
(ConfigRecord with ``"server-round"`` and training settings). Client -> server:
``"arrays"`` (train only) and ``"metrics"`` (MetricRecord with
``"num-examples"``). A stock Flower ClientApp that follows these can join.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

from fedcore.core.aggregation import numpy_to_array

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ARRAYS",
    "ATTEMPT",
    "CONFIG",
    "METRICS",
    "NUM_EXAMPLES",
    "Rejection",
    "load_arrays",
    "model_to_arrays",
]

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
#: Training-config key: which attempt at the round this is (absent or 0: the first);
#: a client mixes it into its training seed, so a retried round shuffles anew.
ATTEMPT = "attempt"


@dataclass(frozen=True)
class Rejection:
    """One reply that was not used, and why."""

    node_id: int
    stage: str
    reason: str

    def __str__(self) -> str:
        return f"client {self.node_id} ({self.stage}): {self.reason}"


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's ``state_dict`` (parameters and buffers) as an ``ArrayRecord``."""
    return ArrayRecord(
        {k: numpy_to_array(v.detach().cpu().numpy()) for k, v in model.state_dict().items()}
    )


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ``ArrayRecord`` into ``model`` in place (strict: same keys and shapes)."""
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
