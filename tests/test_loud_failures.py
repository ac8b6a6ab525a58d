"""A user's train/evaluate function that fails is shown once, located, and not retried.

Unit tests of :func:`fedcore.clientside.training.call_loop` (the traceback trimmed to
the user's frames, the contract in the message), then the real ``fedcore simulate``
as a user runs it: a module beside the config, the run's exit code and everything
it printed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.clientside.training import TrainSettings, call_loop, resolve_loops
from fedcore.core.config import ModelConfig
from fedcore.core.errors import UserCodeError, is_user_code_error

from .conftest import ROOT

APPS = ROOT / "tests" / "apps"
FEDCORE = str(Path(sys.executable).parent / "fedcore")
#: What ``badloops.raising_train`` raises (built at run time: no source line repeats it).
MESSAGE = "loop exploded with code 4242"
SETTINGS = TrainSettings(epochs=1, batch_size=8, lr=0.1)


def _line(text: str) -> int:
    """The line of ``badloops.py`` that starts with ``text`` (stripped)."""
    lines = (APPS / "badloops.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith(text))


DEFINED, RAISED = _line("def raising_train"), _line("raise ValueError")


def _user_module(tmp_path: Path) -> Path:
    """The bad loops as the user's own ``myloops.py`` beside their config."""
    target = tmp_path / "myloops.py"
    shutil.copy(APPS / "badloops.py", target)
    sys.path.insert(0, str(tmp_path))
    return target


@pytest.fixture
def myloops(tmp_path):
    path = _user_module(tmp_path)
    yield path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("myloops", None)


def test_a_raising_loop_is_located_and_trimmed_to_the_users_frames(myloops):
    import myloops as m

    with pytest.raises(UserCodeError) as info:
        call_loop(m.raising_train, (None, [], SETTINGS), key="model.train-fn", spec="myloops:x")
    first, *rest = str(info.value).splitlines()
    assert is_user_code_error(first)
    assert "model.train-fn = 'myloops:x'" in first and MESSAGE in first
    assert f"({myloops}:{DEFINED})" in first  # where the function is defined
    assert f"at {myloops}:{RAISED}, in _step" in first  # where it raised
    trace = "\n".join(rest)
    assert "in raising_train" in trace and "in _step" in trace
    assert "fedcore" not in trace.replace(str(myloops), "")  # fedcore's own frames are gone
    assert MESSAGE not in trace  # the error text is in the first line only


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("list_train", "returned list; it must return a dict"),
        ("lossless_train", "missing ['train_loss']"),
        ("nan_train", "train_loss=nan; metric values must be finite"),
    ],
)
def test_a_wrong_return_names_the_function_its_file_and_the_contract(myloops, name, what):
    import myloops as m

    with pytest.raises(UserCodeError) as info:
        call_loop(getattr(m, name), (None, [], SETTINGS), key="model.train-fn", spec=f"x:{name}")
    text = str(info.value)
    assert what in text and str(myloops) in text and f"'x:{name}'" in text
    assert "called as fn(model, loader, settings)" in text and "'train_loss'" in text


def test_the_built_in_loops_are_checked_but_not_blamed_on_the_user():
    with pytest.raises(Exception) as info:
        call_loop(lambda *a: [1], (None, None, SETTINGS), key="model.train-fn", spec=None)
    assert not isinstance(info.value, UserCodeError)


def test_a_wrong_signature_is_refused_when_the_loops_are_resolved(myloops):
    cfg = ModelConfig(factory="mlp", train_fn="myloops:two_argument_train")
    with pytest.raises(UserCodeError) as info:
        resolve_loops(cfg)
    text = str(info.value)
    assert "model.train-fn = 'myloops:two_argument_train'" in text and str(myloops) in text
    assert "(model, loader)" in text and "fn(model, loader, settings)" in text
    ok = ModelConfig(factory="mlp", train_fn="myloops:raising_train")
    assert resolve_loops(ok)[0].__name__ == "raising_train"


