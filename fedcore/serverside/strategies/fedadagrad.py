"""FedAdagrad: Adagrad on the server (Reddi et al. 2021, "Adaptive Federated Optimization").

Reddi et al., ICLR 2021 (arXiv:2003.00295), Algorithm 2 with the Adagrad update::

    v_t = v_{t-1} + Delta_t ** 2

``beta-1`` defaults to 0 (no momentum), which is what Flower 1.42's FedAdagrad fixes;
the paper allows momentum. No bias correction. See
:mod:`fedcore.serverside.strategies.fedopt` for the shared step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcore.serverside.strategies.fedopt import FedOpt, check_fedopt_options

__all__ = ["FedAdagrad", "FedAdagradOptions"]


@dataclass(frozen=True)
class FedAdagradOptions:
    """``[strategy.options]`` of ``fedadagrad``.

    Parameters
    ----------
    eta : float (default: 0.01)
        Server learning rate (``eta``).
    eta_l : float (default: 0.05)
        Client learning rate, informational only (``eta-l``); clients use ``train.lr``.
    beta_1 : float (default: 0.0)
        First-moment (momentum) decay (``beta-1``); 0 as in Flower.
    tau : float (default: 1e-3)
        Adaptivity, added to ``sqrt(v)`` (``tau``).

    """

    eta: float = 0.01
    eta_l: float = 0.05
    beta_1: float = 0.0
    tau: float = 1e-3

    def __post_init__(self) -> None:
        """Range checks (``field: allowed`` becomes the ConfigError's text)."""
        check_fedopt_options(self)


class FedAdagrad(FedOpt):
    """Adagrad on the server's pseudo-gradient."""

    name = "fedadagrad"
    Options = FedAdagradOptions

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """``v + Delta^2``."""
        return v + delta_sq
