"""Federated Averaging with seeded sampling and a streaming, validating kernel.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (arXiv:1602.05629).

The new global model is ``sum n_i theta_i / sum n_i`` over the clients whose
replies were valid; each reply is validated (keys, shapes, dtypes, finite
values, ``num-examples``) and folded into one accumulator as it is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedcore.core.aggregation import WeightedMean, spec_of
from fedcore.core.errors import AggregationError, ReplyError
from fedcore.core.records import ARRAYS, CONFIG, Rejection
from fedcore.core.sampling import sample_clients
from fedcore.serverside.strategies.base import (
    EvaluateResult,
    Strategy,
    TrainResult,
    WeightedMetrics,
    num_examples_of,
)

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Weighted FedAvg.

    Parameters
    ----------
    seed : int
        Run seed; sampling in round ``r`` is seeded by ``(seed, r, purpose)``.
    fraction_train, fraction_evaluate : float (default: 1.0)
        Fraction of connected nodes sampled per round for each stage.
    min_train_clients, min_evaluate_clients : int (default: 2)
        Lower bound on the sample size (capped at the nodes connected).
    accumulation_block : int (default: 32)
        Clients summed in float32 before a float64 flush (see ``fedcore.core.aggregation``).
    max_examples : int, optional
        Replies claiming more than this many examples are rejected.
    max_reply_bytes : int, optional
        Replies whose arrays exceed this many bytes are rejected before any of their
        data is read. Default: twice the global model's size plus 1 MiB.

    """

    def __init__(
        self,
        *,
        seed: int,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_clients: int = 2,
        min_evaluate_clients: int = 2,
        accumulation_block: int = 32,
        max_examples: int | None = None,
        max_reply_bytes: int | None = None,
    ) -> None:
        self.seed = seed
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_clients = min_train_clients
        self.min_evaluate_clients = min_evaluate_clients
        self.accumulation_block = accumulation_block
        self.max_examples = max_examples
        self.max_reply_bytes = max_reply_bytes
        self._template: ArrayRecord | None = None

    # -- training -------------------------------------------------------------
    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
    ) -> list[Message]:
        """Sample nodes and send each the global arrays and the round's config."""
        self._template = arrays
        if self.fraction_train == 0.0:
            return []
        nodes = sample_clients(
            node_ids,
            fraction=self.fraction_train,
            minimum=self.min_train_clients,
            seed=self.seed,
            server_round=server_round,
            purpose="train",
        )
        return _messages(arrays, config, server_round, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> TrainResult:
        """Validate each reply and fold it into the weighted mean as it arrives."""
        if self._template is None:
            raise AggregationError("aggregate_train called before configure_train")
        acc = WeightedMean(spec_of(self._template), block=self.accumulation_block)
        limit = self.max_reply_bytes or 2 * _nbytes(self._template) + 2**20
        metrics = WeightedMetrics()
        rejected: list[Rejection] = []
        total = 0
        for msg in replies:
            try:
                reply_metrics, n = num_examples_of(msg, "train", max_examples=self.max_examples)
                arrays = msg.content.array_records.get(ARRAYS)
                if arrays is None or len(msg.content.array_records) != 1:
                    found = sorted(msg.content.array_records.keys())
                    raise ReplyError(
                        msg.metadata.src_node_id,
                        "train",
                        f"expected exactly one ArrayRecord '{ARRAYS}', found {found}",
                    )
                size = _nbytes(arrays)
                if size > limit:
                    raise ReplyError(
                        msg.metadata.src_node_id,
                        "train",
                        f"arrays of {size} bytes exceed the {limit}-byte limit "
                        "(strategy.max-reply-mb)",
                    )
                try:
                    acc.add(arrays, n)
                except AggregationError as exc:
                    raise ReplyError(msg.metadata.src_node_id, "train", str(exc)) from None
            except ReplyError as exc:
                rejected.append(Rejection(exc.client_id, exc.stage, exc.reason))
                continue
            metrics.add(reply_metrics, n)
            total += n
        arrays_out = acc.result() if acc.count else None
        return TrainResult(arrays_out, metrics.result(), acc.count, total, tuple(rejected))

    # -- evaluation -----------------------------------------------------------
    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
    ) -> list[Message]:
        """Sample nodes and send each the global arrays to evaluate."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = sample_clients(
            node_ids,
            fraction=self.fraction_evaluate,
            minimum=self.min_evaluate_clients,
            seed=self.seed,
            server_round=server_round,
            purpose="evaluate",
        )
        return _messages(arrays, config, server_round, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> EvaluateResult:
        """Example-weighted mean of each metric over the valid replies."""
        metrics = WeightedMetrics()
        rejected: list[Rejection] = []
        count = total = 0
        for msg in replies:
            try:
                reply_metrics, n = num_examples_of(msg, "evaluate", max_examples=self.max_examples)
            except ReplyError as exc:
                rejected.append(Rejection(exc.client_id, exc.stage, exc.reason))
                continue
            metrics.add(reply_metrics, n)
            count += 1
            total += n
        return EvaluateResult(metrics.result(), count, total, tuple(rejected))


def _nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def _messages(
    arrays: ArrayRecord,
    config: ConfigRecord,
    server_round: int,
    nodes: Sequence[int],
    message_type: str,
) -> list[Message]:
    cfg = ConfigRecord(dict(config))
    cfg["server-round"] = server_round
    content = RecordDict({ARRAYS: arrays, CONFIG: cfg})
    return [
        Message(
            content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round)
        )
        for node in nodes
    ]
