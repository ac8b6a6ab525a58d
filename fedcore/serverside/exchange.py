"""Exchanges: run one round's messages over the grid and return one :class:`Aggregate`.

The aggregation contract every exchange keeps (plain here; secure in
:mod:`fedcore.secagg.exchange`; split learning later)::

    exchange.train(grid, messages, ...) -> Aggregate(
        update        example-weighted mean of (trained - global), per array (float64)
        total_weight  sum of the counted clients' num-examples
        num_clients   clients counted
        metrics       example-weighted means of the numeric metrics
        rejected      every reply not used, with its reason
        extras        example-weighted means of the strategy's summed records
        replies       the individual updates: plain exchange, non-linear strategies only
        mean          the weighted mean of the trained models (plain exchange only)
    )

The strategy turns it into the next model (``Strategy.server_update``); it never
knows which exchange ran. Messages come from ``Strategy.configure_train`` and travel
unchanged: whatever a strategy adds for its clients (``proximal-mu``, control
variates) reaches them through every exchange.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedcore.core.aggregation import ArraySpec, WeightedMean, array_view, spec_of
from fedcore.core.errors import AggregationError, ReplyError
from fedcore.core.records import ARRAYS, METRICS, NUM_EXAMPLES, Rejection
from fedcore.serverside.pools import aggregation_pool

__all__ = [
    "Aggregate",
    "ClientUpdate",
    "EvaluateResult",
    "Exchange",
    "PlainExchange",
    "Progress",
    "WeightedMetrics",
    "num_examples_of",
]

log = logging.getLogger("fedcore")


@dataclass(frozen=True)
class EvaluateResult:
    """Outcome of one round's federated evaluation (example-weighted metrics)."""

    metrics: dict[str, float]
    num_clients: int
    num_examples: int
    rejected: tuple[Rejection, ...] = ()


@dataclass(frozen=True)
class ClientUpdate:
    """One client's valid training reply, as a non-linear strategy sees it."""

    node_id: int
    num_examples: int
    update: dict[str, np.ndarray]  # trained - global, float64, by array name
    metrics: dict[str, float]


@dataclass(frozen=True)
class Aggregate:
    """What one round's training exchange produced (see the module docstring)."""

    update: Mapping[str, np.ndarray] | None
    total_weight: int
    num_clients: int
    metrics: dict[str, float]
    rejected: tuple[Rejection, ...] = ()
    extras: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    replies: tuple[ClientUpdate, ...] | None = None
    #: The weighted mean of the trained models themselves, in the model's dtypes, when
    #: the exchange has it (plain). ``global + update`` equals it up to float64 rounding;
    #: FedAvg returns it as is (one rounding, as the kernel's precision bound states).
    mean: ArrayRecord | None = None

    @classmethod
    def failed(cls, rejected: Sequence[Rejection] = ()) -> Aggregate:
        """An aggregate with no counted client (the previous model is kept)."""
        return cls(None, 0, 0, {}, tuple(rejected))


class Progress(Protocol):
    """What an exchange reports while it runs (the round loop's observer)."""

    def stage_started(self, server_round: int, stage: str, num_messages: int) -> None:
        """Messages for ``stage`` have been sent."""

    def reply_received(self, server_round: int, stage: str) -> None:
        """One reply (valid or not) has been read."""


class Exchange(Protocol):
    """One round's exchange over the grid: plain or secure (or split, later)."""

    #: Human-readable name for logs ("plain", "secure aggregation (SecAgg+)").
    label: str

    def train(
        self,
        grid: Grid,
        messages: Sequence[Message],
        *,
        server_round: int,
        arrays: ArrayRecord,
        summed: Mapping[str, Mapping[str, ArraySpec]],
        individual: bool,
        timeout: float,
        progress: Progress,
    ) -> Aggregate:
        """Send the training messages, collect and aggregate the replies."""
        ...

    def evaluate(
        self,
        grid: Grid,
        messages: Sequence[Message],
        *,
        server_round: int,
        timeout: float,
        progress: Progress,
    ) -> EvaluateResult:
        """Send the evaluation messages; example-weighted metrics of the replies."""
        ...


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
        for i, v in enumerate(values):
            if isinstance(v, float) and not math.isfinite(v):
                where = f" (element {i} of {len(values)})" if isinstance(value, list) else ""
                raise ReplyError(
                    node,
                    stage,
                    f"metric '{key}' is {v!r}{where}: metrics must be finite numbers (one "
                    "NaN or Inf would poison the round's weighted mean); the client's "
                    f"{stage} diverged or reports a broken value",
                )
    return metrics, n


