"""The embedded engine's fast paths give the results of the slow ones (issue 11):
loading the global model from the ``.npy`` payloads in place, executor 0's messages
passed as objects, the cyclic GC frozen only while forked workers run; and (second
pass) the cached data split, the cached path resolution and the plot drawn last."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch import nn

from fedcore.clientside.handlers import load_global
from fedcore.core.records import load_arrays
from fedcore.engines.embedded import EmbeddedGrid, node_id_for


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )


def _random_arrays(model: nn.Module, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.dtype == torch.int64:  # BatchNorm's num_batches_tracked
            out[name] = Array(np.array(rng.integers(0, 100), dtype=np.int64))
        else:
            out[name] = Array(rng.standard_normal(tuple(t.shape)).astype(np.float32))
    return ArrayRecord(out)


def test_load_global_loads_the_bits_load_arrays_loads():
    fast, slow = _model(), _model()
    for seed in (1, 2):  # twice: the second load overwrites the first everywhere
        arrays = _random_arrays(fast, seed)
        load_global(fast, arrays)
        load_arrays(slow, arrays)
        a, b = fast.state_dict(), slow.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype
            assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    # the parameters themselves changed, not copies of them
    assert fast[0].weight.data_ptr() == dict(fast.named_parameters())["0.weight"].data_ptr()
    assert torch.equal(fast[0].weight, torch.from_numpy(arrays["0.weight"].numpy()))


def test_load_global_refuses_a_mismatch_with_load_arrays_error():
    model = _model()
    arrays = _random_arrays(model, 0)
    arrays["4.bias"] = Array(np.zeros(3, dtype=np.float32))
    with pytest.raises(RuntimeError) as slow:
        load_arrays(_model(), arrays)
    with pytest.raises(RuntimeError) as fast:
        load_global(model, arrays)
    assert str(fast.value) == str(slow.value)
    assert "4.bias" in str(fast.value)


def test_load_global_runs_load_hooks():
    model = _model()
    seen = []
    model[4].register_load_state_dict_pre_hook(lambda *a, **k: seen.append(1))
    load_global(model, _random_arrays(model, 3))
    assert seen == [1]


def test_executor_zero_replies_and_gc_is_unfrozen_after_close():
    frozen = gc.get_freeze_count()
    arrays = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    with EmbeddedGrid(
        client_app="tests.apps.echo:app", run_config={}, num_clients=4, workers=2
    ) as grid:
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({})})
        msgs = [
            Message(content=content, dst_node_id=node_id_for(p), message_type=MessageType.TRAIN)
            for p in range(4)
        ]
        replies = list(grid.send_and_receive(msgs, timeout=60))
        again = list(
            grid.send_and_receive(
                [
                    Message(
                        content=content, dst_node_id=node_id_for(0), message_type=MessageType.TRAIN
                    )
                ],
                timeout=60,
            )
        )
    assert [r.content["metrics"]["partition"] for r in replies] == [0, 1, 2, 3]
    assert again[0].content["metrics"]["calls"] == 2  # executor 0 keeps its contexts
    for r in replies:
        assert r.content["arrays"]["w"].numpy().tolist() == [0.0, 1.0, 2.0]
    assert gc.get_freeze_count() == frozen


# ----------------------------------------------- second pass (issue 11): start-up and end
def _tiny_config():
    from fedcore.core.config import config_from_dict

    return config_from_dict(
        {
            "run": {"seed": 3, "rounds": 1, "clients": 2, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 80, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 4}},
            "train": {"local-epochs": 1},
            "strategy": {"min-train-clients": 2, "min-evaluate-clients": 2},
            "round": {"min-available-clients": 2},
            "secagg": {"enabled": False},
            "engine": {"workers": 1},
        }
    )


def test_the_cached_split_is_the_split_that_clients_read():
    from fedcore.clientside.data import (
        cached_simulation_split,
        client_data,
        simulation_split,
        split_local,
    )
    from fedcore.core.seeds import derive_seed

    cfg = _tiny_config()
    cached = cached_simulation_split(cfg.data, seed=3, num_clients=2)
    fresh = simulation_split(cfg.data, seed=3, num_clients=2)
    assert cached is cached_simulation_split(cfg.data, seed=3, num_clients=2)
    for a, b in ((cached.train, fresh.train), (cached.test, fresh.test)):
        assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
    assert [p.tolist() for p in cached.parts] == [p.tolist() for p in fresh.parts]
    own = client_data(cfg.data, seed=3, partition_id=1, num_partitions=2)
    slow = split_local(
        fresh.train.subset(fresh.parts[1]), cfg.data.val_fraction, seed=derive_seed(3, "client", 1)
    )
    assert own.train.x.tobytes() == slow.train.x.tobytes()
    assert own.val.y.tobytes() == slow.val.y.tobytes()


def test_client_config_file_resolves_a_relative_path_anew_and_errors_are_unchanged(
    tmp_path, monkeypatch
):
    from fedcore.clientside.policy import client_config_file
    from fedcore.core.config import to_toml
    from fedcore.core.errors import ConfigError

    cfg = _tiny_config()
    for sub, lr in (("a", 0.01), ("b", 0.02)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "client.toml").write_text(to_toml(cfg.replace(train={"lr": lr})))
    absolute = tmp_path / "a" / "client.toml"
    assert client_config_file(absolute).train.lr == 0.01
    assert client_config_file(str(absolute)).train.lr == 0.01  # (the cached resolution)
    for sub, lr in (("a", 0.01), ("b", 0.02), ("a", 0.01)):
        monkeypatch.chdir(tmp_path / sub)
        assert client_config_file("client.toml").train.lr == lr
    with pytest.raises(ConfigError, match="cannot be read"):
        client_config_file(tmp_path / "missing.toml")


def test_fedcore_simulate_writes_the_plot_after_the_engine_and_serve_can_leave_it(
    tmp_path, monkeypatch
):
    import fedcore.engines.embedded as embedded
    from fedcore.cli import main
    from fedcore.core.config import to_flat, to_toml
    from server.app import app as server_app

    cfg = _tiny_config()
    left = tmp_path / "left"
    embedded.run_embedded(
        server_app,
        client_app="clients.app:app",
        run_config=to_flat(cfg),
        num_clients=2,
        workers=1,
        server_node_config={"run-dir": str(left), "plot": False},
    )
    assert (left / "summary.json").is_file() and (left / "model.safetensors").is_file()
    assert not (left / "plot.png").exists()  # left to the caller

    closed: list[bool] = []
    original = embedded.EmbeddedGrid.close
    monkeypatch.setattr(
        embedded.EmbeddedGrid,
        "close",
        lambda self, *a, **k: (original(self, *a, **k), closed.append(True))[0],
    )
    import fedcore.serverside.rundir as rundir

    drawn = rundir.write_plot
    monkeypatch.setattr(
        rundir, "write_plot", lambda *a, **k: (closed == [True] or pytest.fail(), drawn(*a, **k))
    )
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(cfg))
    assert main(["simulate", str(config), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert (tmp_path / "cli" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert closed == [True]  # drawn once, after the executors stopped


def test_one_push_encodes_a_shared_content_once_and_the_bytes_are_flowers() -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedcore.flower_adapter import MessageEncoder, error_reply, message_to_bytes, set_message_id

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32)), "b": Array(np.ones(2))})
    shared = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})})
    other = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.2})})
    encode = MessageEncoder()
    messages = [Message(shared, dst_node_id=10 + i, message_type="train") for i in range(3)]
    messages.append(Message(other, dst_node_id=20, message_type="train"))
    for i, msg in enumerate(messages):
        set_message_id(msg, f"m{i}")
    messages.append(error_reply(messages[0], "boom"))
    for msg in messages:  # byte for byte Flower's encoding, metadata and content alike
        assert encode(msg) == message_to_bytes(msg)
    assert len(encode._contents) == 2  # the shared content was encoded once
