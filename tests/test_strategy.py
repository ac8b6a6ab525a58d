"""FedAvg and the plain exchange on hand-built replies, against Flower's own FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedcore.serverside.exchange import PlainExchange
from fedcore.serverside.strategies import FedAvg, Sampling

NODES = [11, 12, 13, 14]


class _Result:
    """The next model and the aggregate it came from (``arrays`` None: nobody counted)."""

    def __init__(self, strategy, replies, exchange=None):
        template = _global()
        agg = (exchange or PlainExchange()).aggregate(replies, arrays=template)
        self.arrays = strategy.server_update(1, template, agg) if agg.update is not None else None
        self.num_clients, self.num_examples = agg.num_clients, agg.total_weight
        self.metrics, self.rejected = agg.metrics, agg.rejected


def _global():
    return ArrayRecord({"w": Array(np.zeros(4, np.float32)), "n": Array(np.array(0, np.int64))})


def _reply(to: Message, w, n, *, loss=0.5, arrays=None, metrics=None):
    arrays = arrays or ArrayRecord(
        {"w": Array(np.asarray(w, np.float32)), "n": Array(np.array(3, np.int64))}
    )
    metrics = metrics or MetricRecord({"train_loss": loss, "num-examples": n})
    msg = Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=to)
    return msg


def _train_msgs(strategy):
    return strategy.configure_train(1, _global(), ConfigRecord({"lr": 0.1}), NODES)


def test_configure_train_sends_arrays_and_round_to_every_sampled_node():
    msgs = _train_msgs(FedAvg(seed=0))
    assert [m.metadata.dst_node_id for m in msgs] == NODES
    assert all(m.metadata.message_type == MessageType.TRAIN for m in msgs)
    cfg = msgs[0].content.config_records["config"]
    assert cfg["server-round"] == 1 and cfg["lr"] == 0.1


def test_aggregate_train_hand_computed_and_matches_flower():
    ours = FedAvg(seed=0)
    msgs = _train_msgs(ours)
    values = [[1, 2, 3, 4], [2, 2, 2, 2], [0, 0, 0, 8], [4, 3, 2, 1]]
    sizes = [10, 30, 20, 40]
    replies = [
        _reply(m, v, n, loss=float(i)) for i, (m, v, n) in enumerate(zip(msgs, values, sizes))
    ]
    result = _Result(ours, iter(replies))
    expected = sum(np.float64(n) * np.array(v, np.float64) for v, n in zip(values, sizes)) / 100
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, rtol=1e-7)
    assert result.num_clients == 4 and result.num_examples == 100 and not result.rejected
    # train_loss is example-weighted: (0*10 + 1*30 + 2*20 + 3*40) / 100 = 1.9
    assert result.metrics["train_loss"] == pytest.approx(1.9)

    flower_arrays, flower_metrics = FlowerFedAvg().aggregate_train(1, replies)
    np.testing.assert_allclose(result.arrays["w"].numpy(), flower_arrays["w"].numpy(), rtol=1e-6)
    assert result.metrics["train_loss"] == pytest.approx(flower_metrics["train_loss"])


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [
        (lambda m: Message(Error(2, "boom"), reply_to=m), "client reported an error: boom"),
        (lambda m: _reply(m, [1, 1, 1, 1], 0), "positive integer"),
        (lambda m: _reply(m, [1, 1, 1, 1], -3), "positive integer"),
        (lambda m: _reply(m, [1, 1, 1, 1], 2.5), "positive integer"),
        (lambda m: _reply(m, [1, 1, 1], 5), "float32[3]"),
        (lambda m: _reply(m, [np.nan, 1, 1, 1], 5), "NaN or Inf"),
        (
            lambda m: _reply(m, None, 5, arrays=ArrayRecord({"w": Array(np.zeros(4, np.float32))})),
            "missing ['n']",
        ),
        (
            lambda m: _reply(m, [1, 1, 1, 1], 5, metrics=MetricRecord({"train_loss": 1.0})),
            "positive integer",
        ),
    ],
)
def test_a_bad_reply_is_rejected_alone_with_a_reason(make_bad, reason):
    s = FedAvg(seed=0)
    msgs = _train_msgs(s)
    replies = [
        _reply(msgs[0], [1, 1, 1, 1], 10),
        make_bad(msgs[1]),
        _reply(msgs[2], [3, 3, 3, 3], 10),
    ]
    bad_src = replies[1].metadata.src_node_id
    result = _Result(s, replies)
    assert result.num_clients == 2
    assert result.arrays["w"].numpy().tolist() == [2.0, 2.0, 2.0, 2.0]
    assert len(result.rejected) == 1
    assert result.rejected[0].node_id == bad_src == NODES[1]
    assert reason in result.rejected[0].reason


def test_no_valid_reply_gives_no_new_model():
    s = FedAvg(seed=0)
    msgs = _train_msgs(s)
    result = _Result(s, [Message(Error(2, "x"), reply_to=msgs[0])])
    assert result.arrays is None and result.num_clients == 0 and len(result.rejected) == 1


def test_max_examples_cap():
    s = FedAvg(seed=0)
    msgs = _train_msgs(s)
    result = _Result(
        s,
        [_reply(msgs[0], [1, 1, 1, 1], 101), _reply(msgs[1], [1, 1, 1, 1], 5)],
        PlainExchange(max_examples=100),
    )
    assert result.num_clients == 1 and "cap 100" in result.rejected[0].reason


def test_evaluate_metrics_are_example_weighted():
    s = FedAvg(seed=0)
    msgs = s.configure_evaluate(1, _global(), ConfigRecord(), NODES[:2])
    replies = [
        Message(
            RecordDict({"metrics": MetricRecord({"eval_acc": 1.0, "num-examples": 1})}),
            reply_to=msgs[0],
        ),
        Message(
            RecordDict({"metrics": MetricRecord({"eval_acc": 0.0, "num-examples": 3})}),
            reply_to=msgs[1],
        ),
    ]
    result = PlainExchange().aggregate_evaluate(replies)
    assert result.metrics["eval_acc"] == pytest.approx(0.25) and result.num_examples == 4


def test_fraction_and_minimum_sampling_is_seeded():
    half = Sampling(fraction_train=0.5, min_train_clients=1)
    a = FedAvg(seed=1, sampling=half)
    b = FedAvg(seed=1, sampling=half)
    ids = list(range(100))
    pick = lambda s, r: [
        m.metadata.dst_node_id for m in s.configure_train(r, _global(), ConfigRecord(), ids)
    ]
    assert pick(a, 3) == pick(b, 3) and len(pick(a, 3)) == 50
    assert pick(a, 3) != pick(a, 4)
