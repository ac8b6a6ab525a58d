"""Server-side logic behind ``server/app.py``: config -> strategy -> rounds -> report.

:func:`serve` is what the ServerApp's ``main`` calls on every engine. The
server's ``node_config`` may carry ``run-dir`` (where to write) and
``progress`` (print a line per round; progress bars when stderr is a terminal),
``quiet`` (no per-round lines) and ``plot`` (default true; false: a run that
completes leaves ``plot.png`` to its caller, see :func:`serve`). Flower's
deployment engine gives a ServerApp no node config: there the run goes to
``deploy.run-dir`` if set (``fedcore server`` sets it), else to
``<run.out-dir>/<timestamp>``, reported through logging.

On every grid but fedcore's embedded one, the ServerApp drives its own
push/pull loop (:class:`~fedcore.engines.polling.PollingGrid`, every
``deploy.poll-interval`` seconds) instead of the engine's (3 s under Flower's
deployment engine).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid

from fedcore.clientside.data import Dataset, holdout
from fedcore.clientside.models import build_model
from fedcore.clientside.training import evaluate, make_loader
from fedcore.core.aggregation import spec_of
from fedcore.core.config import Config, config_from_flat, to_toml
from fedcore.core.errors import ConfigError, RoundFailedError
from fedcore.core.records import Rejection, load_arrays, model_to_arrays
from fedcore.core.seeds import derive_seed
from fedcore.runtime.diagnostics import (
    DropReporter,
    client_names,
    dropout_margin_warnings,
    read_dropped,
    server_data_line,
)
from fedcore.serverside.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
)
from fedcore.serverside.exchange import Exchange, PlainExchange
from fedcore.serverside.loggers import close_loggers, run_loggers
from fedcore.serverside.rounds import Observer, RoundPolicy, RoundRecord, run_federation
from fedcore.serverside.rundir import (
    Observers,
    RunObserver,
    default_run_dir,
    write_metrics,
    write_plot,
    write_summary,
)
from fedcore.serverside.strategies import STRATEGIES, Sampling, Strategy, strategy_class
from fedcore.storage.admitted import read_admitted_blob
from fedcore.storage.files import arrays_to_safetensors, atomic_write
from fedcore.storage.keys import ADMITTED_LIST

__all__ = [
    "RunSummary",
    "build_exchanges",
    "build_strategy",
    "plain_exchange",
    "fast_polling",
    "registered_node_keys",
    "round_policy",
    "serve",
]

log = logging.getLogger("fedcore")

T = TypeVar("T")


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports."""

    run_dir: Path
    rounds: int
    final_accuracy: float
    final_loss: float
    seconds: float


def build_strategy(cfg: Config) -> Strategy:
    """The strategy ``strategy.name`` names, with its ``[strategy.options]`` validated.

    A strategy that needs each client's update is refused with secure aggregation on
    (``ConfigError`` naming ``strategy.name`` and ``secagg.enabled``), before anything
    starts.
    """
    s = cfg.strategy
    cls = strategy_class(s.name)
    if cfg.secagg.enabled and not cls.linear:
        linear = ", ".join(n for n in STRATEGIES if STRATEGIES.get(n).linear)
        raise ConfigError(
            "strategy.name",
            s.name,
            f"needs each client's individual update, which secure aggregation "
            f"(secagg.enabled = true) hides from the server; use a linear strategy "
            f"({linear}) or set [secagg] enabled = false",
        )
    sampling = fields_from(s, Sampling)
    return cls.from_config(getattr(s, "options", {}), seed=cfg.run.seed, sampling=sampling)


def plain_exchange(cfg: Config) -> PlainExchange:
    """The plain exchange with ``[strategy]``'s reply limits."""
    s = cfg.strategy
    return PlainExchange(
        accumulation_block=s.accumulation_block,
        accumulation_threads=s.accumulation_threads,
        max_examples=s.max_num_examples or None,
        max_reply_bytes=int(s.max_reply_mb * 2**20) or None,
    )


