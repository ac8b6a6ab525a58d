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
from fedcore.core.config import config_from_dict, to_flat, to_toml
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


def test_the_readme_cli_lines_are_real(capsys: pytest.CaptureFixture[str]) -> None:
    """README's --set examples are valid keys and values, and its simulate flags exist."""
    text = (ROOT / "README.md").read_text()
    items = [i for i in re.findall(r"--set\s+([^\s`;]+)", text) if i != "KEY=VALUE"]
    assert len(items) >= 3, items
    cfg = apply_sets(load_config(ROOT / "simulations" / "default.toml"), items)
    build_strategy(cfg)
    usage = re.search(r"fedcore simulate \[CONFIG\][^`]*", text)
    assert usage is not None
    help_text = _help(capsys, "simulate")
    for flag in re.findall(r"--[a-z-]+", usage.group(0)):
        assert f"{flag} " in help_text, flag


# ------------------------------------------------------------------ --set, --quiet, errors
def test_the_set_docstring_examples_run() -> None:
    import doctest

    import fedcore.core.overrides as overrides

    result = doctest.testmod(overrides, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0, result


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


def test_the_serverapp_given_resume_without_a_checkpoint_starts_from_round_1(
    tmp_path: Path,
) -> None:
    """Any engine (e.g. ``flwr run`` with ``deploy.resume = true``): the same as the CLI."""
    from fedcore.engines.embedded import run_embedded
    from server.app import app as server_app

    cfg = config_from_dict({**TINY, "deploy": {"resume": True}})
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(to_toml(cfg))
    run_embedded(
        server_app,
        client_app="clients.app:app",
        run_config=to_flat(cfg),
        num_clients=cfg.run.clients,
        workers=1,
        server_node_config={"run-dir": str(out)},
    )
    assert [int(row["round"]) for row in _rows(out)] == [1, 2]


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


# deploy-local with a model module beside its config, from another cwd, trains:
# tests/test_deploy_local.py::test_sigterm_stops_every_process (one federation for both).


# ------------------------------------------------------------------ a kit started twice
def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")
def test_a_kit_started_twice_is_already_connected_and_server_resume_before_round_1(
    tmp_path: Path,
) -> None:
    """Two real ``fedcore client`` processes with one kit against a real ``fedcore server``.

    The server waits for 2 clients; client-1 joins, a second client-1 is refused with
    "already connected" (exit 3), then the server is interrupted before round 1 and
    ``fedcore server --resume`` of its run directory trains round 1.
    """
    from fedcore.deploy.local import carve
    from fedcore.deploy.provision import provision
    from fedcore.engines.processes import free_port
    from tests.procs import stop

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["run"] = {"rounds": 1, "clients": 2, "centralized-baseline": False}
    raw["data"] = {"source": "synthetic", "synthetic-examples": 200, "num-classes": 10}
    raw["round"] = {"min-available-clients": 2, "timeout": 120.0}
    cfg = config_from_dict(raw)
    data = carve(cfg, tmp_path / "data")
    config = tmp_path / "config.toml"
    config.write_text(to_toml(cfg))
    fed = provision(tmp_path / "fed", clients=2)
    run_dir = tmp_path / "run"
    procs: list[subprocess.Popen[bytes]] = []

    def start(log: str, *args: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / log, "wb") as f:
            p = subprocess.Popen(
                [*CLI, *args], stdout=f, stderr=subprocess.STDOUT, env=_env(),
                start_new_session=True,
            )  # fmt: skip
        procs.append(p)
        return p

    def server(log: str, *args: str) -> subprocess.Popen[bytes]:
        port, local = free_port(), free_port()
        kit = str(fed.server_kit)
        p = start(
            log, "server", "--kit", kit, "--address", f"127.0.0.1:{port}",
            "--local-port", str(local), *args,
        )  # fmt: skip
        p.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
        return p

    def client(srv: subprocess.Popen[bytes], name: str, log: str, *extra: str) -> Any:
        i = int(name.rsplit("-", 1)[1]) - 1
        return start(
            log, "client", "--kit", str(fed.client_kit(name)), "--server", srv.address,  # type: ignore[attr-defined]
            "--data", str(data[i]), "--config", str(config), "--connect-timeout", "120", *extra,
        )  # fmt: skip

    def log(name: str) -> str:
        path = tmp_path / name
        return path.read_text(errors="replace") if path.exists() else ""

    try:
        first_server = server("server-1.log", "--out", str(run_dir), str(config))
        client(first_server, "client-1", "first.log")
        _wait_for(lambda: "connected to" in log("first.log"), 120, "client-1 to connect")
        twin = client(first_server, "client-1", "twin.log")
        rc = twin.wait(timeout=60)
        assert rc == 3, log("twin.log")
        assert "already connected from another process" in log("twin.log"), log("twin.log")
        assert "never admitted" not in log("twin.log")
        # the server is interrupted before round 1 (it waits for a second client)
        _wait_for(lambda: (run_dir / "config.toml").is_file(), 60, "the run to start")
        os.killpg(first_server.pid, signal.SIGINT)
        assert first_server.wait(timeout=60) != 0
        assert not (run_dir / "checkpoint.safetensors").exists()
        stop(procs, str(tmp_path))
        # --resume of that run directory starts it from round 1
        second_server = server("server-2.log", "--resume", str(run_dir), "--quiet")
        for name in ("client-1", "client-2"):
            client(second_server, name, f"{name}.log", "--once")
        assert second_server.wait(timeout=180) == 0, log("server-2.log")
        out = log("server-2.log")
        assert "has no checkpoint" in out and "starting it from round 1" in out, out
        assert [int(row["round"]) for row in _rows(run_dir)] == [1]
    finally:
        stop(procs, str(tmp_path))


def _guarded(guard: Any, path: str, key: bytes | None, status: int) -> dict[str, str]:
    """One request through ``guard`` to an app answering ``status``; the response headers."""
    import asyncio

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    guard.app = app
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "server": ("127.0.0.1", 9092),
        "client": ("127.0.0.1", 50000),
        "headers": [(b"flwr-public-key", key)] if key is not None else [],
    }
    asyncio.run(guard(scope, receive, send))
    return {bytes(k).decode(): bytes(v).decode() for k, v in sent[0]["headers"]}


