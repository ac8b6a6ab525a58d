"""Checkpoint integrity: what mutation testing showed ``test_checkpoint.py`` leaves open.

- The strategy's arrays (server-optimizer moments, control variates) survive a round
  trip, are covered by their own checksum, and a checkpoint written before that checksum
  existed still loads.
- The stored config must match its fingerprint; the round must be an integer >= 0
  (round 0 is valid); a header length with its top bit set is a corrupt header.
- The crash points fire where the docs say, on the round they name: half-way through
  the write (the old checkpoint stays byte-identical) and after it (the new one loads).
- Every refusal names the file and says what was found and what to do.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from safetensors.numpy import save

from fedcore.core.aggregation import spec_of
from fedcore.core.config import Config, config_from_dict, to_toml
from fedcore.core.errors import CheckpointError
from fedcore.serverside.checkpoint import (
    CHECKPOINT_FILE,
    STRATEGY_PREFIX,
    ServerState,
    load_checkpoint,
    save_checkpoint,
)
from fedcore.storage.files import arrays_from_safetensors, arrays_to_safetensors


def _state(round_=3, cfg=None, strategy_arrays=None):
    arrays = ArrayRecord({"w": Array(np.full((2, 3), 1.5, np.float32))})
    return ServerState(
        round_,
        arrays,
        {"lr": 0.1},
        [{"round": r} for r in range(1, round_ + 1)],
        cfg or Config(),
        strategy_arrays=strategy_arrays or {},
    )


def _meta(path):
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["fedcore"])


def _rewrite(path, change_meta=None, change_tensors=None):
    """Rewrite a checkpoint with its metadata and/or tensors changed (what a bug or a
    tampering would leave), keeping everything else."""
    data = path.read_bytes()
    tensors = arrays_from_safetensors(data)
    meta = _meta(path)
    if change_meta:
        change_meta(meta)
    if change_tensors:
        tensors = change_tensors(tensors)
    path.write_bytes(arrays_to_safetensors(tensors, meta))


def test_strategy_arrays_round_trip(tmp_path):
    moments = {"m/w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array([4])}
    save_checkpoint(tmp_path, _state(strategy_arrays=moments))
    back = load_checkpoint(tmp_path)
    assert sorted(back.strategy_arrays) == ["m/w", "step"]
    assert np.array_equal(back.strategy_arrays["m/w"], moments["m/w"])
    assert back.strategy_arrays["step"].tolist() == [4]
    back.strategy_arrays["m/w"][0, 0] = 9  # a copy, writable, not a view of the file
    assert sorted(back.arrays.keys()) == ["w"]  # the strategy's arrays stay apart


def test_a_scalar_strategy_array_keeps_its_shape(tmp_path):
    """A 0-d strategy array (an optimizer's step count) comes back 0-d, and a strided
    (non-contiguous) one with its values: save_checkpoint no longer passes them through
    np.ascontiguousarray, which made a 0-d array 1-d."""
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    assert not strided.flags.c_contiguous
    save_checkpoint(tmp_path, _state(strategy_arrays={"step": np.array(4), "m": strided}))
    back = load_checkpoint(tmp_path).strategy_arrays
    assert back["step"].shape == () and back["step"].tolist() == 4
    assert back["m"].shape == (3, 2) and np.array_equal(back["m"], strided)


def test_a_changed_strategy_array_is_detected(tmp_path):
    save_checkpoint(tmp_path, _state(strategy_arrays={"m": np.zeros(4, np.float32)}))

    def change(tensors):
        return ArrayRecord(
            {
                **dict(tensors.items()),
                STRATEGY_PREFIX + "m": Array(np.float32([0, 0, 1, 0])),
            }
        )

    path = tmp_path / CHECKPOINT_FILE
    _rewrite(path, change_tensors=change)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == (
        f"{path} is corrupt: the strategy's arrays do not match their checksum"
    )


def test_a_checkpoint_from_before_the_strategy_checksum_loads(tmp_path):
    save_checkpoint(tmp_path, _state())
    _rewrite(tmp_path / CHECKPOINT_FILE, lambda m: m.pop("strategy_arrays_sha256"))
    assert load_checkpoint(tmp_path).round == 3


def test_a_config_that_does_not_match_its_fingerprint_is_refused(tmp_path):
    save_checkpoint(tmp_path, _state())
    other = to_toml(config_from_dict({"run": {"seed": 99}}))
    path = tmp_path / CHECKPOINT_FILE
    _rewrite(path, lambda m: m.update(config_toml=other))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{path} is corrupt: its config does not match its fingerprint"


def test_an_unreadable_config_is_refused_saying_why(tmp_path):
    save_checkpoint(tmp_path, _state())
    path = tmp_path / CHECKPOINT_FILE
    _rewrite(path, lambda m: m.update(config_toml="[run]\nseed = 'x'\n"))
    with pytest.raises(CheckpointError, match="holds no valid config") as info:
        load_checkpoint(tmp_path)
    assert str(info.value).startswith(f"{path} holds no valid config (config key 'run.seed'")


def test_round_zero_loads(tmp_path):
    save_checkpoint(tmp_path, _state(round_=0))
    assert load_checkpoint(tmp_path).round == 0


@pytest.mark.parametrize("bad", [-1, "3", 2.0, None])
def test_a_round_that_is_not_a_count_is_refused(tmp_path, bad):
    save_checkpoint(tmp_path, _state())
    path = tmp_path / CHECKPOINT_FILE
    _rewrite(path, lambda m: m.update(round=bad))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{path} has an invalid round {bad!r}"


def test_another_format_version_is_refused_naming_both(tmp_path):
    save_checkpoint(tmp_path, _state())
    path = tmp_path / CHECKPOINT_FILE
    _rewrite(path, lambda m: m.update(version=2))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{path} has format version 2; this fedcore reads version 1"


def test_metadata_that_is_not_an_object_is_not_a_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(save({"w": np.zeros(2, np.float32)}, metadata={"fedcore": "[1, 2]"}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{path} is not a fedcore checkpoint"


def test_a_header_length_with_the_top_bit_set_is_a_corrupt_header(tmp_path):
    save_checkpoint(tmp_path, _state())
    path = tmp_path / CHECKPOINT_FILE
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**63 + 10) + data[8:])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{path} is truncated or corrupt (header of {2**63 + 10} bytes)"


def test_a_missing_checkpoint_says_what_that_means(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == (
        f"no checkpoint in {tmp_path} ({CHECKPOINT_FILE} missing): the run never completed "
        "a round, or this is not a fedcore run directory"
    )


def test_another_config_is_refused_listing_the_first_five_differences(tmp_path):
    save_checkpoint(tmp_path, _state())
    changed = {
        "run": {"seed": 5},
        "data": {"alpha": 0.7, "val-fraction": 0.2},
        "train": {"lr": 0.5, "batch-size": 8, "momentum": 0.5},
    }
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, expect=config_from_dict(changed))
    path = tmp_path / CHECKPOINT_FILE
    assert str(info.value) == (
        f"{path} is from another config (data.alpha: 0.5 -> 0.7, data.val-fraction: 0.1 -> 0.2, "
        "run.seed: 0 -> 5, train.batch-size: 32 -> 8, train.lr: 0.05 -> 0.5); resume with "
        f"the run's own config ({tmp_path / 'config.toml'}) or start a new run"
    )


def test_another_model_is_refused_showing_both_specs(tmp_path):
    save_checkpoint(tmp_path, _state())
    other = spec_of(ArrayRecord({"w": Array(np.zeros(3, np.float32))}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, model_spec=other)
    path = tmp_path / CHECKPOINT_FILE
    assert str(info.value) == (
        f"{path} is for another model: its arrays {{'w': [[2, 3], 'float32']}} differ from "
        "the configured model's {'w': [[3], 'float32']}"
    )


_SAVE_ROUND_4 = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from fedcore.core.config import Config
    from fedcore.serverside.checkpoint import ServerState, save_checkpoint
    arrays = ArrayRecord({"w": Array(np.full((2, 3), 4.0, np.float32))})
    save_checkpoint(Path(sys.argv[1]), ServerState(4, arrays, {}, [], Config()))
    print("saved")
    """
)


