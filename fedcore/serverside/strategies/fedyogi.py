"""FedYogi: Yogi on the server (Reddi et al. 2021, "Adaptive Federated Optimization").

Reddi et al., ICLR 2021 (arXiv:2003.00295), Algorithm 2 with the Yogi update
(Zaheer et al., NeurIPS 2018), which grows or shrinks ``v`` additively::

    v_t = v_{t-1} - (1 - beta_2) * Delta_t ** 2 * sign(v_{t-1} - Delta_t ** 2)

No bias correction (as in the paper and Flower 1.42). See
:mod:`fedcore.serverside.strategies.fedopt` for the shared step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcore.serverside.strategies.fedopt import FedOpt, FedOptOptions

__all__ = ["FedYogi", "FedYogiOptions"]


@dataclass(frozen=True)
class FedYogiOptions(FedOptOptions):
    """``[strategy.options]`` of ``fedyogi`` (see :class:`FedOptOptions`).

    Defaults: ``eta = 0.01``, ``eta-l = 0.05`` (informational), ``beta-1 = 0.9``,
    ``beta-2 = 0.99``, ``tau = 1e-3``.
    """


class FedYogi(FedOpt):
    """Yogi on the server's pseudo-gradient."""

    name = "fedyogi"
    Options = FedYogiOptions

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """``v - (1 - beta_2) Delta^2 sign(v - Delta^2)``."""
        return v - (1.0 - self.options.beta_2) * delta_sq * np.sign(v - delta_sq)
