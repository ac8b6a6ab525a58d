"""FedAvgM: federated averaging with server momentum.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv:1909.06335, 2019.

The server treats the negated mean update as a pseudo-gradient and takes an SGD
step with heavy-ball momentum on it (PyTorch's convention, as Flower 1.42 does)::

    v_t     = beta * v_{t-1} + Delta_t        (v_1 = Delta_1)
    x_{t+1} = x_t + eta * v_t

with ``Delta_t`` the example-weighted mean of the clients' updates. Linear: works
unchanged under secure aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedcore.serverside.strategies.base import (
    Aggregate,
    Sampling,
    Strategy,
    apply_update,
    prefixed,
    unprefixed,
)

__all__ = ["FedAvgM", "FedAvgMOptions"]

_MOMENTUM = "momentum."


@dataclass(frozen=True)
class FedAvgMOptions:
    """``[strategy.options]`` of ``fedavgm``.

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        ``eta``, the server's step size on the momentum buffer (``server-learning-rate``).
    server_momentum : float (default: 0.5)
        ``beta``, the server momentum (``server-momentum``); 0 with ``eta = 1`` is FedAvg.

    """

    server_learning_rate: float = 1.0
    server_momentum: float = 0.5

    def __post_init__(self) -> None:
        """Range checks (``field: allowed`` becomes the ConfigError's text)."""
        if not (math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0):
            raise ValueError("server_learning_rate: must be a finite number > 0")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError("server_momentum: must be in [0, 1)")


class FedAvgM(Strategy):
    """Server momentum on the mean update (see the module docstring).

    Parameters
    ----------
    options : FedAvgMOptions, optional
        Server learning rate and momentum.
    seed : int (default: 0)
        Run seed (client sampling).
    sampling : Sampling, optional
        Who takes part in each round.

    Notes
    -----
    State: the momentum buffer ``v`` (float64), checkpointed as ``momentum.<array>``.

    """

    name = "fedavgm"
    Options = FedAvgMOptions

    def __init__(
        self,
        options: FedAvgMOptions | None = None,
        *,
        seed: int = 0,
        sampling: Sampling | None = None,
    ) -> None:
        super().__init__(options, seed=seed, sampling=sampling)
        self.momentum: dict[str, np.ndarray] | None = None

    def server_update(
        self, server_round: int, arrays: ArrayRecord, aggregate: Aggregate
    ) -> ArrayRecord:
        """``v = beta v + Delta``; ``x + eta v``."""
        assert aggregate.update is not None
        beta = self.options.server_momentum
        if self.momentum is None:
            self.momentum = {k: np.array(u, dtype=np.float64) for k, u in aggregate.update.items()}
        else:
            self.momentum = {
                k: beta * self.momentum[k] + np.asarray(u, dtype=np.float64)
                for k, u in aggregate.update.items()
            }
        return apply_update(arrays, self.momentum, scale=self.options.server_learning_rate)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The momentum buffer (empty before the first update)."""
        return prefixed(_MOMENTUM, self.momentum)

    def load_state(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Restore the momentum buffer."""
        self.momentum = unprefixed(_MOMENTUM, arrays)
