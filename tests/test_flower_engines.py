"""The unchanged fedcore apps under Flower's simulation engine (Ray), through ``flwr run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcore.engines.flower_sim import run_flower_simulation
from fedcore.storage.configfile import load_config
from fedcore.storage.files import arrays_from_safetensors

ROOT = Path(__file__).resolve().parent.parent


def _home_flwr_state() -> tuple[bool, float]:
    home = Path.home() / ".flwr"
    return home.exists(), home.stat().st_mtime if home.exists() else 0.0


@pytest.mark.slow
def test_flwr_run_runs_the_fedcore_apps_on_ray_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "runs"
    flwr_home = tmp_path / "flwr-home"
    user_flwr_before = _home_flwr_state()

    result = run_flower_simulation(
        ROOT,
        run_config={
            "run.rounds": 2,
            "run.clients": 3,
            "run.out-dir": str(out),
            "data.source": "synthetic",
            "data.synthetic-examples": 300,
            "model.factory": "mlp",
            "train.local-epochs": 1,
        },
        num_supernodes=3,
        flwr_home=flwr_home,
        timeout=420,
    )

    assert result.completed, f"status {result.status}\n{result.output[-3000:]}"
    commands = [p.command for p in result.processes]
    # Flower's simulation runtime ran it, with Ray (not fedcore's embedded engine)
    assert any("flwr-simulation" in c for c in commands), commands
    assert any("raylet" in c for c in commands), commands

    # the fedcore ServerApp wrote exactly one run directory, with both rounds
    (run_dir,) = list(out.iterdir())
    for name in ("config.toml", "metrics.csv", "metrics.json", "model.safetensors", "plot.png"):
        assert (run_dir / name).is_file(), name
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 3 and r["dropped"] == 0 for r in rows), rows
    cfg = load_config(run_dir / "config.toml")  # the run config the apps received
    assert (cfg.run.rounds, cfg.data.source, cfg.model.factory) == (2, "synthetic", "mlp")
    assert cfg.secagg.enabled and cfg.secagg.evaluate  # both rounds were secure aggregations
    assert arrays_from_safetensors((run_dir / "model.safetensors").read_bytes())

    # isolated: Flower's state went to the private FLWR_HOME, not ~/.flwr
    assert (flwr_home / "config.toml").is_file()
    assert any((flwr_home / "apps").iterdir())
    assert _home_flwr_state() == user_flwr_before

    # every process the run started is gone, and none had to be killed
    assert result.leftovers == ()
    assert [p for p in result.processes if p.running()] == []