def fields_from(section: Any, cls: type[T]) -> T:
    """``cls`` built from the same-named fields of a config section (no hand-kept copy)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(
        **{f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}
    )


def round_policy(cfg: Config) -> RoundPolicy:
    """The round policy: the ``[round]`` section."""
    return cfg.round


def _secagg_settings(cfg: Config) -> Any:
    from fedcore.secagg.exchange import SecAggSettings

    settings = fields_from(cfg.secagg, SecAggSettings)
    extra = [n.strip() for n in cfg.secagg.extra_metrics.split(",") if n.strip()]
    return dataclasses.replace(settings, metric_keys=("train_loss", *extra))


def _secagg_roster(node_config: Mapping[str, Any] | None) -> Any:
    """Return the CA roster of ``node_config["ca-cert"]`` (deployment), else TOFU pins."""
    from fedcore.secagg.protocol.rosters import CaRoster, PinnedRoster
    from fedcore.storage.keys import CA_CERT

    nc = node_config or {}
    if CA_CERT in nc:
        import datetime as dt

        return CaRoster.from_file(str(nc[CA_CERT]), now=dt.datetime.now(dt.UTC))
    return PinnedRoster({})


def registered_node_keys(grid: Grid) -> dict[int, Any]:
    """Node id -> identity key the SuperLink authenticated the node with (deployment).

    Nodes whose registered key is absent or not an EC key (Flower's simulation
    engines put placeholders there) are left out; a round whose nodes have no
    usable keys falls back to the configured roster, and with some keys present a
    node without one is refused by :class:`~fedcore.secagg.protocol.rosters.RegisteredKeyRoster`.
    """
    from fedcore.core.errors import DeploymentError
    from fedcore.storage.keys import load_public_key

    keys: dict[int, Any] = {}
    for info in grid.get_nodes():
        raw = bytes(getattr(info, "public_key", b"") or b"")
        if not raw:
            continue
        try:
            keys[int(info.node_id)] = load_public_key(raw)
        except DeploymentError:
            continue
    return keys


def build_exchanges(
    cfg: Config,
    node_config: Mapping[str, Any] | None = None,
    *,
    roster: Any = None,
) -> tuple[Exchange, Exchange]:
    """The round's (training, evaluation) exchanges: SecAgg+ where ``[secagg]`` says, else plain.

    Advert signatures are checked against the keys the SuperLink authenticated each
    node with (a provisioned deployment), else against the CA in
    ``node_config["ca-cert"]``, else each client's first key is pinned (trust on
    first use).
    """
    plain = plain_exchange(cfg)
    if not cfg.secagg.enabled:
        return plain, plain
    from fedcore.secagg.exchange import SecureExchange

    roster = roster if roster is not None else _secagg_roster(node_config)
    listed = str((node_config or {}).get(ADMITTED_LIST, ""))
    secure = SecureExchange(
        _secagg_settings(cfg),
        seed=cfg.run.seed,
        roster=roster,
        node_keys=registered_node_keys,
        admitted=(lambda: read_admitted_blob(listed)) if listed else None,
    )
    return secure, (secure if cfg.secagg.evaluate else plain)


def initial_model(cfg: Config, test: Dataset) -> torch.nn.Module:
    """The model with its seeded initial weights (checked against the data's classes)."""
    torch.manual_seed(derive_seed(cfg.run.seed, "init"))
    return build_model(cfg.model, input_shape=test.input_shape, num_classes=test.num_classes)


def fast_polling(grid: Grid, interval: float, *, pack: bool = False) -> Grid:
    """``grid`` wrapped in a :class:`PollingGrid`, unless it already streams its replies.

    A grid whose class sets ``streams_replies = True`` (fedcore's embedded grid, a
    ``PollingGrid``) yields each reply as soon as it arrives; Flower's deployment
    grid sleeps 3 s between pulls and gets wrapped. ``pack``: a network grid's
    messages carry their arrays packed (``deploy.pack-arrays``; Flower's in-memory
    simulation grid moves no bytes, so it never packs).
    """
    from fedcore import flower_adapter as flower
    from fedcore.engines.polling import PollingGrid

    if getattr(type(grid), "streams_replies", False):
        return grid
    return PollingGrid(grid, interval=interval, pack=pack and not flower.in_memory_grid(grid))


def serve(grid: Grid, context: Context, *, observers: Sequence[Observer] = ()) -> RunSummary:
    """Run the whole federated training described by ``context.run_config``.

    ``observers`` also receive every round event (after the run directory is updated).

    With ``node_config["resume"]`` (or ``deploy.resume``) set, continue the run in
    the run directory from its checkpoint (refused if the checkpoint is corrupt or
    from another config or model).

    A run in which no round trained (every client refused or failed, e.g. clients
    that require secure aggregation asked for plain rounds) writes its run directory
    and then raises :class:`~fedcore.core.errors.RoundFailedError` saying why, so
    ``fedcore simulate`` and ``fedcore server`` exit non-zero.

    With ``node_config["plot"]`` false, a run that completes (or ends in that
    ``RoundFailedError``) writes everything but ``plot.png``: ``fedcore simulate``
    draws it from ``metrics.json`` once its executors have stopped (matplotlib and
    the drawing add ~28 MiB to this process, measured, which with a worker process
    still alive was the run's peak memory). A run that fails otherwise draws it here.
    """
    t0 = time.perf_counter()
    cfg = config_from_flat(context.run_config)
    node_config = context.node_config
    if "run-dir" in node_config:
        run_dir = Path(str(node_config["run-dir"]))
    elif cfg.deploy.run_dir:
        run_dir = Path(cfg.deploy.run_dir)
    else:
        run_dir = default_run_dir(cfg)
    grid = fast_polling(grid, cfg.deploy.poll_interval, pack=cfg.deploy.pack_arrays)
    progress = bool(node_config.get("progress", False))
    resume = bool(node_config.get("resume", cfg.deploy.resume))

    train_part, test = holdout(cfg.data, seed=cfg.run.seed)
    log.info("%s", server_data_line(cfg, len(train_part) + len(test), len(test)))
    for warning in dropout_margin_warnings(cfg, cfg.run.clients):
        log.warning("%s", warning)
    model = initial_model(cfg, test)
    arrays = model_to_arrays(model)
    strategy = build_strategy(cfg)
    history: list[dict[str, Any]] = []
    start = 1
    if resume and not has_checkpoint(run_dir):  # stopped before round 1 completed
        log.warning("%s has no checkpoint: starting it from round 1", run_dir)
        resume = False
    if resume:
        for stale in remove_stale_temporaries(run_dir):
            log.warning("removed %s left by an interrupted write", stale.name)
        state = load_checkpoint(run_dir, expect=cfg, model_spec=spec_of(arrays))
        arrays, start, history = state.arrays, state.round + 1, [dict(r) for r in state.history]
        strategy.load_state(state.strategy_state, state.strategy_arrays)
        # the checkpoint's history is authoritative: a kill between the checkpoint and the
        # metrics files left them a round behind (nothing re-runs that round to rewrite them)
        write_metrics(run_dir, history)
        (log.info if not progress else print)(
            f"resuming {run_dir} after round {state.round} of {cfg.run.rounds}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.toml", to_toml(cfg).encode())

    test_loader = make_loader(test, batch_size=512, shuffle=False)

    def central_evaluate(current: ArrayRecord) -> dict[str, float]:
        load_arrays(model, current)
        return evaluate(model, test_loader)

    observer = RunObserver(
        run_dir,
        cfg,
        strategy,
        progress=progress,
        history=history,
        quiet=bool(node_config.get("quiet", False)),
    )
    loggers = run_loggers(cfg, run_dir)
    tally = _TrainedRounds()
    drops = DropReporter(
        run_dir,
        lambda: client_names(registered_node_keys(grid), node_config.get(ADMITTED_LIST)),
        history=read_dropped(run_dir) if resume else (),
    )
    train_config = ConfigRecord(
        {
            "lr": cfg.train.lr,
            "local-epochs": cfg.train.local_epochs,
            "batch-size": cfg.train.batch_size,
        }
    )
    train_exchange, evaluate_exchange = build_exchanges(cfg, node_config)
    log.info(
        "training exchange: %s; federated evaluation: %s",
        train_exchange.label,
        evaluate_exchange.label,
    )
    try:
        final = run_federation(
            grid,
            strategy,
            arrays=arrays,
            rounds=cfg.run.rounds,
            train_config=train_config,
            evaluate_config=ConfigRecord(),
            policy=round_policy(cfg),
            exchange=train_exchange,
            evaluate_exchange=evaluate_exchange,
            central_evaluate=central_evaluate,
            observer=Observers(observer, tally, drops, *loggers, *observers),
            start_round=start,
        )
    except KeyboardInterrupt:
        # Ctrl-C: the summary, not the plot (importing matplotlib can take seconds of
        # the 3 s a stop may take; the next run or --resume draws it)
        _finish(loggers, run_dir, observer.rows, cfg, t0, plot=False)
        raise
    except BaseException:  # summary.json and plot.png however the run ends
        _finish(loggers, run_dir, observer.rows, cfg, t0, plot=True)
        raise
    summary_json = _finish(
        loggers, run_dir, observer.rows, cfg, t0, plot=bool(node_config.get("plot", True))
    )
    atomic_write(
        run_dir / "model.safetensors", arrays_to_safetensors(final, {"rounds": cfg.run.rounds})
    )
    summary = RunSummary(
        run_dir=run_dir,
        rounds=cfg.run.rounds,
        final_accuracy=_or_nan(summary_json["final_test_accuracy"]),
        final_loss=_or_nan(summary_json["final_test_loss"]),
        seconds=time.perf_counter() - t0,
    )
    if tally.rounds and not tally.trained:
        raise RoundFailedError(
            f"no round trained: every client refused or failed in "
            f"{'all ' if tally.rounds == cfg.run.rounds - start + 1 else ''}{tally.rounds} "
            f"round(s) ({tally.why()}); the model did not change (run directory {run_dir})"
        )
    return summary


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _finish(
    loggers: Sequence[Any],
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    cfg: Config,
    t0: float,
    *,
    plot: bool,
) -> dict[str, Any]:
    """Close the loggers, write summary.json (and plot.png): however the run ends."""
    close_loggers(loggers)
    summary = write_summary(
        run_dir, rows, rounds=cfg.run.rounds, wall_seconds=time.perf_counter() - t0
    )
    if plot:
        write_plot(run_dir, rows)
    return summary


class _TrainedRounds(Observer):
    """Counts the rounds that trained, and keeps the first reasons replies were refused."""

    def __init__(self) -> None:
        self.rounds = 0
        self.trained = 0
        self.reasons: dict[str, int] = {}

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, rejected: Sequence[Rejection]
    ) -> None:
        self.rounds += 1
        self.trained += record.clients > 0
        for r in rejected:
            line = r.reason.strip().splitlines()[0] if r.reason.strip() else "no reason given"
            self.reasons[line] = self.reasons.get(line, 0) + 1

    def why(self) -> str:
        if not self.reasons:
            return "no replies"
        shown = [f"{n} x {line}" for line, n in list(self.reasons.items())[:3]]
        more = len(self.reasons) - len(shown)
        return "; ".join(shown) + (f"; and {more} other reason(s)" if more > 0 else "")
