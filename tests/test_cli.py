"""The ``fedcore`` command line as a user meets it: real ``fedcore`` subprocesses.

- ``fedcore --version``, bare ``fedcore`` (help, exit 0), examples in every ``--help``
  (each ``simulate`` example parses and its config resolves);
- ``--set KEY=VALUE`` (any key, TOML values, "did you mean" for a typo, the flag and
  the text named for a bad value) and ``--quiet``;
- "did you mean" for a key typo in a TOML file; a missing data file names
  ``data.path`` (simulate has no ``--data``);
- a run directory left by a start interrupted before round 1 (killed at the
  ``before-checkpoint:1`` crash point): ``--resume`` starts it from round 1,
  ``--out`` reuses it; a finished one is still refused;
- ``fedcore deploy-local`` imports a user's model beside its config from another
  working directory, and a bad import path fails before any process starts;
- a kit started twice: the second ``fedcore client`` is told "already connected",
  and ``fedcore server --resume`` of a run stopped before round 1 starts it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from fedcore import cli
from fedcore.core.config import config_from_dict, to_toml
from fedcore.core.overrides import apply_sets
from fedcore.runtime.serve import build_strategy
from fedcore.storage.configfile import load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fedcore.cli"]
#: 3 clients, 2 rounds, a 16-unit MLP on digits, plain exchange, one worker: ~1 s a run.
TINY = {
    "run": {"rounds": 2, "clients": 3, "centralized-baseline": False},
    "model": {"factory": "mlp", "kwargs": {"hidden": 16, "depth": 1}},
    "train": {"lr": 0.1},
    "engine": {"workers": 1},
    "secagg": {"enabled": False},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("FEDCORE_CRASH_AT", None)
    return env


def _fedcore(
    *args: str, cwd: Path = ROOT, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or _env(),
    )


def _tiny(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    raw = {k: dict(v) for k, v in TINY.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(config_from_dict(raw)))
    return path


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return list(json.loads((run_dir / "metrics.json").read_text()))


# ------------------------------------------------------------------ version, help, examples
def test_version_names_fedcore_flower_and_torch() -> None:
    from fedcore import __version__

    r = _fedcore("--version")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(f"fedcore {__version__} "), line
    assert f"Flower {version('flwr')}" in line and f"torch {version('torch')}" in line, line


def test_bare_fedcore_prints_help_and_exits_0() -> None:
    r = _fedcore()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: fedcore"), r.stdout
    for command in ("simulate", "provision", "server", "client", "deploy-local"):
        assert command in r.stdout
    assert "examples:" in r.stdout and r.stderr == ""


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _examples(text: str, command: str) -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in text.split("examples:", 1)[1].splitlines()]
    return [ln for ln in lines if ln.startswith(f"fedcore {command}")]


@pytest.mark.parametrize("command", ["simulate", "provision", "server", "client", "deploy-local"])
def test_every_command_help_shows_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(capsys, command)
    examples = _examples(text, command)
    assert 2 <= len(examples) <= 4, text
    parser = cli.build_parser()
    default = load_config(ROOT / "simulations" / "default.toml")
    for example in examples:
        args = parser.parse_args(shlex.split(example)[1:])  # exits 2 on an unknown flag
        apply_sets(default, getattr(args, "set", None) or [])  # --set keys are real keys


def test_each_simulate_example_parses_and_resolves_its_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    examples = _examples(_help(capsys, "simulate"), "simulate")
    assert examples[0] == "fedcore simulate"
    parser = cli.build_parser()
    for example in examples:
        args = parser.parse_args(shlex.split(example)[1:])
        if args.resume:
            assert args.config is None  # the run directory's config is used
            continue
        path = ROOT / args.config if args.config else ROOT / "simulations" / "default.toml"
        cfg = cli._apply_overrides(load_config(path), args)  # --set keys are real keys
        build_strategy(cfg)  # and the strategy accepts its options
        assert cfg.run.rounds == (args.rounds or load_config(path).run.rounds)


# ------------------------------------------------------------------ --set, --quiet, errors
def test_set_changes_any_key_and_quiet_prints_only_the_final_lines(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _fedcore(
        "simulate",
        str(_tiny(tmp_path)),
        "--out",
        str(out),
        "--set",
        "train.lr=0.2",
        "--set",
        "strategy.name=fedprox",
        "--set",
        "strategy.options.proximal-mu=0.01",
        "--set",
        'run.out-dir="elsewhere"',
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    cfg = load_config(out / "config.toml")  # the resolved config of the run
    assert cfg.train.lr == 0.2 and cfg.strategy.name == "fedprox"
    assert dict(cfg.strategy.options) == {"proximal-mu": 0.01} and cfg.run.out_dir == "elsewhere"
    both = r.stdout + r.stderr
    assert not re.search(r"round \d+/\d+", both) and "\r" not in both, both
    assert r.stdout.splitlines()[0].startswith("federated test accuracy"), r.stdout
    assert r.stdout.rstrip().endswith(f"run directory: {out}"), r.stdout
    assert len(_rows(out)) == 2


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.lrr=0.1", "did you mean 'train.lr'?"),
        ("rounds=3", "did you mean 'run.rounds'?"),
        ("trian.lr=0.1", "did you mean 'train'?"),
        ("train.lr=0.1.2", "'--set' has value 'train.lr=0.1.2'"),
        ("train.lr", "'--set' has value 'train.lr': must be KEY=VALUE"),
        ("secagg.enabled=flase", "'secagg.enabled' has value 'flase': must be true or false"),
    ],
)
def test_a_bad_set_stops_with_exit_2_naming_it(
    item: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    rc = cli.main(["simulate", str(_tiny(tmp_path)), "--out", str(out), "--set", item])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not out.exists()


def test_a_key_typo_in_a_config_file_gets_did_you_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(_tiny(tmp_path).read_text().replace("local-epochs", "local-epoch"))
    assert cli.main(["simulate", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'train.local-epoch'" in err and "did you mean 'train.local-epochs'?" in err, err


def test_a_missing_data_file_names_data_path_not_a_client_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _tiny(tmp_path, data={"source": "file", "path": "nowhere.npz"})
    assert cli.main(["simulate", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"config key 'data.path' has value '{tmp_path / 'nowhere.npz'}': no such" in err, err
    assert "--set data.path=FILE" in err and "--data" not in err, err


# ------------------------------------------------------------------ interrupted before round 1
def _interrupted_start(tmp_path: Path, out: Path) -> Path:
    """A real ``fedcore simulate`` killed (SIGKILL) just before round 1's checkpoint."""
    config = _tiny(tmp_path)
    env = {**_env(), "FEDCORE_CRASH_AT": "before-checkpoint:1"}
    r = _fedcore("simulate", str(config), "--out", str(out), "--quiet", env=env)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert (out / "config.toml").is_file() and not (out / "checkpoint.safetensors").exists()
    return config


