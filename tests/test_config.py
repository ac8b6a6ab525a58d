"""Config validation: every bad value stops with the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from fedcore.core.config import Config, config_from_dict, config_from_flat, to_flat, to_toml
from fedcore.core.errors import ConfigError
from fedcore.storage.configfile import load_config

from .conftest import ROOT


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"run": {"roundz": 3}}, "run.roundz", "unknown key"),
        ({"colour": {}}, "colour", "unknown section"),
        ({"run": {"rounds": "3"}}, "run.rounds", "must be an integer"),
        ({"run": {"rounds": 2.5}}, "run.rounds", "must be an integer"),
        ({"run": {"rounds": True}}, "run.rounds", "must be an integer"),
        ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
        ({"data": {"alpha": 0}}, "data.alpha", "must be > 0"),
        ({"data": {"alpha": -1.5}}, "data.alpha", "must be > 0"),
        ({"data": {"partition": "random"}}, "data.partition", "iid, dirichlet, shards"),
        ({"data": {"source": "file"}}, "data.path", "needs data.path"),
        ({"data": {"test-fraction": 1.0}}, "data.test-fraction", "between 0 and 1"),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer", "sgd, adam"),
        ({"strategy": {"fraction-train": 1.5}}, "strategy.fraction-train", "[0, 1]"),
        (
            {"run": {"clients": 3}, "round": {"min-available-clients": 5}},
            "round.min-available-clients",
            "<= run.clients",
        ),
        ({"model": {"kwargs": {"hidden": [1, 2]}}}, "model.kwargs.hidden", "booleans, numbers"),
        ({"model": {"train-fn": "no_colon"}}, "model.train-fn", "import path"),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, key, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert key in str(info.value)


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.run.rounds = 5  # type: ignore[misc]


def test_flat_and_toml_round_trip():
    cfg = config_from_dict(
        {"run": {"seed": 3}, "model": {"factory": "mlp", "kwargs": {"hidden": 16, "depth": 1}}}
    )
    assert config_from_flat(to_flat(cfg)) == cfg
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg
    assert to_flat(cfg)["model.kwargs.hidden"] == 16
    assert hash(cfg) == hash(config_from_flat(to_flat(cfg)))


def test_default_toml_loads_and_matches_issue_defaults():
    cfg = load_config(ROOT / "simulations" / "default.toml")
    assert (cfg.data.source, cfg.model.factory, cfg.run.clients) == ("digits", "cnn", 10)
    assert (cfg.data.partition, cfg.data.alpha, cfg.run.rounds) == ("dirichlet", 0.5, 20)


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def _simulate(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[data]\nalpha = 0.0\n", "data.alpha"),
        ("[run]\nclients = 5000\n", "run.clients"),
        ('[model]\nfactory = "nosuchpkg.nets:make"\n', "model.factory"),
        ('[model]\nfactory = "tests.apps.badmodels:wrong_classes"\n', "model.factory"),
        ("[run]\nroundz = 1\n", "run.roundz"),
    ],
)
def test_cli_stops_before_training_with_one_message(tmp_path, toml, key):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    proc = _simulate(str(cfg), "--out", str(tmp_path / "run"), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedcore: error:")]
    assert len(lines) == 1 and f"'{key}'" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_every_shipped_simulation_config_is_valid():
    for path in (ROOT / "simulations").glob("*.toml"):
        load_config(path)
