"""The client decides what runs (fedcore issue 9, client side).

A server controls Flower's run config and the messages it sends; a client takes
neither as an instruction to run code or to give up secure aggregation:

- a deployment node builds its model, loops and data settings from its own config
  (``client-config``, else the library defaults), never from the run config: a run
  config naming ``os:system`` runs nothing (and, as a control, the same config on a
  node that does trust the run config, a simulation node, does run it);
- a plain ``train`` reaches a client that requires secure aggregation as an error
  reply naming the fix, unless the client allows plain rounds;
- per-message ``lr``/``local-epochs``/``batch-size`` outside the client's own bounds
  are refused (never clamped); in-bounds values are used;
- a retried round (``attempt`` > 0) reseeds the client's training; attempt 0 is
  today's seed;
- the embedded engine hands every virtual client the simulation's TOML as its own
  config; a run in which every client refuses fails and says why;
- ``fedcore client --config/--allow-plain/--state``, and end to end over TLS: default
  clients refuse a plain federation (the server exits non-zero), clients started
  with ``--allow-plain`` train it.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from clients.app import app
from fedcore.clientside import policy
from fedcore.clientside.handlers import train_seed
from fedcore.clientside.models import build_model
from fedcore.clientside.policy import ALLOW_PLAIN, CLIENT_CONFIG, local_config
from fedcore.core.config import Config, config_from_dict, config_from_flat, to_flat, to_toml
from fedcore.core.errors import ConfigError, RoundFailedError
from fedcore.core.records import ARRAYS, ATTEMPT, model_to_arrays
from fedcore.core.seeds import derive_seed
from fedcore.deploy.node import _handle
from fedcore.storage.configfile import load_config
from fedcore.strategies import FedAvg
from tests.apps.marker import MARKER_ENV
from tests.docs_runner import blocks

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fedcore.cli"]
NODE = 4242
FEATURES, CLASSES = 6, 3


# ----------------------------------------------------------------- a client's own files
@dataclass
class ClientFiles:
    data: Path
    config: Path

    @property
    def cfg(self) -> Config:
        return load_config(self.config)


def _own_config(*, secagg: bool = True, evaluate: bool = True, **train: object) -> Config:
    return config_from_dict(
        {
            "run": {"seed": 5, "clients": 3},
            # (a simulation node would generate data like this; a deployment node reads
            # only its file, with these label and class settings)
            "data": {
                "source": "synthetic",
                "synthetic-examples": 90,
                "synthetic-features": FEATURES,
                "synthetic-classes": CLASSES,
                "partition": "iid",
                "num-classes": CLASSES,
                "val-fraction": 0.2,
            },
            "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
            "train": {"local-epochs": 1, "batch-size": 8, "lr": 0.1, **train},
            "secagg": {"enabled": secagg, "evaluate": evaluate},
        }
    )


def _client_files(tmp_path: Path, cfg: Config) -> ClientFiles:
    g = np.random.default_rng(0)
    x = g.normal(size=(60, FEATURES)).astype(np.float32)
    y = (np.argmax(x[:, :CLASSES], axis=1)).astype(np.int64)
    data = tmp_path / "site.npz"
    np.savez(data, x=x, y=y)
    path = tmp_path / "client.toml"
    path.write_text(to_toml(cfg))
    return ClientFiles(data, path)


def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=NODE,
        node_config=dict(node_config),
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def _deployment_node(files: ClientFiles, **extra: object) -> dict:
    return {"data-path": str(files.data), CLIENT_CONFIG: str(files.config), **extra}


def _initial(cfg: Config):
    torch.manual_seed(0)
    return model_to_arrays(build_model(cfg.model, input_shape=(FEATURES,), num_classes=CLASSES))


def _train_msg(arrays, config: dict, server_round: int = 1):
    (msg,) = FedAvg().configure_train(server_round, arrays, ConfigRecord(config), [NODE])
    return msg


def _weights(reply) -> dict[str, np.ndarray]:
    assert not reply.has_error(), reply.error.reason
    return {k: v.numpy() for k, v in reply.content.array_records[ARRAYS].items()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _evil(own: Config, marker: Path) -> Config:
    """What a malicious server puts in the run config: a shell command and its own loop."""
    return own.replace(
        model={
            "factory": "os:system",
            "kwargs": {"command": f"touch {marker}"},
            "train-fn": "tests.apps.marker:train",
        }
    )


# ----------------------------------------------------------------- no code from the server
def test_a_malicious_run_config_runs_nothing_on_a_deployment_node(tmp_path, monkeypatch):
    files = _client_files(tmp_path, _own_config(secagg=False))
    shell_marker, loop_marker = tmp_path / "shell-ran", tmp_path / "loop-ran"
    monkeypatch.setenv(MARKER_ENV, str(loop_marker))
    run_config = to_flat(_evil(files.cfg, shell_marker))
    arrays = _initial(files.cfg)

    reply = app(_train_msg(arrays, {"lr": 0.1}), _context(_deployment_node(files), run_config))

    assert not shell_marker.exists() and not loop_marker.exists()
    trained = _weights(reply)  # the client's own model (its mlp), trained
    start = {k: v.numpy() for k, v in arrays.items()}
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}
    assert not _same(trained, start)


def test_control_the_same_run_config_does_run_where_the_run_config_is_trusted(
    tmp_path, monkeypatch
):
    # A simulation node (one user owns both sides) takes the run config: the marker
    # appears, so the test above would see the attack if the client obeyed it.
    own = _own_config(secagg=False)
    shell_marker = tmp_path / "shell-ran"
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "loop-ran"))
    ctx = _context({"partition-id": 0, "num-partitions": 3}, to_flat(_evil(own, shell_marker)))
    with pytest.raises(ConfigError, match="model.factory"):  # os.system returns an int
        app(_train_msg(_initial(own), {}), ctx)
    assert shell_marker.exists()


def test_local_config_is_the_file_then_the_simulation_then_the_defaults(
    tmp_path, monkeypatch, caplog
):
    files = _client_files(tmp_path, _own_config())
    server = to_flat(_own_config(secagg=False, lr=0.5))
    assert local_config(_context(_deployment_node(files), server)) == files.cfg
    simulation = _context({"partition-id": 1, "num-partitions": 3}, server)
    assert local_config(simulation) == config_from_flat(server)

    monkeypatch.setattr(policy, "_defaults_logged", False)
    deployment = _context({"data-path": str(files.data)}, server)
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        assert local_config(deployment) == Config()
        assert local_config(deployment) == Config()
    said = [r.getMessage() for r in caplog.records if "built-in defaults" in r.getMessage()]
    assert len(said) == 1 and "--config" in said[0], said

    # cached by (path, mtime): an edited file is read again
    files.config.write_text(to_toml(_own_config(lr=0.2)))
    st = files.config.stat()
    os.utime(files.config, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert local_config(_context(_deployment_node(files))).train.lr == 0.2

    files.config.write_text("[train]\nlrr = 1\n")
    os.utime(files.config, ns=(st.st_atime_ns, st.st_mtime_ns + 4_000_000_000))
    with pytest.raises(ConfigError, match="train.lrr"):
        local_config(_context(_deployment_node(files)))


# ----------------------------------------------------------------- plain rounds by consent
def test_a_plain_round_is_refused_unless_the_client_allows_it(tmp_path, caplog):
    files = _client_files(tmp_path, _own_config(secagg=True))
    arrays = _initial(files.cfg)
    server = to_flat(files.cfg.replace(secagg={"enabled": False}))  # the server's say: none
    with caplog.at_level(logging.ERROR, logger="fedcore"):
        # fedcore client's message loop: an exception in the ClientApp is an error reply
        reply = _handle(app, _train_msg(arrays, {}), _context(_deployment_node(files), server))
    assert reply.has_error() and not reply.has_content()
    reason = reply.error.reason
    assert "secure aggregation" in reason, reason
    assert "secagg.enabled = false" in reason and "fedcore client --allow-plain" in reason
    assert any("refused a plain round" in r.getMessage() for r in caplog.records)

    allowed = _context(_deployment_node(files, **{ALLOW_PLAIN: True}), server)
    assert not _same(_weights(_handle(app, _train_msg(arrays, {}), allowed)), _weights_of(arrays))


def _weights_of(arrays) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def test_plain_evaluation_alone_may_be_allowed(tmp_path):
    files = _client_files(tmp_path, _own_config(secagg=True, evaluate=False))
    arrays = _initial(files.cfg)
    ctx = _context(_deployment_node(files))
    (ev,) = FedAvg().configure_evaluate(1, arrays, ConfigRecord(), [NODE])
    metrics = _handle(app, ev, ctx)
    assert not metrics.has_error() and "eval_acc" in metrics.content.metric_records["metrics"]
    train = _handle(app, _train_msg(arrays, {}), ctx)
    assert train.has_error() and "secure aggregation" in train.error.reason


def test_a_client_whose_own_config_turns_secure_aggregation_off_trains_plain_rounds(tmp_path):
    files = _client_files(tmp_path, _own_config(secagg=False))
    arrays = _initial(files.cfg)
    reply = _handle(app, _train_msg(arrays, {}), _context(_deployment_node(files)))
    assert not _same(_weights(reply), _weights_of(arrays))


# ----------------------------------------------------------------- bounds on what a server asks
@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("lr", 1e-9, "[train.min-lr = 1e-06, train.max-lr = 10]"),
        ("lr", 100, "[train.min-lr = 1e-06, train.max-lr = 10]"),
        ("local-epochs", 10**6, "[1, train.max-local-epochs = 100]"),
        ("batch-size", 0, "[1, train.max-batch-size = 65536]"),
        ("lr", math.nan, "train.max-lr"),
        ("lr", math.inf, "train.max-lr"),
        ("lr", True, "train.max-lr"),
        ("local-epochs", 1.5, "train.max-local-epochs"),
    ],
)
def test_hyperparameters_outside_the_clients_bounds_are_refused(tmp_path, key, value, bound):
    files = _client_files(tmp_path, _own_config(secagg=False))
    with pytest.raises(ConfigError) as info:
        app(_train_msg(_initial(files.cfg), {key: value}), _context(_deployment_node(files)))
    text = str(info.value)
    assert info.value.key == key and bound in text and repr(value) in text, text


def test_the_bounds_are_the_clients_own(tmp_path):
    files = _client_files(tmp_path, _own_config(secagg=False, **{"max-lr": 0.2}))
    ctx = _context(_deployment_node(files))
    with pytest.raises(ConfigError, match=r"lr = 0.5 is outside .*train.max-lr = 0.2"):
        app(_train_msg(_initial(files.cfg), {"lr": 0.5}), ctx)


def test_in_bound_hyperparameters_are_used(tmp_path):
    files = _client_files(tmp_path, _own_config(secagg=False))  # its own: lr 0.1, 1 epoch, 8
    arrays = _initial(files.cfg)
    ctx = _context(_deployment_node(files))
    own = _weights(app(_train_msg(arrays, {}), ctx))
    echoed = _weights(app(_train_msg(arrays, {"lr": 0.1, "local-epochs": 1, "batch-size": 8}), ctx))
    assert _same(own, echoed)  # the same values: the same model, bit for bit
    slow = _weights(app(_train_msg(arrays, {"lr": 0.01}), ctx))
    longer = _weights(app(_train_msg(arrays, {"local-epochs": 3}), ctx))
    bigger = _weights(app(_train_msg(arrays, {"batch-size": 32}), ctx))
    for other in (slow, longer, bigger):
        assert not _same(own, other)
    drift = lambda w: sum(float(np.abs(w[k] - arrays[k].numpy()).sum()) for k in w)  # noqa: E731
    assert drift(slow) < drift(own) < drift(longer)


# ----------------------------------------------------------------- a retried round reseeds
def test_attempt_reseeds_training_and_attempt_zero_is_the_first_attempt(tmp_path):
    files = _client_files(tmp_path, _own_config(secagg=False))
    arrays = _initial(files.cfg)
    ctx = _context(_deployment_node(files))

    def trained(conf: dict) -> dict[str, np.ndarray]:
        return _weights(app(_train_msg(arrays, conf, server_round=3), ctx))

    first = trained({})
    assert _same(first, trained({ATTEMPT: 0}))
    retry = trained({ATTEMPT: 1})
    assert not _same(first, retry)  # another shuffle
    assert _same(retry, trained({ATTEMPT: 1}))  # deterministic per attempt
    assert not _same(retry, trained({ATTEMPT: 2}))
    # attempt 0 is exactly the seed the client used before attempts existed
    cfg = files.cfg
    assert train_seed(cfg, 3, NODE, {}) == derive_seed(cfg.run.seed, "train", 3, NODE)
    assert train_seed(cfg, 3, NODE, {ATTEMPT: 0}) == train_seed(cfg, 3, NODE, {})
    for bad in (-1, True, 1.0):
        with pytest.raises(ConfigError, match="attempt"):
            trained({ATTEMPT: bad})


# ----------------------------------------------------------------- simulation: one TOML
def _sim_config() -> Config:
    return config_from_dict(
        {
            "run": {"seed": 2, "rounds": 1, "clients": 3, "centralized-baseline": False},
            "data": {
                "source": "synthetic",
                "synthetic-examples": 240,
                "synthetic-features": FEATURES,
                "synthetic-classes": CLASSES,
                "partition": "iid",
            },
            "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            "strategy": {"min-train-clients": 3, "min-evaluate-clients": 3},
            "round": {"min-available-clients": 3, "retries": 0, "timeout": 60.0},
            "secagg": {"enabled": False},
        }
    )


def _simulate(tmp_path: Path, name: str, server_cfg: Config, client_config: Path | None) -> Path:
    from fedcore.engines.embedded import run_embedded
    from server.app import app as server_app

    run_dir = tmp_path / name
    run_embedded(
        server_app,
        client_app="clients.app:app",
        run_config=to_flat(server_cfg),
        num_clients=3,
        workers=1,
        server_node_config={"run-dir": str(run_dir)},
        client_config=client_config,
    )
    return run_dir


def test_the_embedded_engine_gives_each_client_the_toml_as_its_own_config(tmp_path, monkeypatch):
    marker = tmp_path / "marks"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    server_cfg = _sim_config()
    own = tmp_path / "client.toml"  # the same run, with the user's own train function
    own.write_text(to_toml(server_cfg.replace(model={"train-fn": "tests.apps.marker:train"})))
    _simulate(tmp_path, "with-file", server_cfg, own)
    assert marker.read_text().count("train-fn ran") == 3  # every client ran the file's loop
    _simulate(tmp_path, "without", server_cfg, None)  # fallback: the run config (no train-fn)
    assert marker.read_text().count("train-fn ran") == 3


def test_fedcore_simulate_hands_clients_the_resolved_config(tmp_path, monkeypatch):
    from fedcore.engines import embedded

    seen = {}
    real = embedded.run_embedded

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedded, "run_embedded", spy)
    path = tmp_path / "sim.toml"
    path.write_text(to_toml(_sim_config()))
    from fedcore.cli import main

    out = tmp_path / "run"
    assert main(["simulate", str(path), "--out", str(out), "--seed", "9", "--workers", "1"]) == 0
    client_file = Path(seen["client_config"])
    assert client_file == out / "config.toml"
    resolved = load_config(client_file)  # the file's config with the override applied
    assert resolved.run.seed == 9 and resolved == load_config(path).replace(
        run={"seed": 9}, engine={"workers": 1}
    )


def test_a_run_in_which_every_client_refuses_fails_and_says_why(tmp_path):
    server_cfg = _sim_config()  # plain rounds
    own = tmp_path / "client.toml"  # ...but the clients require secure aggregation
    own.write_text(to_toml(server_cfg.replace(secagg={"enabled": True})))
    with pytest.raises(RoundFailedError, match="no round trained") as info:
        _simulate(tmp_path, "refused", server_cfg, own)
    assert "secure aggregation" in str(info.value), info.value
    assert (tmp_path / "refused" / "summary.json").is_file()  # the run directory is written


# ----------------------------------------------------------------- fedcore client's flags
@pytest.fixture
def client_cli(capsys):
    """``fedcore client ARGS`` in this process: (exit code, stderr); signal handlers restored."""
    import signal

    from fedcore.cli import main

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main(["client", *args])
        return rc, capsys.readouterr().err

    yield run
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_fedcore_client_refuses_a_bad_config_before_connecting(tmp_path, client_cli):
    files = _client_files(tmp_path, _own_config())
    common = ["--insecure", "--server", "127.0.0.1:9", "--data", str(files.data)]
    rc, err = client_cli(*common, "--config", str(tmp_path / "nope.toml"))
    assert rc == 2 and "--config" in err and "nope.toml" in err, err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = 0.1\nmax-lr = 0.01\n")
    rc, err = client_cli(*common, "--config", str(bad))
    assert rc == 2 and "train.lr" in err and "0.01" in err, err
    unfit = tmp_path / "unfit.toml"  # the file has labels 0..2: two classes do not fit
    unfit.write_text(to_toml(_own_config().replace(data={"num-classes": 2})))
    rc, err = client_cli(*common, "--config", str(unfit))
    assert rc == 2 and "num-classes = 2" in err, err


def test_fedcore_client_keeps_state_in_its_kit_and_warns_about_plain_rounds(tmp_path, client_cli):
    from fedcore.deploy.provision import provision
    from fedcore.engines.processes import free_port

    fed = provision(tmp_path / "fed", clients=1)
    kit = fed.client_kit("client-1")
    files = _client_files(tmp_path, _own_config())
    rc, err = client_cli(
        *("--kit", str(kit), "--server", f"127.0.0.1:{free_port()}", "--data", str(files.data)),
        *("--config", str(files.config), "--allow-plain", "--connect-timeout", "0.5"),
    )
    assert rc == 1 and "could not reach the server" in err, err  # (nothing listens there)
    assert "WARNING: --allow-plain" in err and "reveal" in err
    state = kit / "state"
    assert state.is_dir() and stat.S_IMODE(state.stat().st_mode) == 0o700
    other = tmp_path / "elsewhere"
    rc, err = client_cli(
        *("--kit", str(kit), "--server", f"127.0.0.1:{free_port()}", "--data", str(files.data)),
        *("--config", str(files.config), "--state", str(other), "--connect-timeout", "0.5"),
    )
    assert rc == 1 and other.is_dir() and "--allow-plain" not in err


# ----------------------------------------------------------------- the documented client.toml
def test_the_documented_client_config_loads_and_shows_every_bound(tmp_path):
    doc = ROOT / "docs" / "deployment.md"
    (body,) = [b for kind, name, b in blocks(doc) if kind == "file" and name == "client.toml"]
    path = tmp_path / "client.toml"
    path.write_text(body)
    cfg = load_config(path)
    assert cfg.secagg.enabled  # the example keeps secure aggregation required
    raw = tomllib.loads(body)
    assert {"min-lr", "max-lr", "max-local-epochs", "max-batch-size"} <= raw["train"].keys()
    assert {"min-neighbours", "min-threshold", "max-weight"} <= raw["secagg"].keys()
    section = doc.read_text().split("### Client configuration", 1)[1].split("\n### ", 1)[0]
    for words in ("--config client.toml", "--allow-plain", "--state DIR", "train.max-lr"):
        assert words in section, words


# ----------------------------------------------------------------- end to end over TLS
@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")
def test_default_clients_refuse_a_plain_federation_and_allow_plain_ones_train(tmp_path):
    from fedcore.deploy.local import carve
    from fedcore.deploy.provision import provision
    from fedcore.engines.processes import free_port
    from tests.procs import stop
    from tests.test_deployment import _metrics_rows

    fed = provision(tmp_path / "fed", clients=3)
    cfg = config_from_dict(
        {  # the library's default model and data, so that clients without --config fit it
            "run": {"seed": 1, "rounds": 1, "clients": 3, "centralized-baseline": False},
            "data": {"partition": "iid"},
            "train": {"local-epochs": 1},
            "strategy": {"min-train-clients": 3, "min-evaluate-clients": 3},
            "round": {"min-available-clients": 3, "timeout": 60.0, "retries": 0},
            "secagg": {"enabled": False},
        }
    )
    data = carve(cfg, tmp_path / "data")
    cfg_path = tmp_path / "server.toml"
    cfg_path.write_text(to_toml(cfg))
    marker = f"fedcore-policy-{os.getpid()}"

    def federation(name: str, *client_flags: str) -> tuple[int, str, list[str]]:
        port, local_port = free_port(), free_port()
        logs = tmp_path / name
        logs.mkdir()
        env = {**os.environ, "FEDCORE_TEST_MARKER": marker}
        procs = []

        def start(who: str, argv: list[str]) -> subprocess.Popen[bytes]:
            with open(logs / f"{who}.log", "wb") as f:
                p = subprocess.Popen(
                    [*CLI, *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, cwd=ROOT,
                )  # fmt: skip
            procs.append(p)
            return p

        try:
            server = start(
                "server",
                [
                    "server", "--kit", str(fed.server_kit), "--address", f"127.0.0.1:{port}",
                    "--local-port", str(local_port), "--state-dir", str(logs / "state"),
                    "--out", str(logs / "run"), str(cfg_path),
                ],
            )  # fmt: skip
            for i in range(3):
                start(
                    f"client-{i + 1}",
                    [
                        "client", "--kit", str(fed.client_kit(f"client-{i + 1}")),
                        "--server", f"127.0.0.1:{port}", "--data", str(data[i]),
                        "--once", "--connect-timeout", "60", *client_flags,
                    ],
                )  # fmt: skip
            server.wait(timeout=240)
        finally:
            stop(procs, marker)
        rows = _metrics_rows(logs / "run")
        clients = [(logs / f"client-{i}.log").read_text(errors="replace") for i in (1, 2, 3)]
        out = (logs / "server.log").read_text(errors="replace")
        return server.returncode, out + f"\nrows: {rows}", clients

    rc, out, clients = federation("refused")
    assert rc != 0, out
    last = out.strip().splitlines()
    assert any("no round trained" in line for line in last[-3:]), out
    for log in clients:
        assert "secure aggregation" in log and "--allow-plain" in log, log

    rc, out, clients = federation("allowed", "--allow-plain")
    assert rc == 0, out + "\n".join(clients)
    rows = _metrics_rows(tmp_path / "allowed" / "run")
    assert [r["clients"] for r in rows] == [3], rows
    for log in clients:
        assert "WARNING: --allow-plain" in log
