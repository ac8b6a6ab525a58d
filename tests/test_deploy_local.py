"""`fedcore deploy-local`: carving client files, and stopping everything on a signal."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedcore.clientside.data import holdout, simulation_split
from fedcore.core.config import config_from_dict, to_toml
from fedcore.deploy.local import _deploy_config, carve
from tests.procs import procs_mentioning as _procs_mentioning
from tests.procs import stop


def _cfg(**run: object) -> object:
    return config_from_dict(
        {
            "run": {"seed": 5, "rounds": 2, "clients": 3, "centralized-baseline": False, **run},
            "data": {"source": "synthetic", "synthetic-examples": 300, "partition": "dirichlet"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 16}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
        }
    )


def test_carve_writes_the_simulation_partitions(tmp_path: Path) -> None:
    cfg = _cfg()
    paths = carve(cfg, tmp_path)
    split = simulation_split(cfg.data, seed=5, num_clients=3)
    assert [p.name for p in paths] == ["client-1.npz", "client-2.npz", "client-3.npz"]
    for path, idx in zip(paths, split.parts, strict=True):
        with np.load(path, allow_pickle=False) as f:
            np.testing.assert_array_equal(f["x"], split.train.x[idx])
            np.testing.assert_array_equal(f["y"], split.train.y[idx])
    _, test = holdout(cfg.data, seed=5)
    assert sum(len(p) for p in split.parts) + len(test) == 300  # the server keeps the test split


def test_deploy_config_fixes_clients_classes_and_run_dir(tmp_path: Path) -> None:
    # one client: only the plain exchange (secure aggregation needs >= 3 clients)
    cfg = _deploy_config(
        _cfg().replace(secagg={"enabled": False}), clients=1, rounds=4, run_dir=tmp_path / "run"
    )
    assert cfg.run.clients == 1 and cfg.run.rounds == 4
    assert cfg.round.min_available_clients == 1 and cfg.strategy.min_train_clients == 1
    assert cfg.data.num_classes == 10  # a client's file may lack a class; the count is fixed
    assert cfg.deploy.run_dir == str(tmp_path / "run")


USER_MODELS_PY = """\
import math

import torch.nn as nn


def make_model(input_shape, num_classes, hidden=16):
    inputs = int(math.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )
"""


@pytest.mark.slow
def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    """SIGTERM stops every process; the run also shows that a user's model module beside
    the config is found by the server and every client, started from another directory
    (issue 10: deploy-local could not import what simulate accepted)."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "mymodels.py").write_text(USER_MODELS_PY)
    cfg_path = project / "config.toml"
    # 2 clients: the plain exchange (secure aggregation needs >= 3)
    cfg = _cfg(rounds=200).replace(
        secagg={"enabled": False}, model={"factory": "mymodels:make_model"}
    )
    cfg_path.write_text(to_toml(cfg))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcore.cli",
            "deploy-local",
            "--clients",
            "2",
            "--out",
            str(run_dir),
            str(cfg_path),
        ],
        cwd=elsewhere,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tmp = str(run_dir)
    try:
        first = proc.stdout.readline().decode()  # type: ignore[union-attr]
        found = re.search(r"logs in (\S+)", first)
        assert found, first
        tmp = found.group(1)
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.json").is_file():
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no round finished"
            time.sleep(0.3)
        assert len(_procs_mentioning(tmp)) >= 4  # server, SuperLink, ServerApp/SuperExec, clients
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode != 0
        time.sleep(1)
        assert _procs_mentioning(tmp) == [], out
        rows = json.loads((run_dir / "metrics.json").read_text())
        assert 0 < len(rows) < 200 and rows[0]["clients"] == 2, rows  # the user's model trained
    finally:
        stop([proc], tmp)
    assert not Path(tmp).exists()  # an interrupted run leaves no key material behind
    shutil.rmtree(tmp, ignore_errors=True)
