"""Files written atomically, and safetensors codecs for model arrays.

Every file is written to a temporary name in the same directory, flushed and
fsynced, then renamed over the target (and the directory fsynced), so a crash
leaves either the old file or the new one, never half of one::

    run-dir/
      config.toml          the resolved config
      metrics.csv          one row per round (see fedcore.serverside.rounds.RoundRecord)
      metrics.json         the same rows as a JSON list
      model.safetensors    the final global model
      plot.png             loss and accuracy per round
      summary.json         final figures (and the centralized baseline, if run)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedcore.core.aggregation import array_view

__all__ = [
    "arrays_from_safetensors",
    "arrays_to_safetensors",
    "atomic_write",
    "write_json",
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
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed on any error below
            os.fchmod(f.fileno(), mode)
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

    from fedcore.core.aggregation import numpy_to_array

    return ArrayRecord({k: numpy_to_array(v) for k, v in load(data).items()})


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
