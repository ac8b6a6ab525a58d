"""One training or evaluation step through an exchange, as the round loop runs it (tests)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from fedcore.serverside.exchange import Aggregate
from fedcore.serverside.rounds import evaluate_once, train_once


@dataclass
class Trained:
    """An exchange's aggregate and the next model the strategy made of it."""

    aggregate: Aggregate
    arrays: ArrayRecord | None  # None: nobody counted, the round keeps the previous model

    @property
    def num_clients(self):
        return self.aggregate.num_clients

    @property
    def num_examples(self):
        return self.aggregate.total_weight

    @property
    def metrics(self):
        return self.aggregate.metrics

    @property
    def rejected(self):
        return self.aggregate.rejected


def train_step(exchange, grid, strategy, *, server_round, arrays, **kwargs):
    """``train_once`` then ``server_update`` (what one counted round attempt does)."""
    agg = train_once(grid, strategy, exchange, server_round=server_round, arrays=arrays, **kwargs)
    new = strategy.server_update(server_round, arrays, agg) if agg.update is not None else None
    return Trained(agg, new)


def evaluate_step(exchange, grid, strategy, **kwargs):
    """``evaluate_once``."""
    return evaluate_once(grid, strategy, exchange, **kwargs)
