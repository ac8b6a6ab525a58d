"""Strategy interface: named hooks that take and return data, never a transport.

The round loop (:func:`fedcore.serverside.rounds.run_federation`) calls, per round::

    configure_train -> (grid) -> aggregate_train -> configure_evaluate -> (grid)
    -> aggregate_evaluate

Hooks receive the ids of the connected nodes, not the grid, so they are pure and
testable with hand-built messages. A failing client is data: each bad reply
becomes a :class:`Rejection` with the client id, the stage and the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedcore.core.errors import ReplyError
from fedcore.core.records import METRICS, NUM_EXAMPLES, Rejection

__all__ = ["EvaluateResult", "Rejection", "Strategy", "TrainResult", "WeightedMetrics"]



@dataclass(frozen=True)
class TrainResult:
    """Outcome of aggregating one round's training replies."""

    arrays: ArrayRecord | None
    metrics: dict[str, float]
    num_clients: int
    num_examples: int
    rejected: tuple[Rejection, ...] = ()


@dataclass(frozen=True)
class EvaluateResult:
    """Outcome of aggregating one round's evaluation replies."""

    metrics: dict[str, float]
    num_clients: int
    num_examples: int
    rejected: tuple[Rejection, ...] = ()


@dataclass
class WeightedMetrics:
    """Streaming example-weighted mean of scalar metrics (``num-examples`` excluded)."""

    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, metrics: Mapping[str, Any], weight: float) -> None:
        """Add one reply's scalar metrics with weight ``n_i``."""
        for key, value in metrics.items():
            if key == NUM_EXAMPLES or isinstance(value, list | bool):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def result(self) -> dict[str, float]:
        """The weighted means."""
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}


def num_examples_of(
    msg: Message, stage: str, *, max_examples: int | None = None
) -> tuple[MetricRecord, int]:
    """The reply's metrics and its ``num-examples``, or :class:`ReplyError`."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        raise ReplyError(node, stage, f"client reported an error: {msg.error.reason}")
    content = msg.content
    metrics = content.metric_records.get(METRICS)
    if metrics is None:
        raise ReplyError(node, stage, f"no MetricRecord '{METRICS}' in the reply")
    n = metrics.get(NUM_EXAMPLES)
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ReplyError(node, stage, f"'{NUM_EXAMPLES}' must be a positive integer, got {n!r}")
    if max_examples is not None and n > max_examples:
        raise ReplyError(
            node, stage, f"'{NUM_EXAMPLES}' = {n} exceeds the configured cap {max_examples}"
        )
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and v != v for v in values):
            raise ReplyError(node, stage, f"metric '{key}' is NaN")
    return metrics, n


class Strategy(ABC):
    """Base class of server strategies.

    Subclasses implement the four hooks; :meth:`state_dict` /
    :meth:`load_state_dict` carry any state across a checkpoint (JSON-able).
    """

    #: Whether the strategy needs each client's individual update (median, Krum...);
    #: secure aggregation refuses such strategies.
    needs_individual_updates: bool = False

    @abstractmethod
    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
    ) -> list[Message]:
        """Messages that ask the sampled nodes to train on ``arrays``."""

    @abstractmethod
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        """Combine training replies (streamed) into the next global arrays."""

    @abstractmethod
    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
    ) -> list[Message]:
        """Messages that ask the sampled nodes to evaluate ``arrays``."""

    @abstractmethod
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> EvaluateResult:
        """Combine evaluation replies into example-weighted metrics."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able strategy state for checkpoints (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")
