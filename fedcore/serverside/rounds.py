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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedcore.core.config import RoundConfig
from fedcore.core.errors import (
    USER_CODE_FAILED,
    RoundFailedError,
    is_user_code_error,
    user_code_origin,
)
from fedcore.core.records import ATTEMPT, Rejection
from fedcore.serverside.exchange import Aggregate, EvaluateResult, Exchange, PlainExchange
from fedcore.serverside.strategies.base import Strategy

__all__ = [
    "COLUMNS",
    "Observer",
    "RoundPolicy",
    "RoundRecord",
    "evaluate_once",
    "extra_metrics",
    "run_federation",
    "train_once",
    "wait_for_nodes",
]

log = logging.getLogger("fedcore")

CentralEvaluate = Callable[[ArrayRecord], dict[str, float]]


@dataclass(frozen=True)
class RoundRecord:
    """One row of ``metrics.csv``: what a round produced.

    Its field names (:data:`COLUMNS`) are the metric names everywhere: console line,
    ``metrics.csv``/``metrics.json``, plot legends, ``summary.json``, TensorBoard.
    ``test_*`` is the server's centralized evaluation on the held-out test set,
    ``val_*`` the example-weighted federated evaluation on the clients' validation
    data, ``dropped`` the replies not used. ``nan`` where a stage was skipped or got
    no valid reply. ``extra`` holds the users' own metrics, example-weighted across
    clients (:func:`extra_metrics`); they follow the fixed columns in name order.
    """

    round: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    val_loss: float
    val_accuracy: float
    clients: int
    dropped: int
    seconds: float
    extra: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict (for CSV/JSON): the fixed columns, then the extra ones by name."""
        row: dict[str, float | int] = {name: getattr(self, name) for name in COLUMNS}
        row.update(sorted(self.extra.items()))
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RoundRecord:
        """The record of a ``metrics.json`` row (``None`` read as ``nan``)."""
        nan = float("nan")
        fixed = {name: nan if row.get(name) is None else row[name] for name in COLUMNS}
        extra = {k: nan if v is None else float(v) for k, v in row.items() if k not in COLUMNS}
        return cls(**fixed, extra=extra)


#: The fixed metric columns, in order (declared once: ``RoundRecord``'s fields).
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RoundRecord) if f.name != "extra")

#: Wire names of the federated evaluation's metrics -> their columns.
_EVALUATE_COLUMNS = {"eval_loss": "val_loss", "eval_acc": "val_accuracy"}


def extra_metrics(train: Mapping[str, float], evaluate: Mapping[str, float]) -> dict[str, float]:
    """The users' own metrics, named as columns.

    Training ``k`` -> ``train_<k>`` (kept when it already starts with ``train_``),
    federated evaluation ``k`` -> ``val_<k>`` (an ``eval_`` prefix dropped). Names of
    fixed columns are never overwritten.
    """
    out: dict[str, float] = {}
    for key, value in train.items():
        name = key if key.startswith("train_") else f"train_{key}"
        out[name] = value
    for key, value in evaluate.items():
        if key in _EVALUATE_COLUMNS:
            continue
        out[f"val_{key.removeprefix('eval_')}"] = value
    return {k: v for k, v in out.items() if k not in COLUMNS}


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
    shown: dict[str, tuple[int, int]] = {}  # user-code errors shown: reason -> (round, node)
    trained = stop = False
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
            user_code = bool(dropped) and all(is_user_code_error(r.reason) for r in dropped)
            dropped = _shown_once(rnd, dropped, shown)
            rejected += dropped
            if agg is not None:
                break
            log.warning(
                "round %d: attempt %d failed (%s); keeping the previous model",
                rnd,
                attempt + 1,
                why,
            )
            if user_code:  # deterministic: a retry would fail the same way
                log.warning(
                    "round %d: not retried: it failed in the user's own code, which fails "
                    "the same way on every retry",
                    rnd,
                )
                stop = not trained
                break
        if agg is not None:
            arrays = strategy.server_update(rnd, arrays, agg)
            trained = True
        if stop:
            log.error(
                "round %d: stopping the run: no round trained and this one failed in the "
                "user's own code (the error above); fix it and run again",
                rnd,
            )

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
            if node_ids and not stop
            else None
        )
        if ev is not None:
            dropped = _shown_once(rnd, list(ev.rejected), shown)
            rejected += dropped
            fed = ev.metrics

        # -- centralized evaluation --
        central = central_evaluate(arrays) if central_evaluate else {}
        record = RoundRecord(
            round=rnd,
            train_loss=agg.metrics.get("train_loss", nan) if agg else nan,
            test_loss=central.get("loss", nan),
            test_accuracy=central.get("accuracy", nan),
            val_loss=fed.get("eval_loss", nan),
            val_accuracy=fed.get("eval_acc", nan),
            clients=agg.num_clients if agg else 0,
            dropped=len(rejected),
            seconds=time.perf_counter() - t0,
            extra=extra_metrics(agg.metrics if agg else {}, fed),
        )
        obs.round_finished(record, arrays, rejected)
        if stop:
            break
    return arrays


def _shown_once(
    rnd: int, dropped: Sequence[Rejection], shown: dict[str, tuple[int, int]]
) -> list[Rejection]:
    """Log why each reply was dropped; an error in the user's code in full only once.

    The first client with a given user-code error gets its whole reason (what went
    wrong, the user's traceback) logged; the others, in this round or later, are
    counted on one line. The rejections returned for the observers (which print and
    record them) say only which function failed, "the error is shown above", or "the
    same error as client N (round R)": the error text itself is shown once.
    """
    out: list[Rejection] = []
    repeats: dict[str, list[int]] = {}
    for r in dropped:
        if not is_user_code_error(r.reason):
            log.warning("round %d: dropped %s", rnd, r)
            out.append(r)
            continue
        first = shown.get(r.reason)
        if first is None:
            shown[r.reason] = (rnd, r.node_id)
            log.warning("round %d: dropped %s", rnd, r)
            shown_above = f"{user_code_origin(r.reason)}; the error is shown above"
            out.append(Rejection(r.node_id, r.stage, shown_above))
            continue
        repeats.setdefault(r.reason, []).append(r.node_id)
        same = f"{USER_CODE_FAILED} the same error as client {first[1]} (round {first[0]})"
        out.append(Rejection(r.node_id, r.stage, same))
    for reason, nodes in repeats.items():
        at, node = shown[reason]
        log.warning(
            "round %d: the same error as client %d (round %d) on %d more client(s): %s",
            rnd,
            node,
            at,
            len(nodes),
            ", ".join(map(str, nodes)),
        )
    return out
