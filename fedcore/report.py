"""The run directory: config, metrics, final model and plot, each written atomically.

Every file is written to a temporary name in the same directory, flushed and
fsynced, then renamed over the target (and the directory fsynced), so a crash
leaves either the old file or the new one, never half of one::

    run-dir/
      config.toml          the resolved config
      metrics.csv          one row per round (see fedcore.federation.RoundRecord)
      metrics.json         the same rows as a JSON list
      model.safetensors    the final global model
      plot.png             loss and accuracy per round
      summary.json         final figures (and the centralized baseline, if run)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from .aggregation import array_view

__all__ = [
    "arrays_from_safetensors",
    "arrays_to_safetensors",
    "atomic_write",
    "write_metrics",
    "write_plot",
]


def atomic_write(
    path: str | Path,
    data: bytes,
    *,
    mode: int = 0o644,
    midway: Callable[[], None] | None = None,
) -> None:
    """Write ``data`` to ``path`` via write-fsync-rename; ``mode`` applies from creation.

    ``midway`` is called after half the bytes are written (crash-safety tests use it
    to die half-way through a write).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if midway is not None:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                midway()
                f.write(data[half:])
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def arrays_to_safetensors(arrays: ArrayRecord, metadata: Mapping[str, Any] | None = None) -> bytes:
    """Serialize an ``ArrayRecord`` as safetensors bytes (no pickle), deterministically.

    ``metadata`` is stored as one sorted-JSON string under ``"fedcore"``: safetensors
    keeps metadata in a hash map whose key order varies between processes, so more
    than one key would make identical models differ byte-wise.
    """
    from safetensors.numpy import save

    tensors = {k: array_view(a) for k, a in arrays.items()}  # C-ordered, shape kept (0-d too)
    meta = {"fedcore": json.dumps(dict(metadata), sort_keys=True)} if metadata else None
    return save(tensors, metadata=meta)


def arrays_from_safetensors(data: bytes) -> ArrayRecord:
    """Inverse of :func:`arrays_to_safetensors`."""
    from safetensors.numpy import load

    from .aggregation import numpy_to_array

    return ArrayRecord({k: numpy_to_array(v) for k, v in load(data).items()})


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


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