def _save_round_4(run_dir, crash_at):
    env = {**os.environ, "FEDCORE_CRASH_AT": crash_at}
    return subprocess.run(
        [sys.executable, "-c", _SAVE_ROUND_4, str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_crash_half_way_through_the_write_leaves_the_old_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _state(round_=3))
    path = tmp_path / CHECKPOINT_FILE
    before = path.read_bytes()
    done = _save_round_4(tmp_path, "checkpoint-partial:4")
    assert done.returncode == -9, (done.returncode, done.stderr[-2000:])
    assert path.read_bytes() == before
    assert list(tmp_path.glob(".*.tmp")), "the half-written temporary is left behind"
    assert load_checkpoint(tmp_path).round == 3


def test_a_crash_after_the_write_leaves_the_new_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _state(round_=3))
    done = _save_round_4(tmp_path, "checkpoint-written:4")
    assert done.returncode == -9, (done.returncode, done.stderr[-2000:])
    assert done.stdout == ""  # killed before the script went on
    assert load_checkpoint(tmp_path).round == 4


def test_a_crash_point_of_another_round_does_not_fire(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCORE_CRASH_AT", "checkpoint-partial:5")
    save_checkpoint(tmp_path, _state(round_=4))
    monkeypatch.setenv("FEDCORE_CRASH_AT", "checkpoint-written:3")
    save_checkpoint(tmp_path, _state(round_=4))
    assert load_checkpoint(tmp_path).round == 4
