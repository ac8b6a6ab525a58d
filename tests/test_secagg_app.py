"""Secure aggregation wired into the apps: config section, strategy refusal, whole runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedcore.core.config import config_from_dict, config_from_flat, to_flat
from fedcore.core.errors import ConfigError
from fedcore.runtime.serve import build_exchanges, build_strategy
from fedcore.secagg.exchange import SecureExchange
from fedcore.serverside.exchange import PlainExchange
from fedcore.serverside.strategies import FedAvg
from fedcore.storage.configfile import load_config


def test_secagg_is_on_by_default_with_auto_graph():
    cfg = config_from_dict({})
    assert cfg.secagg.enabled and cfg.secagg.neighbours == 0 and cfg.secagg.threshold == 0
    train, evaluate = build_exchanges(cfg)
    assert isinstance(train, SecureExchange) and evaluate is train
    off = cfg.replace(secagg={"enabled": False})
    assert all(isinstance(x, PlainExchange) for x in build_exchanges(off))
    train, evaluate = build_exchanges(cfg.replace(secagg={"evaluate": False}))
    assert isinstance(train, SecureExchange) and isinstance(evaluate, PlainExchange)
    assert config_from_flat(to_flat(cfg)) == cfg
    assert load_config("simulations/default.toml").secagg.enabled


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"neighbours": 1}, "secagg.neighbours"),
        ({"neighbours": 4, "threshold": 5}, "secagg.threshold"),
        ({"neighbours": 6, "threshold": 3}, "secagg.threshold"),  # not a majority
        ({"min-threshold": 1}, "secagg.min-threshold"),
        ({"max-weight": 0}, "secagg.max-weight"),
        ({"clip": 0.0}, "secagg.clip"),
        ({"ring-bits": 48}, "secagg.ring-bits"),
        ({"ring-bits": 32, "bits": 30}, "secagg.bits"),
        ({"stage-timeout": -1.0}, "secagg.stage-timeout"),
        ({"enabled": "yes"}, "secagg.enabled"),
        ({"mask": "aes"}, "secagg.mask"),
    ],
)
def test_bad_secagg_values_name_the_key(values, key):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"secagg": values})
    assert exc.value.key == key


def test_two_clients_with_secagg_on_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 3 clients") as exc:
        config_from_dict({"run": {"clients": 2}, "round": {"min-available-clients": 2}})
    assert exc.value.key == "secagg.enabled"
    config_from_dict({"run": {"clients": 2}, "secagg": {"enabled": False}})


class Median(FedAvg):
    """A user strategy that needs each client's update (test)."""

    linear = False


def test_strategies_that_need_individual_updates_are_refused():
    cfg = config_from_dict({"strategy": {"name": "tests.test_secagg_app:Median"}})
    with pytest.raises(ConfigError, match="individual update") as exc:
        build_strategy(cfg)
    assert exc.value.key == "strategy.name" and "secagg.enabled" in str(exc.value)
    assert isinstance(build_strategy(cfg.replace(secagg={"enabled": False})), Median)
    # and the secure exchange itself refuses to hand it anything
    with pytest.raises(ConfigError, match="individual update"):
        SecureExchange(build_exchanges(cfg)[0].settings).train(
            None, [], server_round=1, arrays=None, individual=True, timeout=1.0, progress=None
        )


def _run(tmp_path, name, secagg: bool):
    from fedcore.engines.embedded import run_embedded
    from server.app import app as server_app

    cfg = config_from_dict(
        {
            "run": {"seed": 3, "rounds": 2, "clients": 4, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 400, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 32}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            "engine": {"workers": 2},
            "secagg": {"enabled": secagg},
        }
    )
    run_dir = tmp_path / name
    run_embedded(
        server_app,
        client_app="clients.app:app",
        run_config=to_flat(cfg),
        num_clients=4,
        workers=2,
        server_node_config={"run-dir": str(run_dir)},
    )
    return run_dir


@pytest.mark.slow
def test_whole_run_with_secagg_matches_the_plain_run(tmp_path):
    secure = _run(tmp_path, "secure", True)
    plain = _run(tmp_path, "plain", False)
    rows = (secure / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[6] == "4"  # 4 clients counted each round
    assert "enabled = true" in (secure / "config.toml").read_text()
    a, b = load_file(str(secure / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert 0 < diff < 1e-5  # same training; only the fixed-point rounding differs
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (secure, plain))
    assert abs(sa["final_test_accuracy"] - sb["final_test_accuracy"]) < 0.01


def test_vector_layout_is_name_order_whatever_the_record_order():
    """A record restored from a checkpoint may list arrays in another order: same layout."""
    from flwr.app import Array, ArrayRecord

    from fedcore.core.aggregation import spec_of
    from fedcore.secagg.exchange import _split
    from fedcore.secagg.handler import _update_pairs
    from fedcore.serverside.strategies import apply_update

    a = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    fwd = ArrayRecord({k: Array(v) for k, v in a.items()})
    rev = ArrayRecord({k: Array(a[k]) for k in reversed(list(a))})
    new = ArrayRecord({k: Array(v + 1) for k, v in a.items()})
    for glob in (fwd, rev):
        pairs = _update_pairs(glob, new)
        assert [p[1].shape for p in pairs] == [(2, 2), (3,)]  # "a" before "b"
    mean = np.concatenate([np.full(4, 0.5), np.full(3, 2.0)])  # a's update, then b's
    for glob in (fwd, rev):
        update = _split(mean, [("", spec_of(glob))])[""]
        out = apply_update(glob, update)
        assert list(out.keys()) == list(glob.keys())
        assert out["a"].numpy().tolist() == [[1.5, 1.5], [1.5, 1.5]]
        assert out["b"].numpy().tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_cli_refuses_a_nonlinear_strategy_under_secure_aggregation(tmp_path, name):
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[strategy]\nname = "{name}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", str(cfg), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedcore: error:")]
    assert len(errors) == 1 and "'strategy.name'" in errors[0] and "secagg.enabled" in errors[0]
    assert "fedavg" in errors[0]  # a compatible strategy is suggested
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
