"""SIGKILL at ten points (named crash points, and at random times), then resume: the
model and metrics equal the uninterrupted run's.

In its own file so that ``pytest -n 2 --dist loadfile`` can run it beside the rest of
``tests/test_fault_tolerance.py`` (both are among the suite's longest).
"""

from __future__ import annotations

import json
import random
import time

import pytest

from fedcore.serverside.checkpoint import load_checkpoint

from .test_fault_tolerance import KILL_CONFIG_PLAIN, _cli, _run_to_completion


@pytest.mark.slow
def test_sigkill_at_ten_points_then_resume_gives_the_uninterrupted_model(tmp_path):
    cfg_path = tmp_path / "kill.toml"
    cfg_path.write_text(KILL_CONFIG_PLAIN)
    ref = tmp_path / "reference"
    t0 = time.monotonic()
    proc = _cli(str(cfg_path), "--out", str(ref))
    _, err = proc.communicate(timeout=180)
    duration = time.monotonic() - t0
    assert proc.returncode == 0, err
    reference = (ref / "model.safetensors").read_bytes()
    ref_rows = json.loads((ref / "metrics.json").read_text())

    # named crash points (including half-way through a checkpoint write) ...
    points = [
        {"FEDCORE_CRASH_AT": "checkpoint-partial:1"},
        {"FEDCORE_CRASH_AT": "checkpoint-partial:4"},
        {"FEDCORE_CRASH_AT": "checkpoint-partial:6"},
        {"FEDCORE_CRASH_AT": "checkpoint-written:2"},
        {"FEDCORE_CRASH_AT": "checkpoint-written:6"},  # the last round: nothing re-runs it
        {"FEDCORE_CRASH_AT": "before-checkpoint:1"},
        {"FEDCORE_CRASH_AT": "before-checkpoint:3"},
        {"FEDCORE_CRASH_AT": "after-metrics:5"},
    ]
    # ... and SIGKILL of the whole process group at seeded random times within the
    # reference run's duration (so they hit start-up, rounds and writes alike)
    rng = random.Random(1234)
    timers = [rng.uniform(0.1, 0.8) * duration for _ in range(4)]
    cases = [(p, None) for p in points] + [(None, t) for t in timers]
    killed = {"point": 0, "timer": 0}
    for i, (env, delay) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        died = _run_to_completion(cfg_path, run_dir, first_env=env, kill_after=delay)
        killed["point" if env else "timer"] += died
        assert (run_dir / "model.safetensors").read_bytes() == reference, (
            f"case {i}: {env or delay}"
        )
        rows = json.loads((run_dir / "metrics.json").read_text())
        strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
        assert strip(rows) == strip(ref_rows), f"case {i}"
        assert not list(run_dir.glob(".*.tmp"))
        assert load_checkpoint(run_dir).round == 6
    # every crash point fired; timers race the run, but at least half hit it alive:
    # at least 10 real kills in all
    assert killed["point"] == len(points) and killed["timer"] >= 2, killed
