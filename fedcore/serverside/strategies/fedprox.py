"""FedProx: FedAvg on the server, a proximal term on every client.

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020 (arXiv:1812.06127).

Each client minimizes ``F_k(w) + mu/2 * ||w - w_global||^2`` instead of ``F_k(w)``,
which bounds how far local training drifts from the global model on
heterogeneous data. The server sends ``proximal-mu`` in every training message's
config; the client's built-in loop adds the term
(:meth:`fedcore.clientside.training.TrainSettings.regularize`, also callable from a
user's own train function). The server update is FedAvg's. Linear: works unchanged
under secure aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedcore.serverside.strategies.fedavg import FedAvg

__all__ = ["PROXIMAL_MU", "FedProx", "FedProxOptions"]

#: The training-message config key carrying ``mu``.
PROXIMAL_MU = "proximal-mu"


@dataclass(frozen=True)
class FedProxOptions:
    """``[strategy.options]`` of ``fedprox``.

    Parameters
    ----------
    proximal_mu : float (default: 0.01)
        ``mu``, the weight of the proximal term (``proximal-mu``); 0 is FedAvg.

    """

    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        """Range check (``field: allowed`` becomes the ConfigError's text)."""
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError("proximal_mu: must be a finite number >= 0")


class FedProx(FedAvg):
    """FedAvg whose clients train with a proximal term of weight ``proximal-mu``."""

    name = "fedprox"
    Options = FedProxOptions

    def train_config(self, server_round: int) -> dict[str, Any]:
        """``{"proximal-mu": mu}`` in every training message."""
        return {PROXIMAL_MU: float(self.options.proximal_mu)}
