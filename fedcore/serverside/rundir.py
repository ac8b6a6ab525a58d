"""The run directory the server writes: metrics files, plot, and the per-round observer.

::

    run-dir/
      config.toml          the resolved config
      checkpoint.safetensors  the latest round's state (fedcore.serverside.checkpoint)
      metrics.csv          one row per round: round, train_loss, test_loss, test_accuracy,
                           val_loss, val_accuracy, clients, dropped, seconds, then the
                           users' own metrics by name (fedcore.serverside.rounds.COLUMNS)
      metrics.json         the same rows as a JSON list
      model.safetensors    the final global model
      plot.png             loss and accuracy per round
      summary.json         final figures (run_summary; and the centralized baseline, if run)
      tensorboard/         the same scalars per round as TensorBoard event files

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
from fedcore.serverside.rounds import COLUMNS, Observer, RoundRecord
from fedcore.serverside.strategies.base import Strategy
from fedcore.storage.files import atomic_write, write_json

__all__ = [
    "NO_TRAINING",
    "SPLIT_COLOURS",
    "Observers",
    "RunObserver",
    "columns_of",
    "default_run_dir",
    "format_round",
    "plot_figure",
    "redraw_plot",
    "run_summary",
    "write_metrics",
    "write_plot",
    "write_summary",
]

log = logging.getLogger("fedcore")


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The header: the fixed :data:`~fedcore.serverside.rounds.COLUMNS`, then the rest.

    Every other key of any row follows in name order: the same for a resumed run as
    for an uninterrupted one.
    """
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))
    return [*COLUMNS, *extra]


