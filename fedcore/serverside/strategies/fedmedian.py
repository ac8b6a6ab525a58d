"""FedMedian: the coordinate-wise median of the clients' models.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018 (arXiv:1803.01498).

Each coordinate of the next model is the median over the counted clients of that
coordinate of their trained models (unweighted, as in Flower 1.42). Computed on
the updates, ``x + median_i(y_i - x)``, which equals ``median_i(y_i)`` up to float
rounding. Not linear: needs every client's update, so it is refused under secure
aggregation.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedcore.serverside.strategies.base import Aggregate, Strategy, apply_update, stacked_updates

__all__ = ["FedMedian"]


class FedMedian(Strategy):
    """Coordinate-wise median of the individual models (no options)."""

    name = "fedmedian"
    linear = False

    def server_update(
        self, server_round: int, arrays: ArrayRecord, aggregate: Aggregate
    ) -> ArrayRecord:
        """``x + median_i(update_i)``, coordinate by coordinate."""
        assert aggregate.replies is not None, "FedMedian needs the individual updates"
        stacked = stacked_updates(aggregate.replies)
        return apply_update(arrays, {k: np.median(u, axis=0) for k, u in stacked.items()})
