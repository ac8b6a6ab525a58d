"""Crash-safe server checkpoints: one file, written atomically after every round.

``<run-dir>/checkpoint.safetensors`` holds the global model's arrays as
safetensors tensors, and everything else the server needs to continue as one
JSON document in the safetensors metadata (key ``"fedcore"``): format version,
last completed round, strategy state, metrics history, the resolved config
(TOML text) and its fingerprint, the model's array spec, and a SHA-256 over the
tensor bytes. The file is replaced by write-fsync-rename, so a crash at any
point leaves the previous round's checkpoint intact.

Sampling needs no saved RNG state: every draw is derived from (run seed, round,
purpose) (see ``fedcore.core.sampling``), so a resumed run samples exactly what an
uninterrupted one would, and ends with a bit-identical model.

A checkpoint that is truncated, corrupt, of another format version, from a
different config, or for a different model is refused with
:class:`~fedcore.core.errors.CheckpointError`, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedcore.core.aggregation import ArraySpec, array_view, numpy_to_array, spec_of
from fedcore.core.config import RESUME_MAY_CHANGE, Config, config_from_dict, to_dict, to_toml
from fedcore.core.errors import CheckpointError, ConfigError
from fedcore.core.faults import crash_point
from fedcore.storage.files import arrays_from_safetensors, arrays_to_safetensors, atomic_write

__all__ = [
    "CHECKPOINT_FILE",
    "ServerState",
    "STARTED_ENTRIES",
    "config_fingerprint",
    "has_checkpoint",
    "load_checkpoint",
    "never_trained",
    "remove_stale_temporaries",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT_VERSION = 1
_MAX_HEADER = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerState:
    """Everything needed to continue a run after its last completed round."""

    round: int
    arrays: ArrayRecord
    strategy_state: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]]
    config: Config
    #: Array-valued strategy state (server-optimizer moments, control variates).
    strategy_arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


#: Prefix of the strategy's arrays among the checkpoint's tensors.
STRATEGY_PREFIX = "fedcore.strategy/"


#: What fedcore 0.1 (before the [round] section) let change on resume. Its checkpoints
#: name the round-policy keys in [strategy]; their fingerprint left exactly these out.
_V01_RESUME_MAY_CHANGE = frozenset(
    {
        "run.rounds",
        "run.out-dir",
        "run.centralized-baseline",
        "run.baseline-epochs",
        "engine.workers",
        "strategy.round-timeout",
        "strategy.round-retries",
        "strategy.retry-backoff",
        "deploy.run-dir",
        "deploy.poll-interval",
        "deploy.resume",
    }
)


#: Metric columns renamed since fedcore 0.1 (its history rows) -> today's names.
_V01_COLUMNS = {
    "eval_loss": "test_loss",
    "accuracy": "test_accuracy",
    "fed_eval_loss": "val_loss",
    "fed_accuracy": "val_accuracy",
    "failures": "dropped",
}


def _current_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A history row with fedcore 0.1's column names mapped to today's."""
    return {_V01_COLUMNS.get(k, k): v for k, v in row.items()}


