"""Client state: versioned by round, the last two kept, atomic, resumable, never pickled."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedcore.clientside.state import STATE_DIR, ClientState

from .conftest import ROOT


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {
        "0.weight": np.full((2, 3), value, np.float64),
        "0.bias": np.full(3, -value, np.float32),
        "steps": np.array(int(value), np.int64),
    }


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


@pytest.fixture(params=["directory", "context.state"])
def store(request, tmp_path):
    if request.param == "directory":
        return ClientState(tmp_path / "state")
    return ClientState(records=RecordDict())


def test_reads_the_latest_version_before_the_round_and_keeps_two(store):
    assert store.load("scaffold", 1) is None
    for rnd in (1, 2, 3):
        store.save("scaffold", rnd, _arrays(rnd))
    assert store.versions("scaffold") == [2, 3]
    assert _equal(store.load("scaffold", 4), _arrays(3))  # round 4 starts from round 3
    assert _equal(store.load("scaffold", 3), _arrays(2))  # a re-run of round 3: from round 2
    assert store.load("scaffold", 2) is None  # round 1 is gone: only two are kept
    # Rounds the client skipped (not sampled) do not matter: the latest earlier one counts.
    store.save("scaffold", 7, _arrays(7))
    assert store.versions("scaffold") == [3, 7]
    assert _equal(store.load("scaffold", 6), _arrays(3))
    assert _equal(store.load("scaffold", 9), _arrays(7))


def test_a_server_restart_reruns_a_round_from_the_same_client_state(store):
    """Clients wrote round 3, the server died before its checkpoint of 3 and re-runs 3."""
    store.save("scaffold", 1, _arrays(1))
    store.save("scaffold", 2, _arrays(2))
    first_run_input = store.load("scaffold", 3)
    store.save("scaffold", 3, _arrays(3))
    # ... server killed; resumed from its round-2 checkpoint, it sends round 3 again:
    assert _equal(store.load("scaffold", 3), first_run_input)
    store.save("scaffold", 3, _arrays(3))
    assert store.versions("scaffold") == [2, 3]
    assert _equal(store.load("scaffold", 4), _arrays(3))


def test_versions_ahead_of_the_round_being_written_are_stale_and_dropped(store):
    for rnd in (4, 5, 6):
        store.save("scaffold", rnd, _arrays(rnd))
    assert store.versions("scaffold") == [5, 6]
    store.save("scaffold", 5, _arrays(50))  # a run resumed further back rewrites round 5
    assert store.versions("scaffold") == [5]  # round 6 came from the abandoned future
    assert _equal(store.load("scaffold", 6), _arrays(50))


def test_items_are_independent(store):
    store.save("scaffold", 1, _arrays(1))
    store.save("local-layers", 1, _arrays(9))
    assert _equal(store.load("scaffold", 2), _arrays(1))
    assert _equal(store.load("local-layers", 2), _arrays(9))


def test_names_are_checked(store):
    with pytest.raises(ValueError, match="lower-case"):
        store.save("../evil", 1, _arrays(1))


def test_files_are_safetensors_of_mode_0600_one_per_version(tmp_path):
    store = ClientState(tmp_path / "s")
    store.save("scaffold", 12, _arrays(1))
    (path,) = (tmp_path / "s").iterdir()
    assert path.name == "scaffold.r00000012.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b'"0.weight"' in raw[8 : 8 + header]  # a JSON header


def test_loading_never_unpickles(tmp_path, monkeypatch):
    store = ClientState(tmp_path / "s")
    store.save("scaffold", 1, _arrays(1))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert _equal(store.load("scaffold", 2), _arrays(1))


def test_a_crash_half_way_through_a_write_leaves_the_previous_versions(tmp_path):
    """A real process dies (os._exit) in the middle of writing round 3's version."""
    directory = tmp_path / "s"
    store = ClientState(directory)
    store.save("scaffold", 1, _arrays(1))
    store.save("scaffold", 2, _arrays(2))
    script = textwrap.dedent(
        f"""
        import functools, os, numpy as np
        import fedcore.clientside.state as state
        from fedcore.storage.files import atomic_write
        state.atomic_write = functools.partial(atomic_write, midway=lambda: os._exit(3))
        state.ClientState({str(directory)!r}).save(
            "scaffold", 3, {{"0.weight": np.zeros((2, 3)), "0.bias": np.zeros(3, np.float32),
                            "steps": np.array(0)}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert proc.returncode == 3, proc.stderr.decode()
    leftovers = [f for f in os.listdir(directory) if f.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".scaffold.r")
    # The half-written version does not exist; round 3 re-runs from round 2's state.
    assert store.versions("scaffold") == [1, 2]
    assert _equal(store.load("scaffold", 3), _arrays(2))
    store.save("scaffold", 3, _arrays(3))  # the re-run writes it and sweeps the leftover
    assert sorted(os.listdir(directory)) == [
        "scaffold.r00000002.safetensors",
        "scaffold.r00000003.safetensors",
    ]


def test_the_node_config_chooses_the_backend(tmp_path):
    def context(node_config):
        return Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
        )

    on_disk = ClientState.of(context({STATE_DIR: str(tmp_path / "c0"), "partition-id": 0}))
    on_disk.save("scaffold", 1, _arrays(1))
    assert (tmp_path / "c0" / "scaffold.r00000001.safetensors").exists()

    ctx = context({"partition-id": 0})
    in_memory = ClientState.of(ctx)
    in_memory.save("scaffold", 1, _arrays(1))
    assert list(ctx.state.array_records.keys()) == ["fedcore.scaffold.r1"]
    assert _equal(ClientState.of(ctx).load("scaffold", 2), _arrays(1))