def test_resume_of_a_run_stopped_before_round_1_starts_it_from_round_1(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _interrupted_start(tmp_path, out)
    r = _fedcore("simulate", "--resume", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"{out} has no checkpoint" in r.stdout and "starting it from round 1" in r.stdout
    assert [int(row["round"]) for row in _rows(out)] == [1, 2]


def test_out_of_a_run_stopped_before_round_1_is_reused_and_a_finished_one_refused(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    config = _interrupted_start(tmp_path, out)
    r = _fedcore("simulate", str(config), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"reusing {out}" in r.stdout, r.stdout
    assert [int(row["round"]) for row in _rows(out)] == [1, 2]
    again = _fedcore("simulate", str(config), "--out", str(out), "--quiet")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr, again.stderr
    assert f"--resume {out}" in again.stderr


# ------------------------------------------------------------------ deploy-local import paths
MODELS_PY = """\
import math

import torch.nn as nn


def make_model(input_shape, num_classes, hidden=16):
    inputs = int(math.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )
"""


def _user_project(tmp_path: Path, **model: str) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text(MODELS_PY)
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["model"] = {"factory": "mymodels:make_model", "kwargs": {"hidden": 16}, **model}
    raw["run"]["rounds"] = 1
    config = project / "config.toml"
    config.write_text(to_toml(config_from_dict(raw)))
    (tmp_path / "elsewhere").mkdir()
    return config


@pytest.mark.parametrize(
    ("key", "path"),
    [("factory", "mymodel:make_model"), ("train-fn", "mymodels:no_such_loop")],
)
def test_deploy_local_refuses_a_bad_import_path_before_any_process(
    key: str, path: str, tmp_path: Path
) -> None:
    config = _user_project(tmp_path, **{key: path})
    t0 = time.monotonic()
    r = _fedcore("deploy-local", str(config), "--clients", "3", cwd=tmp_path / "elsewhere")
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"config key 'model.{key}' has value '{path}'" in r.stderr, r.stderr
    if key == "factory":  # a module not found: where it was looked for
        assert f"looked for in {config.parent} and {tmp_path / 'elsewhere'}" in r.stderr
    assert "fedcore deploy-local:" not in r.stdout  # nothing provisioned, nothing started
    assert elapsed < 5 * 3, elapsed  # < 5 s alone; the suite shares 2 cores


@pytest.mark.slow
def test_deploy_local_imports_a_model_beside_its_config_from_another_cwd(tmp_path: Path) -> None:
    config = _user_project(tmp_path)
    out = tmp_path / "run"
    r = _fedcore(
        "deploy-local",
        str(config),
        "--clients",
        "3",
        "--out",
        str(out),
        "--quiet",
        cwd=tmp_path / "elsewhere",
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    rows = _rows(out)
    assert len(rows) == 1 and int(rows[0]["clients"]) == 3, rows
    assert not re.search(r"round \d+/\d+", r.stdout), r.stdout