def _simulate(tmp_path: Path, train_fn: str, *, secagg: bool) -> subprocess.CompletedProcess:
    _user_module(tmp_path)
    sys.path.remove(str(tmp_path))
    (tmp_path / "exp.toml").write_text(
        f"""
[run]
rounds = 3
clients = 3
centralized-baseline = false
[data]
source = "digits"
[model]
factory = "myloops:make_model"
train-fn = "myloops:{train_fn}"
[round]
retries = 2
retry-backoff = 0.0
[secagg]
enabled = {str(secagg).lower()}
[engine]
workers = 1
"""
    )
    return subprocess.run(
        [FEDCORE, "simulate", "exp.toml", "--out", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secure"])
def test_a_raising_train_function_stops_the_run_naming_the_users_file(tmp_path, secagg):
    proc = _simulate(tmp_path, "raising_train", secagg=secagg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "no round trained" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # the error names the function and its file
    assert f"model.train-fn = 'myloops:raising_train' ({tmp_path / 'myloops.py'}:" in last
    assert f"{tmp_path / 'myloops.py'}:{RAISED}, in _step" in out  # and where it raised
    assert 1 <= out.count(MESSAGE) <= 3, out
    assert "retry 1/" not in out and "not retried" in out, out  # deterministic: no retry
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1] and rows[0]["clients"] == 0  # stopped at once
    # the user's frames are shown once, with secure aggregation too (the secure exchange
    # keeps a user-code error's traceback whole)
    assert out.count("in raising_train") == 1, out
    if not secagg:  # every client replies (the secure round ends once too few are left)
        assert "the same error as client 1000 (round 1) on 2 more client(s)" in out


@pytest.mark.parametrize(
    ("train_fn", "said"),
    [
        ("two_argument_train", "has the signature (model, loader)"),
        ("list_train", "returned list; it must return a dict"),
    ],
)
def test_a_train_function_that_breaks_the_contract_fails_the_run_saying_so(
    tmp_path, train_fn, said
):
    proc = _simulate(tmp_path, train_fn, secagg=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    last = proc.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "myloops.py") in last and f"model.train-fn = 'myloops:{train_fn}'" in last
    assert said in out and "fn(model, loader, settings)" in out
    if train_fn == "two_argument_train":  # refused before any client started
        assert not (tmp_path / "run" / "metrics.json").exists()
    assert out.count(said) <= 3 and "retry 1/" not in out, out


def evaluate_with_f1(model, loader):
    """A ``model.evaluate-fn`` with an extra metric."""
    return {"loss": 0.5, "accuracy": 0.75, "f1": 0.6}


def _evaluate_reply(evaluate_fn: str):
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedcore.clientside.data import holdout
    from fedcore.clientside.handlers import handle_evaluate
    from fedcore.core.config import config_from_dict, to_flat
    from fedcore.core.records import model_to_arrays
    from fedcore.engines.embedded import node_id_for
    from fedcore.runtime.serve import initial_model
    from fedcore.serverside.strategies import FedAvg

    cfg = config_from_dict(
        {
            "run": {"seed": 3, "clients": 2, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 200, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 4}, "evaluate-fn": evaluate_fn},
            "secagg": {"enabled": False},
        }
    )
    _, test = holdout(cfg.data, seed=cfg.run.seed)
    arrays = model_to_arrays(initial_model(cfg, test))
    context = Context(
        run_id=1,
        node_id=node_id_for(0),
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=to_flat(cfg),
    )
    (msg,) = FedAvg(seed=3).configure_evaluate(1, arrays, ConfigRecord(), [context.node_id])
    return handle_evaluate(msg, context)


def test_an_evaluate_functions_extra_metrics_go_to_the_server():
    metrics = _evaluate_reply(f"{__name__}:evaluate_with_f1").content.metric_records["metrics"]
    assert dict(metrics) == {
        "eval_f1": 0.6,
        "eval_loss": 0.5,
        "eval_acc": 0.75,
        **{"num-examples": metrics["num-examples"]},
    }


def test_a_raising_evaluate_function_is_a_located_user_code_error(myloops):
    with pytest.raises(UserCodeError) as info:
        _evaluate_reply("myloops:raising_evaluate")
    first = str(info.value).splitlines()[0]
    assert f"model.evaluate-fn = 'myloops:raising_evaluate' ({myloops}:" in first
    assert "loop exploded with code 4243" in first and f"{myloops}:{RAISED}, in _step" in first


def test_the_documented_train_functions_extra_metric_is_kept_in_plain_rounds(tmp_path):
    from .docs_runner import blocks

    for kind, name, body in blocks(ROOT / "docs" / "custom-models.md"):
        if kind == "file":
            (tmp_path / str(name)).write_text(body)
    subprocess.run([sys.executable, "make_data.py"], cwd=tmp_path, check=True, timeout=120)
    args = ["--rounds", "1", "--set", "secagg.enabled=false", "--out", "run"]
    proc = subprocess.run(
        [FEDCORE, "simulate", "experiment.toml", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(0 < r["train_acc"] <= 1 and 0 < r["val_accuracy"] <= 1 for r in rows)


# ------------------------------------------------------------------ the round loop's policy

USER_ERROR = (
    "client reported an error: user code failed: model.train-fn = 'm:f' (/src/m.py:3); "
    "raised ValueError: bad\nTraceback (your frames, most recent call last):\n  File ..."
)


class _Grid:
    def get_node_ids(self):
        return [1000, 1001, 1002]


class _ScriptedExchange:
    """Each training attempt fails with the next list of reasons; nobody evaluates."""

    label = "scripted"

    def __init__(self, attempts):
        self.attempts = list(attempts)
        self.calls = 0

    def train(self, grid, messages, **kwargs):
        from fedcore.core.records import Rejection
        from fedcore.serverside.exchange import Aggregate

        reasons = self.attempts[min(self.calls, len(self.attempts) - 1)]
        self.calls += 1
        return Aggregate.failed([Rejection(1000 + i, "train", r) for i, r in enumerate(reasons)])

    def evaluate(self, grid, messages, **kwargs):
        from fedcore.serverside.exchange import EvaluateResult

        return EvaluateResult({}, 0, 0)


def _federate(exchange, rounds=3):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedcore.core.config import Config
    from fedcore.serverside.rounds import Observer, run_federation
    from fedcore.serverside.strategies import FedAvg

    class Seen(Observer):
        rows: list = []

        def round_finished(self, record, arrays, rejected):
            self.rows.append((record.round, [r.reason for r in rejected]))

    seen = Seen()
    seen.rows = []
    policy = dataclasses.replace(Config().round, retries=2, retry_backoff=0.0)
    run_federation(
        _Grid(),
        FedAvg(seed=0),
        arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
        rounds=rounds,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        policy=policy,
        exchange=exchange,
        observer=seen,
        sleep=lambda s: None,
    )
    return seen.rows


def test_user_code_errors_are_not_retried_and_stop_a_run_that_never_trained(caplog):
    exchange = _ScriptedExchange([[USER_ERROR] * 3])
    rows = _federate(exchange)
    assert exchange.calls == 1  # no retry, no second round
    ((rnd, reasons),) = rows
    assert rnd == 1 and reasons == [
        "user code failed: model.train-fn = 'm:f' (/src/m.py:3); the error is shown above",
        "user code failed: the same error as client 1000 (round 1)",
        "user code failed: the same error as client 1000 (round 1)",
    ]
    logged = caplog.text
    assert logged.count("raised ValueError: bad") == 1 and logged.count("Traceback") == 1
    assert "on 2 more client(s): 1001, 1002" in logged and "stopping the run" in logged


def test_a_round_with_any_other_failure_is_retried_as_before():
    exchange = _ScriptedExchange([[USER_ERROR, "no reply within 60 s"]])
    rows = _federate(exchange, rounds=2)
    assert exchange.calls == 2 * 3  # every round, every retry
    assert [r for r, _ in rows] == [1, 2]
