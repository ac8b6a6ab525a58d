"""The embedded engine's fast paths give the results of the slow ones (issue 11):
loading the global model from the ``.npy`` payloads in place, executor 0's messages
passed as objects, and the cyclic GC frozen only while forked workers run."""

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
