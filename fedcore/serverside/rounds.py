"""The round loop: sample, send, stream-aggregate, evaluate, report.

It owns the grid and the clock; everything it decides with is a strategy hook.
What happens each round is reported to an :class:`Observer` (progress bars, run
directory, checkpoints), so the loop itself never prints or writes files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedcore.core.errors import RoundFailedError
from fedcore.core.records import Rejection
from fedcore.serverside.strategies.base import EvaluateResult, Strategy, TrainResult

__all__ = [
    "EvaluateStage",
    "Observer",
    "RoundPolicy",
    "RoundRecord",
    "TrainStage",
    "plain_evaluate_stage",
    "plain_train_stage",
    "run_federation",
    "wait_for_nodes",
]

log = logging.getLogger("fedcore")

CentralEvaluate = Callable[[ArrayRecord], dict[str, float]]


@dataclass(frozen=True)
class RoundRecord:
    """One row of ``metrics.csv``: what a round produced.

    ``eval_loss``/``accuracy`` are the server's centralized evaluation on the
    held-out test set; ``fed_eval_loss``/``fed_accuracy`` the example-weighted
    federated evaluation on the clients' validation data. ``nan`` where a stage
    was skipped or got no valid reply.
    """

    round: int
    train_loss: float
    eval_loss: float
    accuracy: float
    fed_eval_loss: float
    fed_accuracy: float
    clients: int
    failures: int
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict (for CSV/JSON)."""
        return asdict(self)


class Observer:
    """Receives progress events; the default does nothing. Subclass what you need."""

    def stage_started(self, server_round: int, stage: str, num_messages: int) -> None:
        """Messages for ``stage`` ("train"/"evaluate") have been sent."""

    def reply_received(self, server_round: int, stage: str) -> None:
        """One reply (valid or not) has been read."""

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, rejected: Sequence[Rejection]
    ) -> None:
        """A round is complete; ``arrays`` is the global model after it."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 0.2) -> list[int]:
    """Node ids once at least ``minimum`` are connected; ``RoundFailedError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise RoundFailedError(
                f"only {len(nodes)} client(s) connected after {timeout:.0f} s; "
                f"strategy.min-available-clients = {minimum}"
            )
        time.sleep(poll)


def _observed(
    replies: Iterable[Message],
    observer: Observer,
    server_round: int,
    stage: str,
    seen: set[int],
) -> Iterator[Message]:
    for msg in replies:
        seen.add(msg.metadata.src_node_id)
        observer.reply_received(server_round, stage)
        yield msg


def _timeouts(
    msgs: Sequence[Message], seen: set[int], stage: str, timeout: float
) -> list[Rejection]:
    return [
        Rejection(m.metadata.dst_node_id, stage, f"no reply within {timeout:g} s")
        for m in msgs
        if m.metadata.dst_node_id not in seen
    ]


class TrainStage(Protocol):
    """One round's training exchange over the grid (plain, or secure aggregation)."""

    def __call__(
        self,
        grid: Grid,
        strategy: Strategy,
        *,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
        timeout: float,
        observer: Observer,
    ) -> TrainResult:
        """Send, collect and aggregate; return the round's training result."""
        ...


def plain_train_stage(
    grid: Grid,
    strategy: Strategy,
    *,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    node_ids: Sequence[int],
    timeout: float,
    observer: Observer,
) -> TrainResult:
    """One message per sampled client, replies streamed into ``aggregate_train``."""
    msgs = strategy.configure_train(server_round, arrays, config, node_ids)
    observer.stage_started(server_round, "train", len(msgs))
    seen: set[int] = set()
    replies = grid.send_and_receive(msgs, timeout=timeout)
    tr = strategy.aggregate_train(
        server_round, _observed(replies, observer, server_round, "train", seen)
    )
    late = _timeouts(msgs, seen, "train", timeout)
    return replace(tr, rejected=tr.rejected + tuple(late)) if late else tr


class EvaluateStage(Protocol):
    """One round's federated evaluation over the grid (plain, or secure aggregation)."""

    def __call__(
        self,
        grid: Grid,
        strategy: Strategy,
        *,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
        timeout: float,
        observer: Observer,
    ) -> EvaluateResult | None:
        """Send, collect and aggregate; ``None`` when the strategy evaluates no one."""
        ...


def plain_evaluate_stage(
    grid: Grid,
    strategy: Strategy,
    *,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    node_ids: Sequence[int],
    timeout: float,
    observer: Observer,
) -> EvaluateResult | None:
    """One message per sampled client, replies streamed into ``aggregate_evaluate``."""
    msgs = strategy.configure_evaluate(server_round, arrays, config, node_ids)
    if not msgs:
        return None
    observer.stage_started(server_round, "evaluate", len(msgs))
    seen: set[int] = set()
    replies = grid.send_and_receive(msgs, timeout=timeout)
    ev = strategy.aggregate_evaluate(
        server_round, _observed(replies, observer, server_round, "evaluate", seen)
    )
    late = _timeouts(msgs, seen, "evaluate", timeout)
    return replace(ev, rejected=ev.rejected + tuple(late)) if late else ev


