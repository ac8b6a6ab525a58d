"""Round policy under failures, reply fuzzing, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.core.config import to_flat
from fedcore.engines.embedded import node_id_for, run_embedded
from fedcore.serverside.checkpoint import load_checkpoint
from fedcore.serverside.exchange import PlainExchange
from fedcore.serverside.strategies import FedAvg

from .conftest import ROOT


def _simulate(cfg, run_dir, monkeypatch=None, env=None, resume=False):
    from server.app import app as server_app

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    run_embedded(
        server_app,
        client_app="tests.apps.flaky:app",
        run_config=to_flat(cfg),
        num_clients=cfg.run.clients,
        workers=cfg.engine.workers,
        server_node_config={"run-dir": str(run_dir), "resume": resume},
    )
    return json.loads((run_dir / "metrics.json").read_text())


def test_failed_clients_are_dropped_with_reasons_and_the_rest_aggregated(
    small_config, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="fedcore")
    # the plain exchange: the server itself sees (and rejects) each client's reply
    cfg = small_config.replace(run={"rounds": 2}, secagg={"enabled": False})
    rows = _simulate(cfg, tmp_path / "run", monkeypatch, {"FLAKY_FAIL": "1,3@2", "FLAKY_NAN": "2"})
    # round 1: client 1 raised, client 2 sent NaN -> 2 of 4 aggregated
    assert rows[0]["clients"] == 2 and rows[1]["clients"] == 1
    text = caplog.text
    assert f"client {node_id_for(1)} (train): client reported an error" in text
    assert "injected failure: partition 1, round 1" in text
    assert f"client {node_id_for(2)} (train):" in text and "NaN or Inf" in text
    assert f"client {node_id_for(3)} (train)" in text and "round 2" in text


def test_too_few_replies_retries_then_keeps_the_previous_model(small_config, tmp_path, monkeypatch):
    cfg = small_config.replace(
        run={"rounds": 3},
        round={"min-train-replies": 3, "retries": 1, "retry-backoff": 0.0},
        secagg={"enabled": False},  # tests/apps/flaky.py has no train.secagg handler
    )
    # round 2: three of four clients fail in every attempt -> round 2 fails
    rows = _simulate(cfg, tmp_path / "run", monkeypatch, {"FLAKY_FAIL": "0@2,1@2,2@2"})
    assert [r["clients"] for r in rows] == [4, 0, 4]
    assert rows[1]["dropped"] == 6  # 3 clients x 2 attempts, each with a reason
    # the model after round 2 is exactly the model after round 1
    assert rows[1]["test_loss"] == rows[0]["test_loss"]
    assert rows[1]["test_accuracy"] == rows[0]["test_accuracy"]


# ------------------------------------------------------------------ fuzzing


def _good_reply(to, value, n):
    arrays = ArrayRecord({"w": Array(np.full(3, value, np.float32))})
    return Message(
        RecordDict(
            {"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})}
        ),
        reply_to=to,
    )


_arrays = st.one_of(
    st.just(ArrayRecord({"w": Array(np.zeros(4, np.float32))})),
    st.just(ArrayRecord({"w": Array(np.zeros(3, np.float64))})),
    st.just(ArrayRecord({"v": Array(np.zeros(3, np.float32))})),
    st.just(
        ArrayRecord({"w": Array(np.zeros(3, np.float32)), "x": Array(np.zeros(1, np.float32))})
    ),
    st.just(ArrayRecord({"w": Array(np.array([np.nan, 0, 0], np.float32))})),
    st.just(ArrayRecord({"w": Array(np.array([0, -np.inf, 0], np.float32))})),
    st.just(ArrayRecord({"w": Array(np.zeros(3, np.int32))})),
    st.just(
        ArrayRecord(
            {"w": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x93NUMPY")}
        )
    ),
    st.just(ArrayRecord({"w": Array(np.zeros(100_000, np.float32))})),
    st.just(ArrayRecord()),
)
_n = st.one_of(
    st.integers(-5, 0),
    st.just(2**40),
    # a positive whole float (1.0) is a valid count, not a bad one
    st.floats(allow_nan=True).filter(lambda x: not (x == x and x.is_integer() and x > 0)),
    st.just(2.5),
    st.just([1, 2]),
)


@st.composite
def bad_replies(draw, to):
    kind = draw(st.sampled_from(["arrays", "n", "error", "no-metrics", "no-arrays", "two-arrays"]))
    if kind == "error":
        return Message(Error(2, draw(st.text(max_size=20))), reply_to=to)
    arrays = (
        draw(_arrays) if kind == "arrays" else ArrayRecord({"w": Array(np.ones(3, np.float32))})
    )
    n = draw(_n) if kind == "n" else 5
    content = RecordDict({"arrays": arrays})
    if kind != "no-metrics":
        content["metrics"] = MetricRecord({"num-examples": n})
    if kind == "no-arrays":
        del content["arrays"]
    if kind == "two-arrays":
        content["more"] = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    return Message(content, reply_to=to)


@pytest.mark.property
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_bad=st.integers(1, 5), n_good=st.integers(0, 3))
def test_fuzzed_replies_never_crash_and_never_change_the_model(data, n_bad, n_good):
    s = FedAvg(seed=0)
    template = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    msgs = s.configure_train(1, template, ConfigRecord(), list(range(10, 10 + n_bad + n_good)))
    good = [_good_reply(m, float(i + 1), i + 1) for i, m in enumerate(msgs[:n_good])]
    bad = [data.draw(bad_replies(m)) for m in msgs[n_good:]]
    order = data.draw(st.permutations(good + bad))
    result = PlainExchange(max_examples=10**6).aggregate(order, arrays=template)
    new = s.server_update(1, template, result) if result.update is not None else None
    assert result.num_clients == n_good
    assert len(result.rejected) == n_bad
    assert all(r.reason and r.stage == "train" for r in result.rejected)
    assert {r.node_id for r in result.rejected} == {m.metadata.dst_node_id for m in msgs[n_good:]}
    if n_good:
        expected = sum((i + 1) * (i + 1) for i in range(n_good)) / sum(i + 1 for i in range(n_good))
        assert np.allclose(new["w"].numpy(), expected)
    else:
        assert result.update is None and new is None


# ------------------------------------------------------------------ SIGKILL + resume


def _cli(*args, env=None, timeout=180):
    return subprocess.Popen(
        [sys.executable, "-m", "fedcore.cli", "simulate", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


KILL_CONFIG = """
[run]
seed = 5
rounds = 6
clients = 4
centralized-baseline = false
[data]
source = "synthetic"
synthetic-examples = 400
synthetic-classes = 3
partition = "dirichlet"
alpha = 1.0
[model]
factory = "mlp"
[model.kwargs]
hidden = 16
[train]
local-epochs = 1
batch-size = 16
[engine]
workers = 1
"""
# Exact resume is a property of the checkpoints: the tests below run plain rounds. Under
# secure aggregation a round the clients already masked is re-trained with fresh
# randomness on resume (their replay guard), see the secure-aggregation test at the end.
KILL_CONFIG_PLAIN = KILL_CONFIG + "[secagg]\nenabled = false\n"


def _run_to_completion(cfg_path, run_dir, first_env=None, kill_after=None):
    """Start a run, kill it (crash point or timer), then resume it to the end.

    Returns whether the first process really died of SIGKILL.
    """
    proc = _cli(str(cfg_path), "--out", str(run_dir), env=first_env)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=180)
    was_killed = proc.returncode == -signal.SIGKILL
    if not was_killed:
        assert proc.returncode == 0, proc.stderr.read()
        return False
    if (run_dir / "checkpoint.safetensors").exists():
        proc = _cli("--resume", str(run_dir))
    else:  # killed before the first checkpoint: nothing to resume, start again
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = _cli(str(cfg_path), "--out", str(run_dir))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return True


@pytest.mark.slow
def test_resume_refuses_another_config(tmp_path):
    cfg_path = tmp_path / "kill.toml"
    cfg_path.write_text(KILL_CONFIG.replace("rounds = 6", "rounds = 1"))
    proc = _cli(str(cfg_path), "--out", str(tmp_path / "run"))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    other = tmp_path / "other.toml"
    other.write_text(KILL_CONFIG.replace("alpha = 1.0", "alpha = 2.0"))
    proc = _cli(str(other), "--resume", str(tmp_path / "run"))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2
    assert "another config (data.alpha: 1.0 -> 2.0" in err


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), [("fedadam", "eta = 0.02\n"), ("scaffold", "")])
def test_sigkill_and_resume_keep_strategy_state_exact(tmp_path, name, options):
    """Server-optimizer moments and SCAFFOLD's control variates (server's and every
    client's) survive SIGKILL: the resumed run ends with the uninterrupted model."""
    cfg_path = tmp_path / "kill.toml"
    table = f'[strategy]\nname = "{name}"\n' + (f"[strategy.options]\n{options}" if options else "")
    cfg_path.write_text(KILL_CONFIG_PLAIN + table)
    ref = tmp_path / "reference"
    proc = _cli(str(cfg_path), "--out", str(ref))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    reference = (ref / "model.safetensors").read_bytes()
    if name == "scaffold":  # every client keeps its control variate in the run directory
        assert sorted(p.name for p in (ref / "client-state").iterdir()) == ["0", "1", "2", "3"]
    points = [
        "before-checkpoint:3",  # the clients already saved round 3's state; the server did not
        "checkpoint-partial:4",
        "checkpoint-written:2",
        "after-metrics:5",
    ]
    for i, point in enumerate(points):
        run_dir = tmp_path / f"run{i}"
        died = _run_to_completion(cfg_path, run_dir, first_env={"FEDCORE_CRASH_AT": point})
        assert died, point
        assert (run_dir / "model.safetensors").read_bytes() == reference, f"{name}: {point}"