def test_the_guard_marks_a_refused_activation_of_an_identity_it_saw_succeed() -> None:
    from fedcore.deploy.guard import LAST_ACTIVE_HEADER, ListenerGuard, fleet_routes

    guard = ListenerGuard(None, local_port=9093, public_paths=fleet_routes())  # type: ignore[arg-type]
    activate, beat = "/v1/fleet/activate-node", "/v1/fleet/send-node-heartbeat"
    # never seen (never admitted, or a first session): Flower's answer unchanged
    assert LAST_ACTIVE_HEADER not in _guarded(guard, activate, b"A", 412)
    assert _guarded(guard, activate, b"A", 200) == {}
    assert LAST_ACTIVE_HEADER not in _guarded(guard, activate, b"B", 412)  # another identity
    _guarded(guard, beat, b"A", 200)
    time.sleep(0.05)
    age = float(_guarded(guard, activate, b"A", 412)[LAST_ACTIVE_HEADER])
    assert 0.05 <= age < 5, age
    assert LAST_ACTIVE_HEADER not in _guarded(guard, beat, b"A", 412)  # only on activations
    assert LAST_ACTIVE_HEADER not in _guarded(guard, activate, b"A", 401)
    assert LAST_ACTIVE_HEADER not in _guarded(guard, activate, None, 412)
    _guarded(guard, beat, b"C", 401)  # a failed request is no sign of a session
    assert LAST_ACTIVE_HEADER not in _guarded(guard, activate, b"C", 412)
    _guarded(guard, "/v1/fleet/deactivate-node", b"A", 200)  # a clean exit ends the session
    assert LAST_ACTIVE_HEADER not in _guarded(guard, activate, b"A", 412)


@pytest.mark.parametrize("other", ["live", "killed"])
def test_a_client_tells_a_live_twin_from_a_killed_earlier_session(
    other: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused activations carrying the guard's age: a live twin's age falls behind ours
    (it keeps succeeding): "already connected"; a killed session's only grows: retried
    until its heartbeat expires and the activation succeeds."""
    import httpx

    from fedcore.deploy import node
    from fedcore.deploy.guard import LAST_ACTIVE_HEADER
    from fedcore.deploy.provision import provision

    kit = provision(tmp_path / "fed", clients=1).client_kit("client-1")
    t0 = time.monotonic()
    calls = []

    def activate(client: Any, key: Any, *, heartbeat_interval: float) -> int:
        calls.append(time.monotonic())
        if other == "killed" and len(calls) == 4:
            return 7
        age = 0.1 if other == "live" else 2.0 + time.monotonic() - t0
        request = httpx.Request("POST", "https://127.0.0.1:1/v1/fleet/activate-node")
        response = httpx.Response(
            412, headers={LAST_ACTIVE_HEADER: f"{age:.3f}"}, text="{}", request=request
        )
        raise httpx.HTTPStatusError("412", request=request, response=response)

    monkeypatch.setattr(node.flower, "activate_node", activate)
    session = node.FleetSession("127.0.0.1:1", ca_pem=None, key_path=kit / "identity.key")
    try:
        if other == "live":
            with pytest.raises(node.Refused, match="already connected from another process"):
                session.connect(wait=60)
            assert len(calls) <= 5  # within a few retries, not the whole wait
        else:
            assert session.connect(wait=60) == 7
    finally:
        session.close()