def _affecting(table: Mapping[str, Any], may_change: frozenset[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, keys in table.items():
        for key, value in keys.items():
            dotted = f"{section}.{key}"
            if dotted not in may_change:
                flat[dotted] = value
    return flat


def _model_affecting(cfg: Config) -> dict[str, Any]:
    return _affecting(to_dict(cfg), RESUME_MAY_CHANGE)


def _fingerprint(flat: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(cfg: Config) -> str:
    """SHA-256 of the config keys that determine the model (see ``RESUME_MAY_CHANGE``)."""
    return _fingerprint(_model_affecting(cfg))


def _intact(raw: Mapping[str, Any], fingerprint: object) -> bool:
    """Whether the stored config text still has the fingerprint written beside it.

    Computed over the config as stored, so a checkpoint written before a key was
    renamed (fedcore 0.1's ``strategy.round-timeout``...) still checks out.
    """
    return any(
        _fingerprint(_affecting(raw, may_change)) == fingerprint
        for may_change in (RESUME_MAY_CHANGE, _V01_RESUME_MAY_CHANGE)
    )


def _arrays_digest(arrays: ArrayRecord) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays.keys()):
        view = array_view(arrays[name])
        h.update(f"{name}:{view.dtype.str}:{view.shape}".encode())
        h.update(view.tobytes())
    return h.hexdigest()


def _spec_json(spec: Mapping[str, ArraySpec]) -> dict[str, list[Any]]:
    return {k: [list(v.shape), v.dtype] for k, v in sorted(spec.items())}


def save_checkpoint(run_dir: Path, state: ServerState) -> None:
    """Atomically replace ``run_dir/checkpoint.safetensors`` with ``state``."""
    # numpy_to_array makes a C-contiguous copy where needed and, unlike
    # np.ascontiguousarray, keeps a 0-d array (an optimizer's step count) 0-d
    strategy = ArrayRecord({k: numpy_to_array(v) for k, v in state.strategy_arrays.items()})
    meta = {
        "version": FORMAT_VERSION,
        "round": state.round,
        "strategy_state": dict(state.strategy_state),
        "history": [dict(r) for r in state.history],
        "config_toml": to_toml(state.config),
        "config_fingerprint": config_fingerprint(state.config),
        "model_spec": _spec_json(spec_of(state.arrays)),
        "arrays_sha256": _arrays_digest(state.arrays),
        "strategy_arrays_sha256": _arrays_digest(strategy),
    }
    tensors = ArrayRecord(
        {**dict(state.arrays.items()), **{STRATEGY_PREFIX + k: v for k, v in strategy.items()}}
    )
    atomic_write(
        run_dir / CHECKPOINT_FILE,
        arrays_to_safetensors(tensors, meta),
        midway=lambda: crash_point("checkpoint-partial", server_round=state.round),
    )
    crash_point("checkpoint-written", server_round=state.round)


def _read_metadata(data: bytes, path: Path) -> dict[str, Any]:
    if len(data) < 8:
        raise CheckpointError(f"{path} is truncated ({len(data)} bytes); it cannot be resumed")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or 8 + size > len(data):
        raise CheckpointError(f"{path} is truncated or corrupt (header of {size} bytes)")
    try:
        header = json.loads(data[8 : 8 + size])
        meta = json.loads(header["__metadata__"]["fedcore"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a fedcore checkpoint ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a fedcore checkpoint")
    return meta


def load_checkpoint(
    run_dir: Path,
    *,
    expect: Config | None = None,
    model_spec: Mapping[str, ArraySpec] | None = None,
) -> ServerState:
    """Read and verify ``run_dir``'s checkpoint.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    expect : Config, optional
        The config the resumed run will use; it must agree with the checkpoint's on
        every key that determines the model.
    model_spec : Mapping[str, ArraySpec], optional
        The array names/shapes/dtypes of the model that will be trained; the
        checkpoint's must be identical.

    """
    path = run_dir / CHECKPOINT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint in {run_dir} ({CHECKPOINT_FILE} missing): the run never completed "
            "a round, or this is not a fedcore run directory"
        ) from None
    meta = _read_metadata(data, path)
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('version')!r}; "
            f"this fedcore reads version {FORMAT_VERSION}"
        )
    try:
        tensors = arrays_from_safetensors(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    arrays = ArrayRecord({k: v for k, v in tensors.items() if not k.startswith(STRATEGY_PREFIX)})
    strategy = ArrayRecord(
        {k[len(STRATEGY_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STRATEGY_PREFIX)}
    )
    if _arrays_digest(arrays) != meta.get("arrays_sha256"):
        raise CheckpointError(f"{path} is corrupt: the model bytes do not match their checksum")
    if _arrays_digest(strategy) != meta.get("strategy_arrays_sha256", _arrays_digest(strategy)):
        raise CheckpointError(
            f"{path} is corrupt: the strategy's arrays do not match their checksum"
        )
    try:
        import tomllib

        raw = tomllib.loads(meta["config_toml"])
        saved_cfg = config_from_dict(raw)
    except (KeyError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path} holds no valid config ({exc})") from exc
    if not _intact(raw, meta.get("config_fingerprint")):
        raise CheckpointError(f"{path} is corrupt: its config does not match its fingerprint")
    if expect is not None and config_fingerprint(expect) != config_fingerprint(saved_cfg):
        a, b = _model_affecting(saved_cfg), _model_affecting(expect)
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise CheckpointError(
            f"{path} is from another config ({shown}); resume with the run's own config "
            f"({run_dir / 'config.toml'}) or start a new run"
        )
    if model_spec is not None and _spec_json(model_spec) != meta.get("model_spec"):
        raise CheckpointError(
            f"{path} is for another model: its arrays {meta.get('model_spec')} differ from "
            f"the configured model's {_spec_json(model_spec)}"
        )
    rnd = meta.get("round")
    if not isinstance(rnd, int) or rnd < 0:
        raise CheckpointError(f"{path} has an invalid round {rnd!r}")
    return ServerState(
        round=rnd,
        arrays=arrays,
        strategy_state=meta.get("strategy_state") or {},
        history=[_current_row(r) for r in meta.get("history") or []],
        config=saved_cfg,
        strategy_arrays={k: array_view(v).copy() for k, v in strategy.items()},
    )


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete temp files a crash left mid-write (``.<name>.*.tmp``); return them."""
    stale = sorted(run_dir.glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


#: What a run writes into its directory before its first round completes (the
#: resolved config, the simulated clients' state, TensorBoard's opened event file);
#: with nothing else there, no round finished and the directory may be reused.
STARTED_ENTRIES = frozenset({"config.toml", "client-state", "tensorboard"})


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (at least one round completed)."""
    return (run_dir / CHECKPOINT_FILE).is_file()


def never_trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a start interrupted before round 1 wrote.

    That is :data:`STARTED_ENTRIES` and temp files of interrupted writes: no
    checkpoint, no metrics, no model. Anything else (a finished run, a user's files)
    is not.
    """
    if not (run_dir / "config.toml").is_file():
        return False
    return all(
        p.name in STARTED_ENTRIES or (p.name.startswith(".") and p.name.endswith(".tmp"))
        for p in run_dir.iterdir()
    )