@pytest.mark.slow
def test_sigkill_under_secure_aggregation_resumes_exactly_between_rounds_and_afresh_within(
    tmp_path,
):
    """Secure aggregation on: a run killed after a checkpoint resumes to the uninterrupted
    model; one killed after the clients masked round 3 but before the server checkpointed
    it re-runs round 3 as a new attempt, which every client trains with fresh randomness
    (so two sums of round 3 over different sets could not be differenced), and still
    completes every round."""
    from fedcore.clientside.state import ClientState

    cfg_path = tmp_path / "kill.toml"
    cfg_path.write_text(KILL_CONFIG)
    ref = tmp_path / "reference"
    proc = _cli(str(cfg_path), "--out", str(ref))
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    reference = (ref / "model.safetensors").read_bytes()

    between = tmp_path / "between"
    assert _run_to_completion(
        cfg_path, between, first_env={"FEDCORE_CRASH_AT": "checkpoint-written:2"}
    )
    assert (between / "model.safetensors").read_bytes() == reference

    within = tmp_path / "within"
    assert _run_to_completion(
        cfg_path, within, first_env={"FEDCORE_CRASH_AT": "before-checkpoint:3"}
    )
    assert load_checkpoint(within).round == 6
    assert (within / "model.safetensors").read_bytes() != reference
    for p in range(4):
        guard = ClientState(within / "client-state" / str(p)).load("secagg-guard-train", 10**6)
        attempts = dict(zip(guard["rounds"].tolist(), guard["counts"].tolist(), strict=True))
        assert attempts[3] == 2 and all(attempts[r] == 1 for r in (1, 2, 4, 5, 6)), attempts
