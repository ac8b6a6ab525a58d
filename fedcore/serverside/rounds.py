"""The round loop: sample, exchange, update the model, evaluate, report.

Each round::

    messages  = strategy.configure_train(round, global, config, nodes)
    aggregate = exchange.train(grid, messages, ...)        # plain | secure
    global    = strategy.server_update(round, global, aggregate)
    exchange.evaluate(grid, strategy.configure_evaluate(...)); central evaluation

It owns the grid and the clock; every decision is a strategy hook, every transfer an
exchange (:mod:`fedcore.serverside.exchange`).
What happens each round is reported to an :class:`Observer` (progress bars, run
directory, checkpoints), so the loop itself never prints or writes files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedcore.core.config import RoundConfig
from fedcore.core.errors import RoundFailedError
from fedcore.core.records import ATTEMPT, Rejection
from fedcore.serverside.exchange import Aggregate, EvaluateResult, Exchange, PlainExchange
from fedcore.serverside.strategies.base import Strategy

__all__ = [
    "Observer",
    "RoundPolicy",
    "RoundRecord",
    "evaluate_once",
    "run_federation",
    "train_once",
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
                f"round.min-available-clients = {minimum}"
            )
        time.sleep(poll)


#: The round policy is the ``[round]`` section itself (declared once, in the config).
#: A training attempt counts when at least ``min_train_replies`` valid replies were
#: aggregated. A failed attempt keeps the previous model and is retried up to
#: ``retries`` times, sleeping ``retry_backoff * 2**attempt`` seconds before each retry;
#: after that the round is recorded as failed (``clients = 0``) and the run goes on.
RoundPolicy = RoundConfig


def train_once(
    grid: Grid,
    strategy: Strategy,
    exchange: Exchange,
    *,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    node_ids: Sequence[int],
    timeout: float,
    observer: Observer | None = None,
) -> Aggregate:
    """One training exchange: ``configure_train`` -> ``exchange.train`` (no model update).

    The round loop applies ``strategy.server_update`` to the result when it counts.
    """
    messages = strategy.configure_train(server_round, arrays, config, node_ids)
    return exchange.train(
        grid,
        messages,
        server_round=server_round,
        arrays=arrays,
        summed=strategy.summed_records(arrays),
        individual=not strategy.linear,
        timeout=timeout,
        progress=observer or Observer(),
    )


def evaluate_once(
    grid: Grid,
    strategy: Strategy,
    exchange: Exchange,
    *,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    node_ids: Sequence[int],
    timeout: float,
    observer: Observer | None = None,
) -> EvaluateResult | None:
    """One federated evaluation; ``None`` when the strategy samples no one."""
    messages = strategy.configure_evaluate(server_round, arrays, config, node_ids)
    if not messages:
        return None
    return exchange.evaluate(
        grid, messages, server_round=server_round, timeout=timeout, progress=observer or Observer()
    )


def _train_attempt(
    grid: Grid,
    strategy: Strategy,
    exchange: Exchange,
    policy: RoundPolicy,
    *,
    rnd: int,
    attempt: int,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    observer: Observer,
) -> tuple[Aggregate | None, list[int], list[Rejection], str]:
    """One attempt: (aggregate if it counts, node ids, rejections, why it failed)."""
    try:
        node_ids = wait_for_nodes(grid, policy.min_available_clients, policy.timeout)
    except RoundFailedError as exc:
        return None, [], [], str(exc)
    config = ConfigRecord(dict(train_config))
    if attempt:
        config[ATTEMPT] = attempt
    agg = train_once(
        grid,
        strategy,
        exchange,
        server_round=rnd,
        arrays=arrays,
        config=config,
        node_ids=node_ids,
        timeout=policy.timeout,
        observer=observer,
    )
    rejected = list(agg.rejected)
    if agg.update is None or agg.num_clients < policy.min_train_replies:
        n = agg.num_clients
        why = (
            f"{n} valid training repl{'y' if n == 1 else 'ies'}, "
            f"round.min-train-replies = {policy.min_train_replies}"
        )
        return None, node_ids, rejected, why
    return agg, node_ids, rejected, ""


def run_federation(
    grid: Grid,
    strategy: Strategy,
    *,
    arrays: ArrayRecord,
    rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    policy: RoundPolicy,
    exchange: Exchange | None = None,
    evaluate_exchange: Exchange | None = None,
    central_evaluate: CentralEvaluate | None = None,
    observer: Observer | None = None,
    start_round: int = 1,
    sleep: Callable[[float], None] = time.sleep,
) -> ArrayRecord:
    """Run rounds ``start_round..rounds`` and return the final global arrays.

    ``exchange`` trains (default: :class:`~fedcore.serverside.exchange.PlainExchange`),
    ``evaluate_exchange`` runs the federated evaluation (default: ``exchange``).
    Every dropped or rejected reply is logged with its client id, stage and cause.
    A round whose training fails (see :class:`RoundPolicy`) keeps the previous model.
    """
    obs = observer or Observer()
    train_x = exchange if exchange is not None else PlainExchange()
    eval_x = evaluate_exchange if evaluate_exchange is not None else train_x
    nan = float("nan")
    for rnd in range(start_round, rounds + 1):
        t0 = time.perf_counter()
        rejected: list[Rejection] = []
        agg: Aggregate | None = None
        node_ids: list[int] = []
        for attempt in range(policy.retries + 1):
            if attempt:
                delay = policy.retry_backoff * 2 ** (attempt - 1)
                log.warning("round %d: retry %d/%d in %.1f s", rnd, attempt, policy.retries, delay)
                sleep(delay)
            agg, node_ids, dropped, why = _train_attempt(
                grid,
                strategy,
                train_x,
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
            if agg is not None:
                break
            log.warning(
                "round %d: attempt %d failed (%s); keeping the previous model",
                rnd,
                attempt + 1,
                why,
            )
        if agg is not None:
            arrays = strategy.server_update(rnd, arrays, agg)

        # -- federated evaluation (not retried: it does not change the model) --
        fed: dict[str, float] = {}
        ev = (
            evaluate_once(
                grid,
                strategy,
                eval_x,
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
            train_loss=agg.metrics.get("train_loss", nan) if agg else nan,
            eval_loss=central.get("loss", nan),
            accuracy=central.get("accuracy", nan),
            fed_eval_loss=fed.get("eval_loss", nan),
            fed_accuracy=fed.get("eval_acc", nan),
            clients=agg.num_clients if agg else 0,
            failures=len(rejected),
            seconds=time.perf_counter() - t0,
        )
        obs.round_finished(record, arrays, rejected)
    return arrays
