"""The unchanged fedcore apps on a two-node Ray cluster (docs/engines.md, multi-node Ray).

A head and a worker node, each a ``ray start --block`` with its own loopback address,
ports and temp dir, run the ClientApps of one ``flwr run``; the final model matches the
same run on the embedded engine.

``python -m tests.test_ray_cluster cluster|local [secure]`` times the same run (on the
cluster, or on Flower's single-node Ray) and prints one JSON line: the figures in
docs/engines.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from fedcore.engines.flower_sim import RayCluster, run_flower_simulation
from fedcore.storage.files import arrays_from_safetensors

ROOT = Path(__file__).resolve().parent.parent

# 4 clients, 2 rounds, the MLP on synthetic data: small enough for 2 cores.
# Plain rounds: with secure aggregation on, each client's stochastic rounding is keyed by
# its node id, which Flower draws afresh every run (see docs/engines.md).
RUN = {
    "run.rounds": 2,
    "run.clients": 4,
    "run.centralized-baseline": False,
    "data.source": "synthetic",
    "data.synthetic-examples": 300,
    "model.factory": "mlp",
    "train.local-epochs": 1,
    "secagg.enabled": False,
}


def _model(run_dir: Path) -> dict[str, np.ndarray]:
    record = arrays_from_safetensors((run_dir / "model.safetensors").read_bytes())
    return {name: array.numpy() for name, array in record.items()}


def _embedded_run(out: Path, keys: Mapping[str, object] | None = None) -> Path:
    """The same run on fedcore's embedded engine (no Ray), as a user would start it."""
    items = (keys or RUN).items()
    sets = [arg for key, value in items for arg in ("--set", f"{key}={json.dumps(value)}")]
    subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", "--quiet", "--out", str(out), *sets],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    return out


@pytest.mark.slow
def test_the_fedcore_apps_run_on_a_head_and_a_worker_node_and_match_the_embedded_engine(
    tmp_path: Path,
) -> None:
    out = tmp_path / "runs"
    with RayCluster(workers=1, cpus_per_node=1) as cluster:
        result = run_flower_simulation(
            ROOT,
            run_config={**RUN, "run.out-dir": str(out)},
            num_supernodes=4,
            ray_address=cluster.address,
            flwr_home=tmp_path / "flwr-home",
            timeout=300,
        )
        actors = {node.name: node.actors() for node in cluster.nodes}  # before the logs go
        # each node ran a raylet of its own: its session's raylet log (sampling the process
        # tree every 0.2 s could miss a raylet, and did once under CI load)
        raylet_logs = {
            node.name: sum(1 for _ in node.temp_dir.glob("session_2*/logs/raylet.out"))
            for node in cluster.nodes
        }
        killed = cluster.stop()

    assert result.completed, f"status {result.status}\n{result.output[-3000:]}"
    # ClientApp actors ran on both nodes (each node's own worker logs name them)
    assert actors == {"head": 1, "worker-1": 1}, actors  # one per CPU: 1 CPU a node
    # the run joined the cluster: Flower started no Ray of its own
    assert not any("raylet" in p.command for p in result.processes), result.processes
    assert raylet_logs == {"head": 1, "worker-1": 1}, raylet_logs

    (run_dir,) = list(out.iterdir())
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [(r["round"], r["clients"], r["dropped"]) for r in rows] == [(1, 4, 0), (2, 4, 0)]

    # the same model as the embedded engine's, up to float32 summation order: the server
    # averages replies as they arrive, and Ray's arrival order is not the embedded
    # engine's push order (measured max |difference| 6e-8)
    reference = _model(_embedded_run(tmp_path / "embedded"))
    model = _model(run_dir)
    assert sorted(model) == sorted(reference)
    for name, weights in model.items():
        np.testing.assert_allclose(weights, reference[name], rtol=0, atol=1e-6, err_msg=name)

    # both nodes stopped on SIGTERM, nothing had to be killed, no process is left
    assert killed == [] and result.leftovers == ()
    assert [p for p in cluster.tree.seen() if p.running()] == []
    assert [p for p in result.processes if p.running()] == []


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _measure(mode: str, *, secure: bool = False) -> dict[str, object]:
    """One timed run, ``mode`` "cluster" (head + worker node) or "local" (Flower's own Ray)."""
    tmp = Path(tempfile.mkdtemp(prefix="fedcore-ray-cluster-"))
    res: dict[str, object] = {"mode": mode, "secure": secure, "load_before": _load()}
    keys = {**RUN, "secagg.enabled": secure}
    run_config = {**keys, "run.out-dir": str(tmp / "runs")}
    t0 = time.perf_counter()
    if mode == "cluster":
        with RayCluster(workers=1, cpus_per_node=1) as cluster:
            res["cluster_start_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            result = run_flower_simulation(
                ROOT, run_config=run_config, num_supernodes=4, ray_address=cluster.address
            )
            res["flwr_run_s"] = time.perf_counter() - t1
            res["actors"] = {node.name: node.actors() for node in cluster.nodes}
            t2 = time.perf_counter()
            res["killed"] = cluster.stop()
            res["stop_s"] = time.perf_counter() - t2
            res["cluster_peak_rss_mb"] = cluster.tree.peak.rss / 2**20
    else:
        result = run_flower_simulation(ROOT, run_config=run_config, num_supernodes=4)
        res["flwr_run_s"] = time.perf_counter() - t0
    res["status"] = result.status
    res["run_peak_rss_mb"] = result.peak.rss / 2**20
    t3 = time.perf_counter()
    reference = _model(_embedded_run(tmp / "embedded", keys))
    res["embedded_s"] = time.perf_counter() - t3
    (run_dir,) = list((tmp / "runs").iterdir())
    model = _model(run_dir)
    res["identical_to_embedded"] = all(np.array_equal(model[k], reference[k]) for k in model)
    res["max_abs_diff"] = max(float(np.max(np.abs(model[k] - reference[k]))) for k in model)
    res["load_after"] = _load()
    shutil.rmtree(tmp, ignore_errors=True)
    return res


if __name__ == "__main__":  # python -m tests.test_ray_cluster cluster|local [secure]
    figures = _measure(sys.argv[1] if len(sys.argv) > 1 else "cluster", secure="secure" in sys.argv)
    print(
        json.dumps(
            {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in figures.items()}
        )
    )