def write_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.csv`` and ``metrics.json`` (NaN or missing as empty cell / ``null``)."""
    if not rows:
        return
    header = columns_of(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in header})
    atomic_write(run_dir / "metrics.csv", buf.getvalue().encode())
    clean = [{k: _json_value(row.get(k)) for k in header} for row in rows]
    atomic_write(run_dir / "metrics.json", (json.dumps(clean, indent=1) + "\n").encode())


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


#: One colour per data split, the same in both panels (matplotlib's default cycle).
SPLIT_COLOURS = {"train": "C0", "test": "C1", "val": "C2"}
_SPLIT_LABELS = {
    "train": "train (clients)",
    "test": "test (server)",
    "val": "validation (clients)",
}
NO_TRAINING = "no training:\nno round aggregated a valid reply"


def plot_figure(
    rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None = None
) -> Any:
    """The plot as a matplotlib ``Figure``: losses (left) and accuracies (right) per round.

    Each series is labelled with its column name and coloured by its split
    (:data:`SPLIT_COLOURS`); ``baseline`` (``summary.json``'s ``centralized_baseline``)
    is drawn as dashed horizontal lines in the test colour; a run in which no round
    trained says so inside both axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [int(r["round"]) for r in rows]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    panels = (
        (ax_loss, ("train_loss", "test_loss", "val_loss"), "test_loss"),
        (ax_acc, ("test_accuracy", "val_accuracy"), "test_accuracy"),
    )
    for ax, keys, baseline_key in panels:
        for key in keys:
            split = key.split("_", 1)[0]
            ax.plot(
                rounds,
                [_number(r.get(key)) for r in rows],
                marker=".",
                color=SPLIT_COLOURS[split],
                label=f"{key}: {_SPLIT_LABELS[split]}",
            )
        value = (baseline or {}).get(baseline_key)
        if value is not None:
            ax.axhline(
                float(value),
                color=SPLIT_COLOURS["test"],
                linestyle="--",
                linewidth=1,
                label=f"{baseline_key}: centralized baseline",
            )
        if not any(int(r.get("clients") or 0) > 0 for r in rows):
            ax.text(
                0.5,
                0.5,
                NO_TRAINING,
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="red",
                bbox={"facecolor": "white", "edgecolor": "red", "alpha": 0.9},
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_loss.set(xlabel="round", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    fig.tight_layout()
    return fig


def write_plot(
    run_dir: Path, rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None = None
) -> None:
    """``plot.png`` (see :func:`plot_figure`)."""
    if not rows:
        return
    buf = io.BytesIO()
    plot_figure(rows, baseline).savefig(buf, format="png")
    atomic_write(run_dir / "plot.png", buf.getvalue())


def redraw_plot(run_dir: Path) -> None:
    """Redraw ``plot.png`` from ``metrics.json`` and ``summary.json``'s centralized baseline.

    ``fedcore simulate`` calls it after adding the baseline to ``summary.json``.
    """
    try:
        rows = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        return
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except FileNotFoundError:
        summary = {}
    write_plot(run_dir, rows, summary.get("centralized_baseline"))


def run_summary(
    rows: Sequence[Mapping[str, Any]], *, rounds: int, wall_seconds: float
) -> dict[str, Any]:
    """What ``summary.json`` holds (``None`` where there is no value).

    ``rounds`` (planned), ``rounds_trained`` (rounds that aggregated at least one valid
    reply), ``best_round`` (highest ``test_accuracy``, the first on ties),
    ``final_``/``best_test_accuracy``, ``final_test_loss``, ``wall_seconds`` (of this
    server process) and ``clients_dropped`` (dropped replies, all rounds together).
    """

    def finite(value: Any) -> float | None:
        return None if value is None or math.isnan(float(value)) else float(value)

    scored = [(finite(r.get("test_accuracy")), int(r["round"])) for r in rows]
    scored = [(acc, rnd) for acc, rnd in scored if acc is not None]
    best = max(scored, key=lambda s: (s[0], -s[1])) if scored else None
    last = rows[-1] if rows else {}
    return {
        "rounds": rounds,
        "rounds_trained": sum(int(r.get("clients") or 0) > 0 for r in rows),
        "best_round": best[1] if best else None,
        "best_test_accuracy": best[0] if best else None,
        "final_test_accuracy": finite(last.get("test_accuracy")),
        "final_test_loss": finite(last.get("test_loss")),
        "wall_seconds": wall_seconds,
        "clients_dropped": sum(int(r.get("dropped") or 0) for r in rows),
    }


def write_summary(
    run_dir: Path, rows: Sequence[Mapping[str, Any]], *, rounds: int, wall_seconds: float
) -> dict[str, Any]:
    """Write ``summary.json`` (see :func:`run_summary`) and return it."""
    summary = run_summary(rows, rounds=rounds, wall_seconds=wall_seconds)
    write_json(run_dir / "summary.json", summary)
    return summary


class RunObserver(Observer):
    """After every round: checkpoint, metrics files, one summary line (and progress bars).

    With ``progress`` (an interactive ``fedcore`` command) each round's line is printed
    to stdout, and progress bars are drawn on stderr when it is a terminal (never bar
    frames into a pipe or file). ``quiet`` prints no per-round lines and no bars (they
    go to the ``fedcore`` logger at INFO).
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        strategy: Strategy,
        *,
        progress: bool,
        history: Sequence[dict[str, Any]] = (),
        quiet: bool = False,
        bars: bool | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.strategy = strategy
        self.rounds = cfg.run.rounds
        self.progress = progress and not quiet
        self.bars = self.progress and (sys.stderr.isatty() if bars is None else bars)
        self.rows: list[dict[str, Any]] = list(history)
        self._bar: Any = None

    def stage_started(self, server_round: int, stage: str, num_messages: int) -> None:
        """Open a progress bar for the stage."""
        self._close_bar()
        if self.bars:
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


def format_round(r: RoundRecord | Mapping[str, Any], rounds: int) -> str:
    """The one-line summary of a round: each value after its column name."""
    record = r if isinstance(r, RoundRecord) else RoundRecord.from_dict(r)
    width = len(str(rounds))
    parts = [f"round {record.round:>{width}}/{rounds}"]
    for name, value in record.as_dict().items():
        if name in ("round", "seconds"):
            continue
        parts.append(f"{name} {value}" if isinstance(value, int) else f"{name} {_f(value)}")
    parts.append(f"seconds {record.seconds:.2f}")
    return "  ".join(parts)


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