@dataclass(frozen=True)
class RoundPolicy:
    """When a round counts, and what happens when it does not.

    A training attempt succeeds when at least ``min_replies`` valid replies were
    aggregated. A failed attempt keeps the previous model and is retried up to
    ``retries`` times, sleeping ``backoff * 2**attempt`` seconds before each retry;
    after that the round is recorded as failed (``clients = 0``) and the run goes on.
    """

    timeout: float = 600.0
    min_available: int = 2
    min_replies: int = 1
    retries: int = 2
    backoff: float = 1.0


def _train_attempt(
    grid: Grid,
    strategy: Strategy,
    train_stage: TrainStage,
    policy: RoundPolicy,
    *,
    rnd: int,
    attempt: int,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    observer: Observer,
) -> tuple[TrainResult | None, list[int], list[Rejection], str]:
    """One attempt: (result if it counts, node ids, rejections, why it failed)."""
    try:
        node_ids = wait_for_nodes(grid, policy.min_available, policy.timeout)
    except RoundFailedError as exc:
        return None, [], [], str(exc)
    config = ConfigRecord(dict(train_config))
    if attempt:
        config["attempt"] = attempt
    tr = train_stage(
        grid,
        strategy,
        server_round=rnd,
        arrays=arrays,
        config=config,
        node_ids=node_ids,
        timeout=policy.timeout,
        observer=observer,
    )
    rejected = list(tr.rejected)
    if tr.arrays is None or tr.num_clients < policy.min_replies:
        why = (
            f"{tr.num_clients} valid training repl{'y' if tr.num_clients == 1 else 'ies'}, "
            f"strategy.min-train-replies = {policy.min_replies}"
        )
        return None, node_ids, rejected, why
    return tr, node_ids, rejected, ""


def run_federation(
    grid: Grid,
    strategy: Strategy,
    *,
    arrays: ArrayRecord,
    rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    policy: RoundPolicy,
    central_evaluate: CentralEvaluate | None = None,
    observer: Observer | None = None,
    start_round: int = 1,
    train_stage: TrainStage = plain_train_stage,
    evaluate_stage: EvaluateStage = plain_evaluate_stage,
    sleep: Callable[[float], None] = time.sleep,
) -> ArrayRecord:
    """Run rounds ``start_round..rounds`` and return the final global arrays.

    Every dropped or rejected reply is logged with its client id, stage and cause.
    A round whose training fails (see :class:`RoundPolicy`) keeps the previous model.
    """
    obs = observer or Observer()
    nan = float("nan")
    for rnd in range(start_round, rounds + 1):
        t0 = time.perf_counter()
        rejected: list[Rejection] = []
        tr: TrainResult | None = None
        node_ids: list[int] = []
        for attempt in range(policy.retries + 1):
            if attempt:
                delay = policy.backoff * 2 ** (attempt - 1)
                log.warning("round %d: retry %d/%d in %.1f s", rnd, attempt, policy.retries, delay)
                sleep(delay)
            tr, node_ids, dropped, why = _train_attempt(
                grid,
                strategy,
                train_stage,
                policy,
                rnd=rnd,
                attempt=attempt,
                arrays=arrays,
                train_config=train_config,
                observer=obs,
            )
            rejected += dropped
            for r in dropped:
                log.warning("round %d: dropped %s", rnd, r)
            if tr is not None:
                break
            log.warning(
                "round %d: attempt %d failed (%s); keeping the previous model",
                rnd,
                attempt + 1,
                why,
            )
        if tr is not None and tr.arrays is not None:
            arrays = tr.arrays

        # -- federated evaluation (not retried: it does not change the model) --
        fed: dict[str, float] = {}
        ev = (
            evaluate_stage(
                grid,
                strategy,
                server_round=rnd,
                arrays=arrays,
                config=evaluate_config,
                node_ids=node_ids,
                timeout=policy.timeout,
                observer=obs,
            )
            if node_ids
            else None
        )
        if ev is not None:
            dropped = list(ev.rejected)
            for r in dropped:
                log.warning("round %d: dropped %s", rnd, r)
            rejected += dropped
            fed = ev.metrics

        # -- centralized evaluation --
        central = central_evaluate(arrays) if central_evaluate else {}
        record = RoundRecord(
            round=rnd,
            train_loss=tr.metrics.get("train_loss", nan) if tr else nan,
            eval_loss=central.get("loss", nan),
            accuracy=central.get("accuracy", nan),
            fed_eval_loss=fed.get("eval_loss", nan),
            fed_accuracy=fed.get("eval_acc", nan),
            clients=tr.num_clients if tr else 0,
            failures=len(rejected),
            seconds=time.perf_counter() - t0,
        )
        obs.round_finished(record, arrays, rejected)
    return arrays
