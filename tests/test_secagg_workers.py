"""Quick suite: one secure round of the real apps on real worker processes equals plain FedAvg.

The embedded engine with two executors runs half the clients in a forked worker
process, so their adverts, shares and masked updates cross a process boundary as
Flower protobuf bytes. The secure model must equal the plain run's within the bound
docs/security.md states: ``n * C / (2^(b-1) * N)`` per coordinate, plus half a float32
ulp on each side when the mean is cast back.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file

from fedcore.clientside.handlers import local_data
from fedcore.core.config import config_from_dict, to_flat
from fedcore.engines.embedded import run_embedded

CLIENTS = 4


def _config(secagg: bool):
    return config_from_dict(
        {
            "run": {"seed": 3, "rounds": 1, "clients": CLIENTS, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 400, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 32}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            "engine": {"workers": 2},
            "secagg": {"enabled": secagg},
        }
    )


def _run(tmp_path, name, secagg):
    from server.app import app as server_app

    cfg = _config(secagg)
    run_dir = tmp_path / name
    run_embedded(
        server_app,
        client_app="clients.app:app",
        run_config=to_flat(cfg),
        num_clients=CLIENTS,
        workers=cfg.engine.workers,
        server_node_config={"run-dir": str(run_dir)},
    )
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    return cfg, dict(zip(header, row, strict=True)), load_file(str(run_dir / "model.safetensors"))


def test_one_secure_round_on_worker_processes_equals_the_plain_round(tmp_path):
    cfg, secure_row, secure = _run(tmp_path, "secure", True)
    _, plain_row, plain = _run(tmp_path, "plain", False)
    assert int(secure_row["clients"]) == int(plain_row["clients"]) == CLIENTS
    assert int(secure_row["dropped"]) == 0
    total = sum(
        len(local_data(cfg, {"partition-id": p, "num-partitions": CLIENTS}).train)
        for p in range(CLIENTS)
    )
    bound = CLIENTS * cfg.secagg.clip / (2 ** (cfg.secagg.bits - 1) * total)
    assert secure.keys() == plain.keys()
    worst = 0.0
    for name, a in secure.items():
        b = plain[name].astype(np.float64)
        a = a.astype(np.float64)
        ulp = 2.0**-24 * (np.abs(a) + np.abs(b))  # half a float32 ulp on each side
        excess = np.abs(a - b) - (bound + ulp)
        assert excess.max() < 0, (name, float(np.abs(a - b).max()), bound)
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst > 0  # the secure sum was quantized: it is not the plain run's model
    # metrics: the same bound with M = 64 in place of C
    metric_bound = CLIENTS * 64 / (2 ** (cfg.secagg.bits - 1) * total)
    for key in ("train_loss", "val_loss", "val_accuracy"):  # evaluation is secure too
        assert abs(float(secure_row[key]) - float(plain_row[key])) < metric_bound, key
