"""The run directory the server writes: metrics files, plot, and the per-round observer.

::

    run-dir/
      config.toml          the resolved config
      checkpoint.safetensors  the latest round's state (fedcore.serverside.checkpoint)
      metrics.csv          one row per round (see fedcore.serverside.rounds.RoundRecord)
      metrics.json         the same rows as a JSON list
      model.safetensors    the final global model
      plot.png             loss and accuracy per round
      summary.json         final figures (and the centralized baseline, if run)

Every file is written with :func:`fedcore.storage.files.atomic_write`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedcore.core.config import Config
from fedcore.core.faults import crash_point
from fedcore.core.records import Rejection
from fedcore.serverside.checkpoint import ServerState, save_checkpoint
from fedcore.serverside.rounds import Observer, RoundRecord
from fedcore.serverside.strategies.base import Strategy
from fedcore.storage.files import atomic_write

__all__ = [
    "Observers",
    "RunObserver",
    "default_run_dir",
    "format_round",
    "write_metrics",
    "write_plot",
]

log = logging.getLogger("fedcore")


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value

def write_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.csv`` and ``metrics.json`` (NaN as empty cell / ``null``)."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    atomic_write(run_dir / "metrics.csv", buf.getvalue().encode())
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in rows
    ]
    atomic_write(run_dir / "metrics.json", (json.dumps(clean, indent=1) + "\n").encode())

def write_plot(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``plot.png``: losses (left) and accuracies (right) per round."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rounds = [r["round"] for r in rows]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (
        ("train_loss", "train (clients)"),
        ("eval_loss", "test (server)"),
        ("fed_eval_loss", "validation (clients)"),
    ):
        ax_loss.plot(rounds, [r[key] for r in rows], marker=".", label=label)
    for key, label in (("accuracy", "test (server)"), ("fed_accuracy", "validation (clients)")):
        ax_acc.plot(rounds, [r[key] for r in rows], marker=".", label=label)
    ax_loss.set(xlabel="round", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(run_dir / "plot.png", buf.getvalue())

class RunObserver(Observer):
    """After every round: checkpoint, metrics files, one summary line (and progress bars)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        strategy: Strategy,
        *,
        progress: bool,
        history: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.strategy = strategy
        self.rounds = cfg.run.rounds
        self.progress = progress
        self.rows: list[dict[str, Any]] = list(history)
        self._bar: Any = None

    def stage_started(self, server_round: int, stage: str, num_messages: int) -> None:
        """Open a progress bar for the stage."""
        self._close_bar()
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=num_messages,
                desc=f"round {server_round}/{self.rounds} {stage}",
                unit="client",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def reply_received(self, server_round: int, stage: str) -> None:
        """Advance the bar."""
        if self._bar is not None:
            self._bar.update(1)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, rejected: Sequence[Rejection]
    ) -> None:
        """Checkpoint the state, rewrite the metrics files, print the summary line."""
        self._close_bar()
        self.rows.append(record.as_dict())
        crash_point("before-checkpoint", server_round=record.round)
        save_checkpoint(
            self.run_dir,
            ServerState(
                round=record.round,
                arrays=arrays,
                strategy_state=self.strategy.state_dict(),
                strategy_arrays=self.strategy.state_arrays(),
                history=self.rows,
                config=self.cfg,
            ),
        )
        write_metrics(self.run_dir, self.rows)
        crash_point("after-metrics", server_round=record.round)
        line = format_round(record, self.rounds)
        if self.progress:
            print(line, flush=True)
            for r in rejected:
                print(f"    dropped {r}", flush=True)
        else:
            log.info(line)

def _f(value: float, spec: str = ".4f") -> str:
    return "-" if math.isnan(value) else format(value, spec)

def format_round(r: RoundRecord, rounds: int) -> str:
    """The one-line summary of a round."""
    width = len(str(rounds))
    return (
        f"round {r.round:>{width}}/{rounds}  train_loss {_f(r.train_loss)}  "
        f"test_loss {_f(r.eval_loss)}  test_acc {_f(r.accuracy)}  "
        f"fed_acc {_f(r.fed_accuracy)}  clients {r.clients}  dropped {r.failures}  "
        f"{r.seconds:.2f} s"
    )

def default_run_dir(cfg: Config) -> Path:
    """``<run.out-dir>/<UTC timestamp>-seed<seed>`` (unique per start)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(cfg.run.out_dir) / f"{stamp}-seed{cfg.run.seed}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path

class Observers(Observer):
    """Fan one event out to several observers, in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def stage_started(self, server_round: int, stage: str, num_messages: int) -> None:
        """Forward."""
        for o in self.observers:
            o.stage_started(server_round, stage, num_messages)

    def reply_received(self, server_round: int, stage: str) -> None:
        """Forward."""
        for o in self.observers:
            o.reply_received(server_round, stage)

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, rejected: Sequence[Rejection]
    ) -> None:
        """Forward."""
        for o in self.observers:
            o.round_finished(record, arrays, rejected)
