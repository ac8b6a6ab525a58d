"""Deployment diagnostics: thin dropout margins, why clients were dropped, data that does not fit.

- :func:`dropout_margin_warnings` names the keys and the fix for each setting under
  which one dropout voids (or stalls) every round;
- :func:`mismatch` says what the server's model expects of a client's data;
- a secure round whose failures leave too few clients ends at once (real SecAgg+
  over the embedded engine's worker processes, a fault-injecting ClientApp);
- a real deployment (``fedcore server`` + three ``fedcore client`` processes over TLS)
  where one client's file has 64 features for a 30-feature model: the client exits 2
  with the reason and no traceback, the server prints the warning, its test-set size
  and the drop (kit name, stage, reason), and the other two train.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedcore.clientside.preflight import mismatch
from fedcore.core.config import config_from_dict, to_flat, to_toml
from fedcore.runtime.diagnostics import DROPPED_FILE, dropout_margin_warnings

CLI = [sys.executable, "-m", "fedcore.cli"]


def _cfg(clients: int, **sections: dict) -> object:
    return config_from_dict({"run": {"clients": clients}, **sections})


# ----------------------------------------------------------------- dropout margins
def test_no_warning_when_one_dropout_leaves_every_round_possible():
    assert dropout_margin_warnings(_cfg(4), 4) == []  # 4 clients: k = 3, t = 2
    plain = {"secagg": {"enabled": False}}
    assert dropout_margin_warnings(_cfg(3, **plain), 3) == []
    assert dropout_margin_warnings(_cfg(3), 0) == []


def test_min_available_equal_to_the_clients_is_named_with_the_fix():
    (w,) = dropout_margin_warnings(
        _cfg(5, round={"min-available-clients": 5}, secagg={"enabled": False}), 5
    )
    assert "round.min-available-clients = 5 with 5 client(s)" in w
    assert "set round.min-available-clients = 4" in w


def test_min_train_replies_equal_to_the_sample_is_named_with_the_fix():
    cfg = _cfg(
        6,
        round={"min-train-replies": 3},
        strategy={"fraction-train": 0.5, "min-train-clients": 2},
        secagg={"enabled": False},
    )
    (w,) = dropout_margin_warnings(cfg, 6)
    assert "round.min-train-replies = 3" in w and "samples 3 client(s)" in w
    assert "strategy.fraction-train = 0.5" in w and "set round.min-train-replies = 2" in w
    assert dropout_margin_warnings(cfg.replace(round={"min-train-replies": 2}), 6) == []


def test_secure_aggregation_with_three_clients_or_threshold_equal_to_neighbours():
    (w,) = dropout_margin_warnings(_cfg(3), 3)
    assert "secure aggregation over 3 client(s)" in w and "k = 2" in w and "t = 2" in w
    assert "secagg.threshold" in w and "enabled = false" in w
    cfg = _cfg(6, secagg={"neighbours": 4, "threshold": 4})
    (w,) = dropout_margin_warnings(cfg, 6)
    assert "k = 4" in w and "t = 4" in w and "secagg.neighbours = 4" in w
    assert dropout_margin_warnings(cfg.replace(secagg={"threshold": 3}), 6) == []


# ----------------------------------------------------------------- model vs data
def test_mismatch_names_features_classes_or_architecture():
    local = {"1.weight": (16, 64), "1.bias": (16,), "3.weight": (10, 16), "3.bias": (10,)}
    assert mismatch(dict(local), local, input_shape=(64,), num_classes=10) == ""
    server = {**local, "1.weight": (16, 30)}
    why = mismatch(server, local, input_shape=(64,), num_classes=10)
    assert "takes 30 input feature(s)" in why and "this data has 64" in why
    assert "'1.weight' is [16, 30] there, [16, 64] here" in why
    server = {**local, "3.weight": (3, 16), "3.bias": (3,)}
    why = mismatch(server, local, input_shape=(64,), num_classes=10)
    assert "has 3 output class(es), this client's data has 10" in why
    why = mismatch({"0.weight": (2, 2)}, local, input_shape=(64,), num_classes=10)
    assert "different model architecture" in why and "'0.weight'" in why


# ----------------------------------------------------------------- secure round ends early
def test_a_secure_round_whose_failures_leave_too_few_clients_ends_at_once(caplog):
    from fedcore.clientside.data import holdout
    from fedcore.core.records import model_to_arrays
    from fedcore.engines.embedded import node_id_for
    from fedcore.runtime.serve import initial_model
    from fedcore.secagg.exchange import SecAggSettings, SecureExchange
    from fedcore.secagg.protocol.machine import STAGE_MASKED
    from fedcore.serverside.rounds import Observer
    from fedcore.serverside.strategies import FedAvg

    from .exchanges import train_step
    from .test_secagg_engine import FaultGrid

    cfg = config_from_dict(
        {
            "run": {"seed": 7, "clients": 4, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 200, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
        }
    )
    _, test = holdout(cfg.data, seed=cfg.run.seed)
    arrays = model_to_arrays(initial_model(cfg, test))
    nodes = [node_id_for(p) for p in range(4)]
    grid = FaultGrid(
        client_app="tests.apps.secagg_faults:app",
        run_config=to_flat(cfg),
        num_clients=4,
        workers=2,  # client 3 (executor 1, a process) stalls; closing the grid kills it
    )
    try:
        # replies come in push order: clients 0 and 1 fail at once, client 3 stalls for
        # 90 s; after the second failure at most 2 clients could answer, and SecAgg+
        # needs 3 masked inputs: waiting for client 3 cannot help
        grid.faults = {
            (STAGE_MASKED, nodes[0]): "raise",
            (STAGE_MASKED, nodes[1]): "raise",
            (STAGE_MASKED, nodes[3]): "sleep:90",
        }
        exchange = SecureExchange(SecAggSettings(stage_timeout=120.0), seed=cfg.run.seed)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="fedcore"):
            result = train_step(
                exchange,
                grid,
                FedAvg(seed=cfg.run.seed),
                server_round=1,
                arrays=arrays,
                config=ConfigRecord({"lr": 0.1, "local-epochs": 1, "batch-size": 16}),
                node_ids=nodes,
                timeout=120.0,
                observer=Observer(),
            )
        elapsed = time.monotonic() - t0
    finally:
        grid.close(timeout=2.0)
    agg = result.aggregate if hasattr(result, "aggregate") else result[0]
    assert agg.update is None  # the attempt failed, the previous model is kept
    reasons = {(r.node_id, r.stage): r.reason for r in agg.rejected}
    assert "injected fault" in reasons[(nodes[0], STAGE_MASKED)]
    assert "injected fault" in reasons[(nodes[1], STAGE_MASKED)]
    assert not any("no reply within" in r.reason for r in agg.rejected)  # nobody waited out
    (line,) = [r.getMessage() for r in caplog.records if "ending this attempt now" in r.message]
    assert "2 of 4 client(s) failed" in line and "at least 3 are needed" in line
    assert elapsed < 60, elapsed  # the stalled client alone would take 90 s


# ----------------------------------------------------------------- a real deployment
def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")
def test_a_client_with_the_wrong_features_is_named_and_the_others_train(tmp_path: Path):
    from fedcore.deploy.local import carve
    from fedcore.deploy.provision import provision
    from fedcore.engines.processes import free_port

    from .procs import stop

    cfg = config_from_dict(
        {
            "run": {"seed": 3, "rounds": 1, "clients": 3, "centralized-baseline": False},
            "data": {
                "source": "synthetic",
                "synthetic-examples": 240,
                "synthetic-features": 30,
                "partition": "iid",
                "num-classes": 10,
            },
            "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            "strategy": {"min-train-clients": 2, "min-evaluate-clients": 2},
            # every client must be connected before the round: warned about at start
            "round": {"min-available-clients": 3, "timeout": 120.0},
            "secagg": {"enabled": False},  # the clients' config too: they answer plain rounds
        }
    )
    fed = provision(tmp_path / "fed", clients=3)
    data = carve(cfg, tmp_path / "data")
    bad = tmp_path / "data" / "site3.npz"
    rng = np.random.default_rng(0)
    np.savez(bad, x=rng.normal(size=(60, 64)).astype(np.float32), y=np.arange(60) % 10)
    config = tmp_path / "config.toml"
    config.write_text(to_toml(cfg))
    port = free_port()
    logs: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> None:
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as f:
            procs[name] = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    try:
        start(
            "server",
            [
                *CLI,
                "server",
                "--kit",
                str(fed.server_kit),
                "--address",
                f"127.0.0.1:{port}",
                "--local-port",
                str(free_port()),
                "--state-dir",
                str(tmp_path / "state"),
                "--out",
                str(tmp_path / "run"),
                str(config),
            ],
        )
        for name, path in (("client-1", data[0]), ("client-2", data[1]), ("client-3", bad)):
            start(
                name,
                [
                    *CLI,
                    "client",
                    *("--kit", str(fed.client_kit(name)), "--server", f"127.0.0.1:{port}"),
                    *("--data", str(path), "--config", str(config), "--once"),
                    *("--connect-timeout", "120"),
                ],
            )
        server_rc = _wait(procs["server"], 300)
        rcs = {n: _wait(p, 60) for n, p in procs.items() if n != "server"}
    finally:
        stop(list(procs.values()), str(tmp_path))
    out = {n: p.read_text(errors="replace") for n, p in logs.items()}
    explain = "\n".join(f"--- {n}\n{t[-3000:]}" for n, t in out.items())

    # the client: exit 2, one clear message naming its file, its shape and the model's
    assert rcs["client-3"] == 2, explain
    bad_out = out["client-3"]
    assert "Traceback" not in bad_out, explain
    assert "does not fit the server's model" in bad_out and str(bad) in bad_out, explain
    assert "takes 30 input feature(s)" in bad_out and "this data has 64" in bad_out
    assert "of shape (64,)" in bad_out and "Fix:" in bad_out
    # the server: its test set, the warning, and who was dropped, where and why
    server_out = out["server"]
    assert server_rc == 0 and rcs["client-1"] == 0 and rcs["client-2"] == 0, explain
    assert "evaluates the global model on 48 of the 240 example(s)" in server_out
    assert "data.test-fraction = 0.2" in server_out
    assert "WARNING: round.min-available-clients = 3 with 3 client(s)" in server_out
    # (client-3 left after answering; federated evaluation then finds it gone)
    drop, *_ = [line for line in server_out.splitlines() if " dropped " in line]
    assert "round 1: dropped client-3 (node " in drop and " at train: " in drop, drop
    assert "takes 30 input feature(s)" in drop, drop
    entries = json.loads((tmp_path / "run" / DROPPED_FILE).read_text())
    assert (entries[0]["round"], entries[0]["client"], entries[0]["stage"]) == (
        1,
        drop.split("dropped ")[1].split(" at ")[0],
        "train",
    )
    assert not any(e["client"].startswith(("client-1", "client-2")) for e in entries)
    (row,) = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert row["clients"] == 2


# ----------------------------------------------------------------- the drop log
def test_drops_are_logged_once_per_reason_with_names_and_kept_in_dropped_json(tmp_path, caplog):
    from fedcore.core.records import Rejection
    from fedcore.deploy.provision import provision
    from fedcore.runtime.diagnostics import DropReporter, client_names, read_dropped
    from fedcore.storage.keys import load_identity_key

    fed = provision(tmp_path / "fed", clients=["site-a", "site-b"])
    keys = {
        7: load_identity_key(fed.client_kit("site-a") / "identity.key").public_key(),
        9: load_identity_key(fed.client_kit("site-b") / "identity.key").public_key(),
    }
    admitted = fed.server_kit / "admitted.json"
    assert client_names(keys, admitted) == {7: "site-a", 9: "site-b"}
    assert client_names(keys, tmp_path / "missing.json") == {}  # no names, node ids shown

    reporter = DropReporter(tmp_path, lambda: client_names(keys, admitted))

    def finish(rnd, rejected):  # the reporter reads only the record's round
        reporter.round_finished(SimpleNamespace(round=rnd), None, rejected)

    boom = "client error: ValueError: boom\nTraceback (most recent call last): ..."
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        reporter.stage_started(1, "train", 3)
        finish(1, [Rejection(7, "secagg-masked", boom), Rejection(9, "secagg-masked", boom)])
        finish(2, [Rejection(12, "train", boom)])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "round 1: dropped site-a (node 7), site-b (node 9) at SecAgg+ masked-input stage "
        "(training or evaluation): client error: ValueError: boom",
        "round 2: dropped node 12 at train: the same reason as in round 1",
    ]
    entries = read_dropped(tmp_path)
    assert [(e["round"], e["client"], e["stage"]) for e in entries] == [
        (1, "site-a (node 7)", "SecAgg+ masked-input stage (training or evaluation)"),
        (1, "site-b (node 9)", "SecAgg+ masked-input stage (training or evaluation)"),
        (2, "node 12", "train"),
    ]
    assert {e["reason"] for e in entries} == {"client error: ValueError: boom"}
