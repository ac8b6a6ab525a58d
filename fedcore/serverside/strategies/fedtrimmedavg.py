"""FedTrimmedAvg: the coordinate-wise trimmed mean of the clients' models.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018 (arXiv:1803.01498).

For each coordinate, the ``floor(beta * n)`` smallest and largest of the ``n``
clients' values are dropped and the rest averaged (unweighted, as in Flower 1.42
and ``scipy.stats.trim_mean``). Computed on the updates; equal to trimming the
models up to float rounding. Not linear: refused under secure aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from fedcore.serverside.strategies.base import Aggregate, Strategy, apply_update, stacked_updates

__all__ = ["FedTrimmedAvg", "FedTrimmedAvgOptions", "trimmed_mean"]


@dataclass(frozen=True)
class FedTrimmedAvgOptions:
    """``[strategy.options]`` of ``fedtrimmedavg``.

    Parameters
    ----------
    beta : float (default: 0.2)
        Fraction of the clients cut off at each end, per coordinate (``beta``).

    """

    beta: float = 0.2

    def __post_init__(self) -> None:
        """Range check (``field: allowed`` becomes the ConfigError's text)."""
        if not 0.0 <= self.beta < 0.5:
            raise ValueError("beta: must be in [0, 0.5) (the fraction cut at each end)")


def trimmed_mean(stacked: np.ndarray, beta: float) -> np.ndarray:
    """Mean over axis 0 after dropping ``floor(beta * n)`` values at each end.

    >>> trimmed_mean(np.array([[0.0], [1.0], [2.0], [100.0]]), 0.25).tolist()
    [1.5]
    """
    n = stacked.shape[0]
    cut = int(beta * n)
    return np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean of the individual models."""

    name = "fedtrimmedavg"
    linear = False
    Options = FedTrimmedAvgOptions

    def server_update(
        self, server_round: int, arrays: ArrayRecord, aggregate: Aggregate
    ) -> ArrayRecord:
        """``x + trimmed_mean_i(update_i)``, coordinate by coordinate."""
        assert aggregate.replies is not None, "FedTrimmedAvg needs the individual updates"
        stacked = stacked_updates(aggregate.replies)
        beta = self.options.beta
        return apply_update(arrays, {k: trimmed_mean(u, beta) for k, u in stacked.items()})