def observed(
    replies: Iterable[Message],
    progress: Progress,
    server_round: int,
    stage: str,
    seen: set[int],
    sent: Sequence[Message] = (),
) -> Iterator[Message]:
    """Yield ``replies``, recording each sender in ``seen`` and reporting progress.

    An error reply the SuperLink wrote itself for a client that went away ("Node
    Unavailable") comes from the SuperLink's node id; it is re-addressed to the client
    of the message it answers (one of ``sent``), so the drop names that client and the
    client is not also reported as never replying.
    """
    by_id = {m.metadata.message_id: m for m in sent}
    clients = {m.metadata.dst_node_id for m in sent}
    for msg in replies:
        if msg.has_error() and clients and msg.metadata.src_node_id not in clients:
            original = by_id.get(msg.metadata.reply_to_message_id)
            if original is not None:
                msg = Message(msg.error, reply_to=original)
        seen.add(msg.metadata.src_node_id)
        progress.reply_received(server_round, stage)
        yield msg


def timeouts(
    msgs: Sequence[Message], seen: set[int], stage: str, timeout: float
) -> list[Rejection]:
    """A rejection for every message whose node never replied."""
    return [
        Rejection(m.metadata.dst_node_id, stage, f"no reply within {timeout:g} s")
        for m in msgs
        if m.metadata.dst_node_id not in seen
    ]


def _nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def _spec_bytes(spec: Mapping[str, ArraySpec]) -> int:
    return sum(
        int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in spec.values()
    )


class _Difference(Mapping[str, np.ndarray]):
    """``mean - global`` per array in float64, each computed the first time it is read.

    FedAvg never reads it (it takes the mean itself), so the plain exchange spends no
    model-sized pass on it unless a strategy asks.
    """

    def __init__(self, mean: ArrayRecord, arrays: ArrayRecord) -> None:
        self._mean, self._arrays = mean, arrays
        self._done: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._done:
            m, g = array_view(self._mean[name]), array_view(self._arrays[name])
            self._done[name] = m.astype(np.float64) - g.astype(np.float64)
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays.keys())

    def __len__(self) -> int:
        return len(self._arrays)


