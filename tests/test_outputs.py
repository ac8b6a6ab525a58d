"""What people read of a run: metric names, columns, the plot, summary.json, loggers, console.

One set of metric names (``fedcore.serverside.rounds.COLUMNS``) in the console line,
``metrics.csv``/``metrics.json``, the plot's legends, ``summary.json`` and TensorBoard;
users' own metrics example-weighted into extra columns; a resumed run's files shaped
like an uninterrupted one's. Rounds run on the embedded engine with one worker.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from matplotlib.figure import Figure

from fedcore.core.config import Config, config_from_dict, to_flat
from fedcore.core.errors import ConfigError
from fedcore.engines.embedded import EmbeddedGrid, run_embedded
from fedcore.serverside.checkpoint import load_checkpoint
from fedcore.serverside.loggers import TENSORBOARD_DIR, run_loggers
from fedcore.serverside.rounds import COLUMNS, Observer, RoundRecord, run_federation
from fedcore.serverside.rundir import (
    NO_TRAINING,
    SPLIT_COLOURS,
    columns_of,
    format_round,
    plot_figure,
    run_summary,
    write_metrics,
)
from fedcore.serverside.strategies import FedAvg

from .conftest import ROOT

NAMES = (
    "round",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "val_loss",
    "val_accuracy",
    "clients",
    "dropped",
    "seconds",
)


def test_the_metric_names_are_declared_once():
    assert COLUMNS == NAMES


# ------------------------------------------------------------------ user metrics, weighted

app = ClientApp()
#: client 0 has 1 example, client 1 has 3: every mean below is (v0 * 1 + v1 * 3) / 4
WEIGHTS = (1, 3)


@app.train()
def _train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    metrics = {"train_loss": (1.0, 2.0)[pid], "train_acc": (0.2, 0.6)[pid], "lr_used": 0.5}
    reply = {
        "arrays": msg.content.array_records["arrays"],
        "metrics": MetricRecord({**metrics, "num-examples": WEIGHTS[pid]}),
    }
    return Message(RecordDict(reply), reply_to=msg)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    metrics = {"eval_loss": (0.4, 0.8)[pid], "eval_acc": (1.0, 0.0)[pid], "f1": (0.4, 0.8)[pid]}
    reply = {"metrics": MetricRecord({**metrics, "num-examples": WEIGHTS[pid]})}
    return Message(RecordDict(reply), reply_to=msg)


class _Records(Observer):
    def __init__(self) -> None:
        self.records: list[RoundRecord] = []

    def round_finished(self, record, arrays, rejected) -> None:
        self.records.append(record)


def test_user_metrics_are_kept_and_example_weighted():
    seen = _Records()
    with EmbeddedGrid(
        client_app=f"{__name__}:app", run_config={}, num_clients=2, workers=1
    ) as grid:
        run_federation(
            grid,
            FedAvg(seed=0),
            arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
            rounds=1,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            policy=Config().round,
            central_evaluate=lambda _: {"loss": 0.25, "accuracy": 0.75},
            observer=seen,
        )
    (r,) = seen.records
    assert r.train_loss == pytest.approx((1.0 * 1 + 2.0 * 3) / 4)
    assert (r.val_loss, r.val_accuracy) == (pytest.approx(0.7), pytest.approx(0.25))
    assert (r.test_loss, r.test_accuracy, r.clients, r.dropped) == (0.25, 0.75, 2, 0)
    # kept, weighted, named by where they come from, after the fixed columns in name order
    assert r.extra == {
        "train_acc": pytest.approx((0.2 * 1 + 0.6 * 3) / 4),  # 0.5
        "train_lr_used": pytest.approx(0.5),
        "val_f1": pytest.approx((0.4 * 1 + 0.8 * 3) / 4),  # 0.7
    }
    assert list(r.as_dict()) == [*NAMES, "train_acc", "train_lr_used", "val_f1"]


# ------------------------------------------------------------------ run directory files

LOOPS = textwrap.dedent(
    '''
    """A user's train function returning an extra metric."""
    import torch
    from torch import nn


    def train(model, loader, settings):
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
        model.train()
        total = correct = count = 0.0
        for x, y in loader:
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            correct += float((out.argmax(1) == y).sum())
            count += len(y)
        return {"train_loss": total / count, "train_acc": correct / count}
    '''
)


def _config(tmp_path, rounds, *, secagg=None, clients=2, **run):
    (tmp_path / "userloops.py").write_text(LOOPS)
    base = {"seed": 3, "rounds": rounds, "clients": clients, "centralized-baseline": False}
    return config_from_dict(
        {
            "run": base | run,
            "data": {
                "source": "synthetic",
                "synthetic-examples": 120,
                "synthetic-classes": 3,
                "partition": "iid",
            },
            "model": {"factory": "mlp", "kwargs": {"hidden": 8}, "train-fn": "userloops:train"},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            "engine": {"workers": 1},
            "secagg": secagg or {"enabled": False},
        }
    )


def _simulate(cfg, run_dir, tmp_path, *, resume=False):
    from server.app import app as server_app

    sys.path.insert(0, str(tmp_path))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), old) if p)
    try:
        run_embedded(
            server_app,
            client_app="clients.app:app",
            run_config=to_flat(cfg),
            num_clients=cfg.run.clients,
            workers=1,
            server_node_config={"run-dir": str(run_dir), "resume": resume},
        )
    finally:
        sys.path.remove(str(tmp_path))
        os.environ.pop("PYTHONPATH") if old is None else os.environ.update(PYTHONPATH=old)


def _header(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return next(csv.reader(f))


def _read_events(directory):
    """Every (tag, step, value) in the TensorBoard event files (TFRecord of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_one_set_of_names_in_csv_json_summary_and_tensorboard_and_resume_keeps_columns(
    tmp_path,
):
    """An uninterrupted 2-round run and a 1-round run resumed to 2: same header, same
    column order (fixed names, then the user's ``train_acc``); summary.json and the
    TensorBoard event files use the same names."""
    full, part = tmp_path / "full", tmp_path / "part"
    _simulate(_config(tmp_path, 2), full, tmp_path)
    _simulate(_config(tmp_path, 1), part, tmp_path)
    _simulate(_config(tmp_path, 2), part, tmp_path, resume=True)

    expected = [*NAMES, "train_acc"]
    assert _header(full) == _header(part) == expected
    for run in (full, part):
        rows = json.loads((run / "metrics.json").read_text())
        assert [list(r) for r in rows] == [expected, expected]
        assert all(0 <= r["train_acc"] <= 1 for r in rows)

    summary = json.loads((full / "summary.json").read_text())
    rows = json.loads((full / "metrics.json").read_text())
    best = max(rows, key=lambda r: r["test_accuracy"])
    assert summary["rounds"] == 2 and summary["rounds_trained"] == 2
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert summary["final_test_loss"] == rows[-1]["test_loss"]
    assert summary["best_test_accuracy"] == best["test_accuracy"]
    assert summary["best_round"] == best["round"]
    assert summary["clients_dropped"] == 0 and summary["wall_seconds"] > 0

    events = _read_events(full / TENSORBOARD_DIR)
    assert {tag for tag, _, _ in events} == set(expected) - {"round"}
    logged = {(tag, step): value for tag, step, value in events}
    assert logged[("test_accuracy", 2)] == pytest.approx(rows[1]["test_accuracy"])
    assert logged[("train_acc", 1)] == pytest.approx(rows[0]["train_acc"])


def test_secure_aggregation_carries_the_extra_metrics_it_is_told_of(tmp_path):
    """``secagg.extra-metrics`` names the user's metrics the masked vector also carries
    (the server must fix the vector's length before any reply): the securely averaged
    ``train_acc`` equals the plain run's within the metric quantization bound."""
    secure, plain = tmp_path / "secure", tmp_path / "plain"
    told = {"enabled": True, "extra-metrics": "train_acc", "evaluate": False}
    _simulate(_config(tmp_path, 1, clients=3, secagg=told), secure, tmp_path)
    _simulate(_config(tmp_path, 1, clients=3), plain, tmp_path)
    (s,), (p,) = (json.loads((d / "metrics.json").read_text()) for d in (secure, plain))
    assert s["clients"] == p["clients"] == 3
    assert list(s) == list(p) == [*NAMES, "train_acc"]
    total = 3 * 40 * 0.8 * 0.9  # examples the 3 clients train on (about)
    bound = 3 * 64 / (2**15 * total) + 1e-9  # docs/security.md: M = 64 for metrics
    assert abs(s["train_acc"] - p["train_acc"]) < 10 * bound, (s, p)
    assert abs(s["train_loss"] - p["train_loss"]) < 10 * bound


def test_a_fedcore_0_1_history_is_read_with_todays_names():
    history = load_checkpoint(ROOT / "tests" / "data" / "v0.1-run").history
    assert [set(r) for r in history] == [set(NAMES)] * 2
    assert history[1]["test_accuracy"] == 0.375 and history[1]["dropped"] == 0


def test_columns_are_fixed_then_extras_by_name_and_missing_cells_are_empty(tmp_path):
    rows = [
        {**dict.fromkeys(NAMES, 1), "round": 1, "train_zeta": 0.5},
        {**dict.fromkeys(NAMES, 1), "round": 2, "train_acc": 0.25, "val_loss": math.nan},
    ]
    assert columns_of(rows) == [*NAMES, "train_acc", "train_zeta"]
    write_metrics(tmp_path, rows)
    with (tmp_path / "metrics.csv").open() as f:
        back = list(csv.DictReader(f))
    assert (back[0]["train_acc"], back[1]["train_zeta"], back[1]["val_loss"]) == ("", "", "")
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["train_acc"] is None


# ------------------------------------------------------------------ summary.json


def _row(rnd, acc, *, clients=2, dropped=0):
    return {
        **dict.fromkeys(NAMES, 0.5),
        "round": rnd,
        "test_accuracy": acc,
        "clients": clients,
        "dropped": dropped,
    }


def test_summary_figures():
    rows = [_row(1, 0.5), _row(2, 0.9, dropped=1), _row(3, 0.9, clients=0, dropped=3)]
    s = run_summary(rows, rounds=5, wall_seconds=1.5)
    assert s == {
        "rounds": 5,
        "rounds_trained": 2,
        "best_round": 2,  # the first of the tied best
        "best_test_accuracy": 0.9,
        "final_test_accuracy": 0.9,
        "final_test_loss": 0.5,
        "wall_seconds": 1.5,
        "clients_dropped": 4,
    }
    empty = run_summary([], rounds=3, wall_seconds=0.1)
    assert empty["rounds_trained"] == 0 and empty["best_round"] is None
    assert empty["final_test_accuracy"] is None


failing_app = ClientApp()


@failing_app.train()
def _refuse(msg: Message, context: Context) -> Message:
    raise RuntimeError("this client never trains")


def test_summary_is_written_when_no_round_trained(tmp_path):
    from fedcore.core.errors import RoundFailedError
    from server.app import app as server_app

    run = {"seed": 1, "rounds": 2, "clients": 2, "centralized-baseline": False}
    cfg = config_from_dict(
        {
            "run": run | {"tensorboard": False},
            "data": {"source": "synthetic", "synthetic-examples": 60, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 4}},
            "round": {"retries": 0},
            "secagg": {"enabled": False},
        }
    )
    with pytest.raises(RoundFailedError):
        run_embedded(
            server_app,
            client_app=f"{__name__}:failing_app",
            run_config=to_flat(cfg),
            num_clients=2,
            workers=1,
            server_node_config={"run-dir": str(tmp_path)},
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rounds_trained"] == 0, summary
    assert summary["clients_dropped"] >= 2 and summary["best_round"] is not None
    assert (tmp_path / "plot.png").is_file()


# ------------------------------------------------------------------ the plot


def _series(fig):
    return {
        line.get_label(): line for ax in fig.axes for line in ax.get_lines() if line.get_label()
    }


def test_plot_labels_colours_ticks_and_baseline():
    rows = [_row(r, 0.3 + r / 10) for r in (1, 2, 3)]
    fig = plot_figure(rows, baseline={"test_accuracy": 0.8, "test_loss": 0.2, "epochs": 10})
    lines = _series(fig)
    names = {label.split(":")[0] for label in lines}
    assert names == {"train_loss", "test_loss", "val_loss", "test_accuracy", "val_accuracy"}
    for label, line in lines.items():
        split = label.split("_")[0]
        assert line.get_color() == SPLIT_COLOURS[split], label  # test is test in both panels
    baselines = [line for label, line in lines.items() if "centralized baseline" in label]
    assert sorted(tuple(line.get_ydata()) for line in baselines) == [(0.2, 0.2), (0.8, 0.8)]
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert NO_TRAINING not in [t.get_text() for t in ax.texts]


def test_redraw_plot_draws_the_baseline_that_summary_json_holds(tmp_path, monkeypatch):
    """``fedcore simulate`` adds the baseline to summary.json after the run, then redraws."""
    import fedcore.serverside.rundir as rundir

    rows = [_row(r, 0.3 + r / 10) for r in (1, 2)]
    write_metrics(tmp_path, rows)
    baseline = {"test_accuracy": 0.8, "test_loss": 0.2, "epochs": 10}
    (tmp_path / "summary.json").write_text(json.dumps({"centralized_baseline": baseline}))
    drawn = []
    monkeypatch.setattr(rundir, "plot_figure", lambda r, b=None: drawn.append((r, b)) or Figure())
    rundir.redraw_plot(tmp_path)
    assert drawn == [(json.loads((tmp_path / "metrics.json").read_text()), baseline)]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_says_no_training_when_nothing_trained():
    fig = plot_figure([_row(1, 0.3, clients=0), _row(2, 0.3, clients=0)])
    assert all(NO_TRAINING in [t.get_text() for t in ax.texts] for ax in fig.axes)


# ------------------------------------------------------------------ console


def test_the_console_line_names_each_value_by_its_column():
    rec = RoundRecord(3, 0.5, 0.25, 0.75, math.nan, 0.5, 2, 1, 1.234, {"train_acc": 0.5})
    line = format_round(rec, 20)
    words = line.split()
    assert words[:2] == ["round", "3/20"]
    assert words[2::2] == [*NAMES[1:-1], "train_acc", "seconds"]
    assert words[3::2] == ["0.5000", "0.2500", "0.7500", "-", "0.5000", "2", "1", "0.5000", "1.23"]
    assert format_round(rec.as_dict(), 20) == line  # a metrics.json row prints the same


def test_bars_only_on_a_terminal_and_quiet_prints_no_round_lines(tmp_path, monkeypatch, capsys):
    from fedcore.serverside.rundir import RunObserver

    def observer(**kw):
        return RunObserver(tmp_path, Config(), FedAvg(seed=0), **kw)

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not observer(progress=True).bars
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert observer(progress=True).bars and not observer(progress=False).bars
    quiet = observer(progress=True, quiet=True)
    assert not quiet.bars
    rec = RoundRecord(1, 0.5, 0.25, 0.75, 0.5, 0.5, 2, 0, 1.0)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    quiet.round_finished(rec, arrays, ())
    assert capsys.readouterr().out == ""
    observer(progress=True, bars=False).round_finished(rec, arrays, ())
    assert capsys.readouterr().out == format_round(rec, Config().run.rounds) + "\n"


class _Stages(Observer):
    def __init__(self) -> None:
        self.stages: list[str] = []

    def stage_started(self, server_round, stage, num_messages) -> None:
        self.stages.append(stage)


def test_a_secure_evaluation_reports_its_stages_as_evaluation_not_training():
    """The progress bar's label is ``round R/N <stage>``: the masked stage of a secure
    evaluation is "evaluate" (it was "train", like the training's)."""
    from fedcore.secagg.exchange import SecAggSettings, SecureExchange
    from fedcore.serverside.rounds import evaluate_once

    cfg = config_from_dict(
        {
            "run": {"seed": 2, "clients": 3, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 90, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 4}},
            "engine": {"workers": 1},
        }
    )
    from fedcore.clientside.data import holdout
    from fedcore.core.records import model_to_arrays
    from fedcore.runtime.serve import initial_model

    arrays = model_to_arrays(initial_model(cfg, holdout(cfg.data, seed=2)[1]))
    seen = _Stages()
    with EmbeddedGrid(
        client_app="clients.app:app", run_config=to_flat(cfg), num_clients=3, workers=1
    ) as grid:
        result = evaluate_once(
            grid,
            FedAvg(seed=2),
            SecureExchange(SecAggSettings(stage_timeout=30.0), seed=2),
            server_round=1,
            arrays=arrays,
            config=ConfigRecord(),
            node_ids=sorted(grid.get_node_ids()),
            timeout=60.0,
            observer=seen,
        )
    assert result is not None and result.num_clients == 3, result
    assert "evaluate" in seen.stages and "train" not in seen.stages, seen.stages


def test_readme_names_the_columns_and_summary_keys_and_prints_a_real_console_line():
    text = (ROOT / "README.md").read_text()
    para = text[text.index("Each run directory holds") :]
    para = para[: para.index("\n\n")]
    columns = para[para.index("columns ") : para.index(": test is")]
    assert re.findall(r"`(\w+)`", columns) == list(NAMES)
    summary = para[para.index("`summary.json` (") :]
    summary = summary[: summary.index(")")]
    documented = set(re.findall(r"`(\w+)`", summary))
    assert documented == {*run_summary([], rounds=1, wall_seconds=0), "centralized_baseline"}
    line = next(li for li in text.splitlines() if li.startswith("round 20/20"))
    assert line.split()[2::2] == [*NAMES[1:-1], "seconds"]


PIPED = textwrap.dedent(
    """
    [run]
    seed = 1
    rounds = 3
    clients = 2
    centralized-baseline = false
    tensorboard = false
    [data]
    source = "synthetic"
    synthetic-examples = 90
    synthetic-classes = 3
    partition = "iid"
    [model]
    factory = "mlp"
    kwargs = { hidden = 8 }
    [engine]
    workers = 1
    [secagg]
    enabled = false
    """
)


def test_piped_simulate_prints_one_plain_line_per_round_and_no_bar_frames(tmp_path):
    (tmp_path / "run.toml").write_text(PIPED)
    proc = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", str(tmp_path / "run.toml")]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "\r" not in out and "client/s" not in out, out
    lines = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], proc.stdout
    assert all(line.split()[2::2][:8] == list(NAMES[1:]) for line in lines), lines
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()  # [run] tensorboard = false


# ------------------------------------------------------------------ MLflow


def test_mlflow_enabled_but_not_installed_is_refused_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets uninstalled
    cfg = Config().replace(run={"mlflow": True})
    with pytest.raises(ConfigError) as err:
        run_loggers(cfg, tmp_path)
    text = str(err.value)
    assert "run.mlflow" in text and "pip install 'fedcore[mlflow]'" in text
    assert "mlflow = false" in text


def test_mlflow_logger_logs_config_and_metrics_per_round(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # not in .[dev]: pip install 'fedcore[mlflow]'
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store needs no database
    uri = (tmp_path / "mlruns").as_uri()
    cfg = Config().replace(run={"mlflow": True, "mlflow-tracking-uri": uri, "tensorboard": False})
    (logger,) = run_loggers(cfg, tmp_path / "run-a")
    for rnd in (1, 2):
        rec = RoundRecord(rnd, 0.5, 0.25, 0.5 + rnd / 10, math.nan, 0.5, 2, 0, 1.0)
        logger.round_finished(rec, ArrayRecord(), ())
    logger.close()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params["run.seed"] == "0"
    history = client.get_metric_history(logger.run_id, "test_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.6), (2, 0.7)]
    assert "val_loss" not in run.data.metrics  # nan: not logged
