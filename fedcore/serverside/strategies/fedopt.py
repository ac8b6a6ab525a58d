"""FedOpt: adaptive server optimizers on the mean update (the base of FedAdagrad/Adam/Yogi).

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar and McMahan, "Adaptive
Federated Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2.

The example-weighted mean update ``Delta_t`` is a pseudo-gradient (with the sign of
a descent step); every optimizer keeps a first moment and a second moment per
coordinate and steps::

    m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t             (m_0 = 0)
    v_t     = second_moment(v_{t-1}, Delta_t ** 2)                  (v_0 = 0)
    x_{t+1} = x_t + step_size(t) * m_t / (sqrt(v_t) + tau)

A subclass gives ``second_moment`` (Adagrad: ``v + Delta^2``; Adam: an EMA; Yogi: a
sign-controlled additive update) and, where it applies, ``step_size`` (Adam's bias
correction). The formulas, defaults and quirks follow Flower 1.42's
``flwr.serverapp.strategy.FedOpt`` so the two give the same model on the same replies
(``tests/test_strategies_oracle.py``). Linear: works unchanged under secure aggregation.
"""

from __future__ import annotations

import math
from abc import abstractmethod
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

__all__ = ["FedOpt", "FedOptOptions", "check_fedopt_options"]

_M, _V = "m.", "v."


def check_fedopt_options(opts: Any) -> None:
    """Range checks shared by the FedOpt options (``ValueError('field: allowed')``)."""
    if not (math.isfinite(opts.eta) and opts.eta > 0):
        raise ValueError("eta: must be a finite number > 0")
    if not (math.isfinite(opts.eta_l) and opts.eta_l >= 0):
        raise ValueError("eta_l: must be a finite number >= 0")
    if not 0.0 <= opts.beta_1 < 1.0:
        raise ValueError("beta_1: must be in [0, 1)")
    if hasattr(opts, "beta_2") and not 0.0 <= opts.beta_2 < 1.0:
        raise ValueError("beta_2: must be in [0, 1)")
    if not (math.isfinite(opts.tau) and opts.tau > 0):
        raise ValueError("tau: must be a finite number > 0")


@dataclass(frozen=True)
class FedOptOptions:
    """``[strategy.options]`` shared by ``fedadam`` and ``fedyogi``.

    Parameters
    ----------
    eta : float
        Server learning rate (``eta``).
    eta_l : float
        Client learning rate, informational only (as in Flower): the clients train
        with ``train.lr`` (``eta-l``).
    beta_1 : float
        First-moment (momentum) decay (``beta-1``).
    beta_2 : float
        Second-moment decay (``beta-2``).
    tau : float
        Adaptivity: added to ``sqrt(v)``; larger is closer to server SGD with
        momentum (``tau``).

    """

    eta: float = 0.01
    eta_l: float = 0.05
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        """Range checks (``field: allowed`` becomes the ConfigError's text)."""
        check_fedopt_options(self)


class FedOpt(Strategy):
    """Base of the adaptive server optimizers (see the module docstring).

    Parameters
    ----------
    options : Options instance, optional
        ``eta``, ``eta-l``, ``beta-1``, ``beta-2`` (not FedAdagrad), ``tau``.
    seed : int (default: 0)
        Run seed (client sampling).
    sampling : Sampling, optional
        Who takes part in each round.

    Notes
    -----
    State: the moments ``m`` and ``v`` (float64, one per model array), checkpointed
    as ``m.<array>`` and ``v.<array>``. Computed in float64; the new model is
    rounded once into each array's dtype.

    """

    Options = FedOptOptions

    def __init__(
        self, options: Any = None, *, seed: int = 0, sampling: Sampling | None = None
    ) -> None:
        super().__init__(options, seed=seed, sampling=sampling)
        self.m: dict[str, np.ndarray] | None = None
        self.v: dict[str, np.ndarray] | None = None

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """``v_t`` from ``v_{t-1}`` and ``Delta_t ** 2`` (one array)."""

    def step_size(self, server_round: int) -> float:
        """The step applied to ``m / (sqrt(v) + tau)`` in ``server_round`` (``eta``)."""
        return float(self.options.eta)

    def server_update(
        self, server_round: int, arrays: ArrayRecord, aggregate: Aggregate
    ) -> ArrayRecord:
        """One adaptive step on the mean update."""
        assert aggregate.update is not None
        delta = {k: np.asarray(u, dtype=np.float64) for k, u in aggregate.update.items()}
        beta_1 = self.options.beta_1
        m = self.m or {k: np.zeros_like(d) for k, d in delta.items()}
        v = self.v or {k: np.zeros_like(d) for k, d in delta.items()}
        self.m = {k: beta_1 * m[k] + (1.0 - beta_1) * d for k, d in delta.items()}
        self.v = {k: self.second_moment(v[k], d * d) for k, d in delta.items()}
        tau = self.options.tau
        direction = {k: self.m[k] / (np.sqrt(self.v[k]) + tau) for k in delta}
        return apply_update(arrays, direction, scale=self.step_size(server_round))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The moments (empty before the first update)."""
        return {**prefixed(_M, self.m), **prefixed(_V, self.v)}

    def load_state(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Restore the moments."""
        self.m = unprefixed(_M, arrays)
        self.v = unprefixed(_V, arrays)
