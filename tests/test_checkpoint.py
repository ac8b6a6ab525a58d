"""Checkpoints: round trip, and every way a bad one is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedcore.core.aggregation import spec_of
from fedcore.core.config import Config
from fedcore.core.errors import CheckpointError
from fedcore.serverside.checkpoint import (
    CHECKPOINT_FILE,
    ServerState,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)


def _state(round_=3, cfg=None, value=1.5):
    arrays = ArrayRecord(
        {"w": Array(np.full((2, 3), value, np.float32)), "n": Array(np.array(7, np.int64))}
    )
    history = [
        {"round": r, "test_accuracy": 0.5 + r / 10, "train_loss": float("nan")}
        for r in range(1, round_ + 1)
    ]
    return ServerState(round_, arrays, {"m": [1.0, 2.0]}, history, cfg or Config())


def test_round_trip(tmp_path):
    st = _state()
    save_checkpoint(tmp_path, st)
    back = load_checkpoint(tmp_path, expect=Config(), model_spec=spec_of(st.arrays))
    assert back.round == 3 and back.strategy_state == {"m": [1.0, 2.0]}
    assert back.history[2]["test_accuracy"] == pytest.approx(0.8)
    assert np.isnan(back.history[0]["train_loss"])
    for k in ("w", "n"):
        assert back.arrays[k].data == st.arrays[k].data
    assert back.config == Config()


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_truncated_anywhere_is_refused_saying_where(tmp_path):
    """Cut inside the 8-byte length, inside the JSON header (every 61st byte and its
    last ones), inside the tensor data (every byte): each region is refused with its
    own message naming the file."""
    import struct

    save_checkpoint(tmp_path, _state())
    p = tmp_path / CHECKPOINT_FILE
    data = p.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    assert 8 < header_end < len(data)  # all three regions exist
    cuts = {*range(10), *range(header_end - 2, len(data)), *range(8, header_end, 61)}
    for keep in sorted(cuts):
        if keep < 8:
            expected = rf"is truncated \({keep} bytes\)"
        elif keep < header_end:
            expected = rf"is truncated or corrupt \(header of {header_end - 8} bytes\)"
        else:
            expected = r"is corrupt: .*not fully covered"
        p.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=expected) as exc:
            load_checkpoint(tmp_path)
        assert str(exc.value).startswith(str(p)), keep
    p.write_bytes(data)
    assert load_checkpoint(tmp_path).round == 3


def test_flipped_model_byte_is_detected(tmp_path):
    save_checkpoint(tmp_path, _state())
    p = tmp_path / CHECKPOINT_FILE
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40  # inside the tensor data
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path)


def test_not_a_fedcore_file(tmp_path):
    from safetensors.numpy import save

    (tmp_path / CHECKPOINT_FILE).write_bytes(save({"w": np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError, match="not a fedcore checkpoint|corrupt"):
        load_checkpoint(tmp_path)


def test_other_config_is_refused_naming_the_key(tmp_path):
    save_checkpoint(tmp_path, _state())
    other = Config().replace(data={"alpha": 0.9})
    with pytest.raises(CheckpointError, match=r"another config \(data.alpha: 0.5 -> 0.9"):
        load_checkpoint(tmp_path, expect=other)
    # keys that cannot change the model may differ (e.g. more rounds, other workers)
    load_checkpoint(tmp_path, expect=Config().replace(run={"rounds": 40}, engine={"workers": 1}))


def test_other_model_is_refused(tmp_path):
    save_checkpoint(tmp_path, _state())
    other = ArrayRecord(
        {"w": Array(np.zeros((3, 3), np.float32)), "n": Array(np.array(7, np.int64))}
    )
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(tmp_path, model_spec=spec_of(other))


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".checkpoint.safetensors.abc.tmp").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".checkpoint.safetensors.abc.tmp"]
    assert (tmp_path / "keep.txt").exists()


def test_a_checkpoint_written_by_fedcore_0_1_resumes(tmp_path):
    """tests/data/v0.1-run: a 2-round run written before the [round] section existed
    (its config names strategy.round-timeout ...). It resumes, each rename is announced
    once, and the run directory's config is rewritten with the new names."""
    import shutil
    import subprocess
    import sys
    import tomllib

    from .conftest import ROOT

    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "data" / "v0.1-run", run)
    proc = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", "--resume", str(run), "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    notice = "config key 'strategy.round-timeout' is deprecated; use 'round.timeout'"
    assert proc.stderr.count(notice) == 1, proc.stderr
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3]
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["round"]["timeout"] == 30.0 and "round-timeout" not in saved["strategy"]
