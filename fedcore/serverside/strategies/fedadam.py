"""FedAdam: Adam on the server (Reddi et al. 2021, "Adaptive Federated Optimization").

Reddi et al., ICLR 2021 (arXiv:2003.00295), Algorithm 2 with the Adam update::

    v_t = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t ** 2

and, as in Flower 1.42, Adam's bias correction folded into the step size with the
server round as the step count (Kingma and Ba 2015, before Section 2.1)::

    eta_t = eta * sqrt(1 - beta_2 ** (t + 1)) / (1 - beta_1 ** (t + 1))

See :mod:`fedcore.serverside.strategies.fedopt` for the shared step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcore.serverside.strategies.fedopt import FedOpt, FedOptOptions

__all__ = ["FedAdam", "FedAdamOptions"]


@dataclass(frozen=True)
class FedAdamOptions(FedOptOptions):
    """``[strategy.options]`` of ``fedadam`` (see :class:`FedOptOptions`).

    Defaults: ``eta = 0.01``, ``eta-l = 0.05`` (informational), ``beta-1 = 0.9``,
    ``beta-2 = 0.99``, ``tau = 1e-3``.
    """


class FedAdam(FedOpt):
    """Adam on the server's pseudo-gradient, with Flower's bias correction."""

    name = "fedadam"
    Options = FedAdamOptions

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """Exponential moving average of ``Delta ** 2``."""
        beta_2 = self.options.beta_2
        return beta_2 * v + (1.0 - beta_2) * delta_sq

    def step_size(self, server_round: int) -> float:
        """``eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))``."""
        o = self.options
        t = server_round + 1.0
        return o.eta * math.sqrt(1.0 - o.beta_2**t) / (1.0 - o.beta_1**t)
