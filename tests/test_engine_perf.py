"""What makes the embedded engine lean, and that it changes no result: executor 0
in the server process, forked workers, the built-in optimizers (bit-identical to
torch.optim without importing torch._dynamo), digits without scikit-learn."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch import nn

from fedcore.clientside.data import Dataset, load_digits
from fedcore.clientside.training import TrainSettings, make_loader, train
from fedcore.engines.embedded import EmbeddedGrid, node_id_for


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )


def _reference_train(model: nn.Module, loader, s: TrainSettings) -> None:
    """The loop as it was with torch.optim (the oracle)."""
    torch.manual_seed(s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(s.epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()


@pytest.mark.parametrize(
    "optimizer, momentum, weight_decay",
    [("sgd", 0.0, 0.0), ("sgd", 0.9, 0.0), ("sgd", 0.9, 1e-3), ("adam", 0.0, 0.0),
     ("adam", 0.0, 1e-2)],
)
def test_builtin_optimizers_are_bit_identical_to_torch_optim(optimizer, momentum, weight_decay):
    rng = np.random.default_rng(0)
    data = Dataset(
        rng.standard_normal((96, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 96), 10
    )
    s = TrainSettings(epochs=3, batch_size=16, lr=0.05, momentum=momentum,
                      weight_decay=weight_decay, optimizer=optimizer, seed=5)
    ours, ref = _model(), _model()
    train(ours, make_loader(data, batch_size=16, shuffle=True, seed=5), s)
    _reference_train(ref, make_loader(data, batch_size=16, shuffle=True, seed=5), s)
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_digits_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits as sk_load

    ours, ref = load_digits(), sk_load()
    assert np.array_equal(ours.x, (ref.images.astype(np.float32) / 16.0)[:, None])
    assert np.array_equal(ours.y, ref.target) and ours.y.dtype == np.int64


def test_a_client_process_needs_neither_dynamo_nor_scikit_learn():
    code = (
        "import sys\n"
        "from fedcore.core.config import config_from_dict\n"
        "from fedcore.clientside.data import client_data\n"
        "from fedcore.clientside.models import build_model\n"
        "from fedcore.clientside.training import TrainSettings, make_loader, train\n"
        "cfg = config_from_dict({})\n"
        "d = client_data(cfg.data, seed=0, partition_id=0, num_partitions=10)\n"
        "m = build_model(cfg.model, input_shape=d.train.input_shape, num_classes=10)\n"
        "for opt in ('sgd', 'adam'):\n"
        "    s = TrainSettings(epochs=1, batch_size=32, lr=0.05, momentum=0.9, optimizer=opt)\n"
        "    train(m, make_loader(d.train, batch_size=32, shuffle=True), s)\n"
        "print(sorted(k for k in ('torch._dynamo', 'sympy', 'sklearn', 'scipy') "
        "if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _msgs(grid, nodes=None):
    arrays = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({})})
    return [
        Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN)
        for n in (nodes or grid.get_node_ids())
    ]


def test_executor_zero_runs_in_this_process_and_threads_are_restored():
    torch.set_num_threads(2)
    with EmbeddedGrid(client_app="tests.apps.echo:app", run_config={}, num_clients=4,
                      workers=2) as grid:
        assert torch.get_num_threads() == 1  # clients compute alike on every executor
        replies = list(grid.send_and_receive(_msgs(grid), timeout=60))
    assert torch.get_num_threads() == 2
    pids = [r.content["metrics"]["pid"] for r in replies]
    assert pids[0] == pids[2] == os.getpid()  # clients 0 and 2: executor 0
    assert pids[1] == pids[3] != os.getpid()  # clients 1 and 3: a worker process


@pytest.mark.slow
def test_workers_are_spawned_when_another_thread_runs():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()  # forking now could copy a lock that thread holds: the grid spawns instead
    try:
        with EmbeddedGrid(client_app="tests.apps.echo:app", run_config={}, num_clients=3,
                          workers=3) as grid:
            assert all(w.process._start_method == "spawn" for w in grid._workers[1:])
            replies = list(grid.send_and_receive(_msgs(grid), timeout=120))
        assert [r.content["metrics"]["partition"] for r in replies] == [0, 1, 2]
        assert len({r.content["metrics"]["pid"] for r in replies}) == 3
    finally:
        stop.set()
        t.join()


def test_workers_are_forked_when_alone_and_gone_after_close():
    expected = "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"
    with EmbeddedGrid(client_app="tests.apps.echo:app", run_config={}, num_clients=3,
                      workers=3) as grid:
        procs = [w.process for w in grid._workers[1:]]
        assert [p._start_method for p in procs] == [expected, expected]
        replies = list(grid.send_and_receive(_msgs(grid, [node_id_for(1)]), timeout=60))
        assert replies[0].content["metrics"]["partition"] == 1
    assert not any(p.is_alive() for p in procs)