class PlainExchange:
    """Replies in the clear, validated and folded into a streaming weighted mean.

    Each reply is checked (keys, shapes, dtypes, finite values, ``num-examples``,
    size) before it counts; a bad one becomes a :class:`Rejection` and the rest of
    the round goes on.

    Parameters
    ----------
    accumulation_block : int (default: 32)
        Clients summed in float32 before a float64 flush (see ``fedcore.core.aggregation``).
    accumulation_threads : int (default: 1)
        Threads each reply's arithmetic is split over (0 = one per core, at most 4;
        :func:`fedcore.serverside.pools.aggregation_pool`); the same bits for any number.
    max_examples : int, optional
        Replies claiming more than this many examples are rejected.
    max_reply_bytes : int, optional
        Replies whose arrays exceed this many bytes are rejected before any of their
        data is read. Default: twice the global model's size plus 1 MiB.

    """

    label = "plain"

    def __init__(
        self,
        *,
        accumulation_block: int = 32,
        accumulation_threads: int = 1,
        max_examples: int | None = None,
        max_reply_bytes: int | None = None,
    ) -> None:
        self.accumulation_block = accumulation_block
        self.pool = aggregation_pool(accumulation_threads)
        self.max_examples = max_examples
        self.max_reply_bytes = max_reply_bytes

    # -- training -----------------------------------------------------------------
    def train(
        self,
        grid: Grid,
        messages: Sequence[Message],
        *,
        server_round: int,
        arrays: ArrayRecord,
        summed: Mapping[str, Mapping[str, ArraySpec]] | None = None,
        individual: bool = False,
        timeout: float,
        progress: Progress,
    ) -> Aggregate:
        """One message per sampled client; replies validated and averaged as they arrive."""
        progress.stage_started(server_round, "train", len(messages))
        seen: set[int] = set()
        replies = grid.send_and_receive(messages, timeout=timeout)
        agg = self.aggregate(
            observed(replies, progress, server_round, "train", seen, messages),
            arrays=arrays,
            summed=summed or {},
            individual=individual,
        )
        late = timeouts(messages, seen, "train", timeout)
        if not late:
            return agg
        return Aggregate(
            agg.update,
            agg.total_weight,
            agg.num_clients,
            agg.metrics,
            agg.rejected + tuple(late),
            agg.extras,
            agg.replies,
            agg.mean,
        )

    def aggregate(
        self,
        replies: Iterable[Message],
        *,
        arrays: ArrayRecord,
        summed: Mapping[str, Mapping[str, ArraySpec]] | None = None,
        individual: bool = False,
    ) -> Aggregate:
        """Validate each reply and fold it into the weighted means (no grid involved)."""
        summed = dict(summed or {})
        acc = WeightedMean(spec_of(arrays), block=self.accumulation_block, pool=self.pool)
        extra_acc = {
            name: WeightedMean(spec, block=self.accumulation_block, pool=self.pool)
            for name, spec in summed.items()
        }
        expected = sorted({ARRAYS, *summed})
        limit = self.max_reply_bytes or 2 * _nbytes(arrays) + 2**20
        limit += sum(2 * _spec_bytes(spec) for spec in summed.values())
        metrics = WeightedMetrics()
        rejected: list[Rejection] = []
        kept: list[ClientUpdate] = []
        total = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                reply_metrics, n = num_examples_of(msg, "train", max_examples=self.max_examples)
                records = msg.content.array_records
                if sorted(records.keys()) != expected:
                    raise ReplyError(
                        node,
                        "train",
                        f"expected ArrayRecords {expected}, found {sorted(records.keys())}",
                    )
                size = sum(_nbytes(records[name]) for name in expected)
                if size > limit:
                    raise ReplyError(
                        node,
                        "train",
                        f"arrays of {size} bytes exceed the {limit}-byte limit "
                        "(strategy.max-reply-mb; raise it if replies this large are expected)",
                    )
                try:
                    for name, extra in extra_acc.items():
                        extra.check(records[name])
                    acc.add(records[ARRAYS], n)
                    for name, extra in extra_acc.items():
                        extra.add(records[name], n)
                except AggregationError as exc:
                    raise ReplyError(node, "train", str(exc)) from None
            except ReplyError as exc:
                rejected.append(Rejection(exc.client_id, exc.stage, exc.reason))
                continue
            metrics.add(reply_metrics, n)
            total += n
            if individual:
                kept.append(
                    ClientUpdate(
                        node,
                        n,
                        dict(_Difference(records[ARRAYS], arrays)),
                        {
                            k: float(v)  # type: ignore[arg-type]
                            for k, v in reply_metrics.items()
                            if k != NUM_EXAMPLES and not isinstance(v, list | bool)
                        },
                    )
                )
        if not acc.count:
            return Aggregate.failed(rejected)
        extras = {
            name: {k: array_view(v).astype(np.float64) for k, v in extra.result().items()}
            for name, extra in extra_acc.items()
        }
        mean = acc.result()
        return Aggregate(
            update=_Difference(mean, arrays),
            mean=mean,
            total_weight=total,
            num_clients=acc.count,
            metrics=metrics.result(),
            rejected=tuple(rejected),
            extras=extras,
            replies=tuple(kept) if individual else None,
        )

    # -- evaluation ---------------------------------------------------------------
    def evaluate(
        self,
        grid: Grid,
        messages: Sequence[Message],
        *,
        server_round: int,
        timeout: float,
        progress: Progress,
    ) -> EvaluateResult:
        """One message per sampled client; example-weighted mean of each metric."""
        progress.stage_started(server_round, "evaluate", len(messages))
        seen: set[int] = set()
        replies = grid.send_and_receive(messages, timeout=timeout)
        ev = self.aggregate_evaluate(
            observed(replies, progress, server_round, "evaluate", seen, messages)
        )
        late = timeouts(messages, seen, "evaluate", timeout)
        if not late:
            return ev
        return EvaluateResult(
            ev.metrics, ev.num_clients, ev.num_examples, ev.rejected + tuple(late)
        )

    def aggregate_evaluate(self, replies: Iterable[Message]) -> EvaluateResult:
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
