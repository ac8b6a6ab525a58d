"""The server refuses replies that would poison a round: non-finite metrics, oversize arrays.

Real Flower Messages through the real plain exchange, as the round loop drives it
(``tests/exchanges.py``), on the embedded engine with one executor (a thread of this
process; no worker process starts). Each virtual client replies what the training or
evaluation message's config tells it to (:data:`app` below).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcore.core.config import Config
from fedcore.engines.embedded import EmbeddedGrid, node_id_for
from fedcore.runtime.serve import plain_exchange
from fedcore.serverside.exchange import PlainExchange
from fedcore.serverside.rounds import Observer
from fedcore.serverside.strategies import FedAvg

from .exchanges import evaluate_step, train_step

CLIENTS = 3
NODES = [node_id_for(p) for p in range(CLIENTS)]
BAD = NODES[1]

# ------------------------------------------------------------------ the clients

app = ClientApp()


def _metrics(conf: ConfigRecord, pid: int, defaults: dict) -> MetricRecord:
    """``defaults`` overridden by the JSON object at ``metrics-<pid>`` (NaN/Infinity allowed)."""
    return MetricRecord({**defaults, **json.loads(str(conf.get(f"metrics-{pid}", "{}")))})


@app.train()
def train(msg: Message, context: Context) -> Message:
    conf = msg.content.config_records["config"]
    pid = int(context.node_config["partition-id"])
    arrays = msg.content.array_records["arrays"]
    if f"reply-bytes-{pid}" in conf:  # one uint8 array of that many elements, named "w"
        arrays = ArrayRecord({"w": Array(np.zeros(int(conf[f"reply-bytes-{pid}"]), np.uint8))})
    metrics = _metrics(conf, pid, {"train_loss": float(pid + 1), "num-examples": 10 * (pid + 1)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content.config_records["config"]
    pid = int(context.node_config["partition-id"])
    defaults = {"eval_loss": float(pid + 1), "eval_acc": 0.5, "num-examples": 10 * (pid + 1)}
    return Message(RecordDict({"metrics": _metrics(conf, pid, defaults)}), reply_to=msg)


# ------------------------------------------------------------------ the server side


@pytest.fixture(scope="module")
def grid():
    with EmbeddedGrid(
        client_app=f"{__name__}:app", run_config={}, num_clients=CLIENTS, workers=1
    ) as g:
        yield g


def _model(shape=(4,)):
    return ArrayRecord({"w": Array(np.zeros(shape, np.float32))})


def _train(grid, exchange, config, arrays=None):
    return train_step(
        exchange,
        grid,
        FedAvg(seed=0),
        server_round=1,
        arrays=arrays or _model(),
        config=ConfigRecord(config),
        node_ids=NODES,
        timeout=30.0,
        observer=Observer(),
    )


def _evaluate(grid, config):
    return evaluate_step(
        PlainExchange(),
        grid,
        FedAvg(seed=0),
        server_round=1,
        arrays=_model(),
        config=ConfigRecord(config),
        node_ids=NODES,
        timeout=30.0,
        observer=Observer(),
    )


NON_FINITE = [
    ("train_loss", math.nan, "nan", ""),
    ("train_loss", math.inf, "inf", ""),
    ("train_loss", -math.inf, "-inf", ""),
    ("accuracy", math.inf, "inf", ""),  # any metric, not only the ones aggregated
    ("per-batch-loss", [0.1, math.nan, 0.3], "nan", " (element 1 of 3)"),
    ("per-batch-loss", [math.inf], "inf", " (element 0 of 1)"),
    ("per-batch-loss", [0.5, 0.25, -math.inf], "-inf", " (element 2 of 3)"),
]


def _assert_only_bad_rejected(rejected, stage, key, shown, where):
    assert len(rejected) == 1, rejected
    r = rejected[0]
    assert (r.node_id, r.stage) == (BAD, stage)
    assert f"metric '{key}' is {shown}{where}: metrics must be finite" in r.reason
    assert str(r).startswith(f"client {BAD} ({stage}): metric '{key}'")  # client, metric, value


@pytest.mark.parametrize(("key", "value", "shown", "where"), NON_FINITE)
def test_a_training_reply_with_a_non_finite_metric_is_rejected_and_the_round_stays_finite(
    grid, key, value, shown, where
):
    bad = json.dumps({key: value})
    result = _train(grid, PlainExchange(), {f"metrics-{BAD - NODES[0]}": bad})
    _assert_only_bad_rejected(result.rejected, "train", key, shown, where)
    # the others count: train_loss = (1*10 + 3*30) / 40, never NaN or Inf
    assert result.num_clients == 2 and result.num_examples == 40
    assert result.metrics["train_loss"] == pytest.approx(2.5)
    assert result.arrays is not None


@pytest.mark.parametrize(
    ("key", "value", "shown", "where"),
    [
        ("eval_loss", math.inf, "inf", ""),
        ("eval_acc", math.nan, "nan", ""),
        ("eval_loss", -math.inf, "-inf", ""),
        ("per-class-acc", [0.5, math.inf], "inf", " (element 1 of 2)"),
    ],
)
def test_an_evaluation_reply_with_a_non_finite_metric_is_rejected(grid, key, value, shown, where):
    result = _evaluate(grid, {f"metrics-{BAD - NODES[0]}": json.dumps({key: value})})
    _assert_only_bad_rejected(result.rejected, "evaluate", key, shown, where)
    assert result.num_clients == 2 and result.num_examples == 40
    assert result.metrics["eval_loss"] == pytest.approx(2.5)
    assert math.isfinite(result.metrics["eval_acc"])


def test_finite_metrics_and_lists_are_accepted(grid):
    ok = json.dumps({"train_loss": 1e300, "per-batch-loss": [0.0, -1e-300, 5.0], "steps": 7})
    result = _train(grid, PlainExchange(), {f"metrics-{BAD - NODES[0]}": ok})
    assert not result.rejected and result.num_clients == 3


# ------------------------------------------------------------------ the reply-size cap


def _uint8_count(target_bytes):
    """Elements of a uint8 array whose Flower ``Array`` serializes to exactly ``target_bytes``."""
    overhead = len(Array(np.zeros(target_bytes, np.uint8)).data) - target_bytes
    count = target_bytes - overhead
    assert len(Array(np.zeros(count, np.uint8)).data) == target_bytes
    return count


def _size_reason(result):
    assert len(result.rejected) == 1 and result.rejected[0].node_id == BAD, result.rejected
    return result.rejected[0].reason


def test_default_cap_is_twice_the_model_plus_one_mib(grid):
    model = _model()
    limit = 2 * sum(len(a.data) for a in model.values()) + 2**20
    pid = BAD - NODES[0]
    over = _train(grid, PlainExchange(), {f"reply-bytes-{pid}": _uint8_count(limit + 1)}, model)
    reason = _size_reason(over)
    assert f"arrays of {limit + 1} bytes exceed the {limit}-byte limit" in reason
    assert "strategy.max-reply-mb" in reason
    # at the cap the reply is read (and then refused for what it is, not for its size)
    at = _train(grid, PlainExchange(), {f"reply-bytes-{pid}": _uint8_count(limit)}, model)
    reason = _size_reason(at)
    assert "max-reply-mb" not in reason and "'w'" in reason and "uint8" in reason
    assert over.num_clients == at.num_clients == 2


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_configured_cap_rejects_one_byte_over_and_accepts_at_or_under(grid, delta):
    """A 1 MiB model (+ its serialization header) against max-reply-mb = size + delta bytes."""
    model = _model((256, 1024))
    size = sum(len(a.data) for a in model.values())
    mb = (size + delta) / 2**20
    exchange = plain_exchange(Config().replace(strategy={"max-reply-mb": mb}))
    assert exchange.max_reply_bytes == size + delta
    result = _train(grid, exchange, {}, model)  # every client echoes the model
    if delta < 0:
        assert result.num_clients == 0 and len(result.rejected) == CLIENTS
        for r in result.rejected:
            assert f"arrays of {size} bytes exceed the {size - 1}-byte limit" in r.reason
            assert "strategy.max-reply-mb" in r.reason
    else:
        assert not result.rejected and result.num_clients == CLIENTS


def test_configured_cap_replaces_the_default(grid):
    model = _model()
    pid = BAD - NODES[0]
    exchange = plain_exchange(Config().replace(strategy={"max-reply-mb": 3.0}))
    # 2.5 MiB: over the default (about 1 MiB here), under the configured 3 MiB
    under = _train(grid, exchange, {f"reply-bytes-{pid}": _uint8_count(5 * 2**19)}, model)
    assert "max-reply-mb" not in _size_reason(under)
    over = _train(grid, exchange, {f"reply-bytes-{pid}": _uint8_count(3 * 2**20 + 1)}, model)
    assert f"exceed the {3 * 2**20}-byte limit (strategy.max-reply-mb" in _size_reason(over)
    default = _train(grid, PlainExchange(), {f"reply-bytes-{pid}": _uint8_count(5 * 2**19)}, model)
    assert "strategy.max-reply-mb" in _size_reason(default)


def test_a_superlink_error_for_a_departed_client_is_charged_to_that_client():
    """The SuperLink answers a message to a client that went away with an error of its own
    (from node id 1): the plain exchange names the client, and does not also count it as
    never replying (issue 10: drops name the client)."""
    from flwr.app import ConfigRecord, Error, Message, RecordDict

    from fedcore.flower_adapter import set_message_id
    from fedcore.serverside.exchange import observed, timeouts

    sent = []
    for node in (1000, 1001):
        m = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
        set_message_id(m, f"{node:032x}")
        sent.append(m)
    # what the SuperLink writes: an error from its own node id, answering client 1001's message
    stand_in = Message(RecordDict(), dst_node_id=1, message_type="train")
    set_message_id(stand_in, sent[1].metadata.message_id)
    from_superlink = Message(Error(0, "Node Unavailable"), reply_to=stand_in)
    assert from_superlink.metadata.src_node_id == 1

    class Quiet:
        def reply_received(self, *_):
            pass

    seen: set[int] = set()
    got = list(observed([from_superlink], Quiet(), 1, "train", seen, sent))
    assert [m.metadata.src_node_id for m in got] == [1001]
    assert got[0].error.reason == "Node Unavailable"
    assert [r.node_id for r in timeouts(sent, seen, "train", 60)] == [1000]  # only the silent one
