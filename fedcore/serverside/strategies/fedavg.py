"""Federated Averaging: the next model is the global model plus the mean update.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (arXiv:1602.05629).

``global + sum_i n_i (theta_i - global) / sum_i n_i = sum_i n_i theta_i / sum_i n_i``
over the clients the exchange counted. Linear: works unchanged under secure aggregation.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedcore.serverside.strategies.base import Aggregate, Strategy, apply_update

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Weighted FedAvg (no options).

    Subclass it to change one step and keep the rest, e.g. a server learning rate::

        class Damped(FedAvg):
            def server_update(self, server_round, arrays, aggregate):
                return apply_update(arrays, aggregate.update, scale=0.5)
    """

    name = "fedavg"

    def server_update(
        self, server_round: int, arrays: ArrayRecord, aggregate: Aggregate
    ) -> ArrayRecord:
        """``global + mean update`` (the plain exchange's mean of the models, when it has it)."""
        if aggregate.mean is not None:
            return aggregate.mean
        assert aggregate.update is not None
        return apply_update(arrays, aggregate.update)
