"""Reply validation in the plain exchange: the count's edges and what robust strategies get.

Mutation testing of ``num_examples_of`` and ``PlainExchange.aggregate`` found unchecked:
a whole float count (``5.0``) is read as the integer it is; zero is refused; the cap is
inclusive; the refusal of a non-finite metric is worded in full; and what a non-linear
strategy (``individual=True``) or SCAFFOLD (``summed`` extras) receives: one update per
counted client (trained minus global, float64), its scalar metrics, and the weighted
mean of the extras in float64; by default no individual replies are kept.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcore.core.aggregation import spec_of, weighted_mean
from fedcore.core.errors import ReplyError
from fedcore.serverside.exchange import PlainExchange, num_examples_of
from fedcore.serverside.strategies import FedAvg

GLOBAL = ArrayRecord({"w": Array(np.zeros(3, np.float32))})


def _instructions(n):
    return FedAvg(seed=0).configure_train(1, GLOBAL, ConfigRecord(), list(range(10, 10 + n)))


def _reply(to, value, metrics, extra=None):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
            "metrics": MetricRecord(metrics),
        }
    )
    if extra is not None:
        content["cv"] = ArrayRecord({"c": Array(np.asarray(extra, np.float32))})
    return Message(content, reply_to=to)


def test_a_whole_float_count_is_read_as_the_integer():
    (to,) = _instructions(1)
    metrics, n = num_examples_of(_reply(to, 1.0, {"num-examples": 5.0}), "train")
    assert n == 5 and type(n) is int
    assert metrics["num-examples"] == 5.0


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_a_count_that_is_not_positive_and_whole_is_refused(n):
    (to,) = _instructions(1)
    with pytest.raises(ReplyError) as info:
        num_examples_of(_reply(to, 1.0, {"num-examples": n}), "train")
    assert info.value.reason == f"'num-examples' must be a positive integer, got {n!r}"


def test_the_example_cap_is_inclusive():
    (to,) = _instructions(1)
    assert num_examples_of(_reply(to, 1.0, {"num-examples": 5}), "train", max_examples=5)[1] == 5
    with pytest.raises(ReplyError) as info:
        num_examples_of(_reply(to, 1.0, {"num-examples": 6}), "train", max_examples=5)
    assert info.value.reason == "'num-examples' = 6 exceeds the configured cap 5"


def test_a_non_finite_metric_is_refused_in_full_words():
    (to,) = _instructions(1)
    with pytest.raises(ReplyError) as info:
        num_examples_of(_reply(to, 1.0, {"num-examples": 5, "loss": math.inf}), "evaluate")
    assert info.value.reason == (
        "metric 'loss' is inf: metrics must be finite numbers (one NaN or Inf would poison "
        "the round's weighted mean); the client's evaluate diverged or reports a broken value"
    )


def test_individual_replies_are_kept_only_when_asked_for():
    msgs = _instructions(3)
    replies = [
        _reply(msgs[0], 1.0, {"num-examples": 1, "train_loss": 0.5, "steps": [1, 2]}),
        _reply(msgs[1], 4.0, {"num-examples": 3, "train_loss": 0.25}),
        _reply(msgs[2], 9.0, {"num-examples": 0}),  # rejected: not counted, not kept
    ]
    assert PlainExchange().aggregate(replies, arrays=GLOBAL).replies is None
    agg = PlainExchange().aggregate(replies, arrays=GLOBAL, individual=True)
    assert [(u.node_id, u.num_examples) for u in agg.replies] == [
        (msgs[0].metadata.dst_node_id, 1),
        (msgs[1].metadata.dst_node_id, 3),
    ]
    first, second = agg.replies
    assert first.update["w"].dtype == np.float64 and first.update["w"].tolist() == [1.0] * 3
    assert second.update["w"].tolist() == [4.0] * 3
    # scalar metrics only: no num-examples, no lists
    assert first.metrics == {"train_loss": 0.5} and second.metrics == {"train_loss": 0.25}
    assert [r.node_id for r in agg.rejected] == [msgs[2].metadata.dst_node_id]


def test_the_aggregate_carries_the_mean_its_update_and_the_summed_extras():
    msgs = _instructions(2)
    replies = [
        _reply(msgs[0], 1.0, {"num-examples": 1}, extra=[2.0, 0.0]),
        _reply(msgs[1], 4.0, {"num-examples": 3}, extra=[6.0, 4.0]),
    ]
    summed = {"cv": spec_of(ArrayRecord({"c": Array(np.zeros(2, np.float32))}))}
    exchange = PlainExchange(accumulation_block=1)
    agg = exchange.aggregate(replies, arrays=GLOBAL, summed=summed)
    assert agg.mean["w"].numpy().tolist() == [3.25] * 3  # (1*1 + 3*4) / 4
    assert dict(agg.update)["w"].tolist() == [3.25] * 3  # mean - global (global is 0)
    assert agg.extras["cv"]["c"].dtype == np.float64
    assert agg.extras["cv"]["c"].tolist() == [5.0, 3.0]  # (1*2 + 3*6) / 4, (0 + 3*4) / 4
    assert (agg.total_weight, agg.num_clients) == (4, 2)


def test_the_exchange_sums_in_blocks_of_its_configured_size():
    g = np.random.default_rng(4)
    msgs = _instructions(40)
    values = [g.normal(0, 1, 3).astype(np.float32) for _ in msgs]
    replies = []
    for m, v in zip(msgs, values):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(v)}),
                "metrics": MetricRecord({"num-examples": 7}),
                "cv": ArrayRecord({"c": Array(v)}),
            }
        )
        replies.append(Message(content, reply_to=m))
    summed = {"cv": spec_of(ArrayRecord({"c": Array(np.zeros(3, np.float32))}))}

    def mean(block):
        agg = PlainExchange(accumulation_block=block).aggregate(
            replies, arrays=GLOBAL, summed=summed
        )
        return agg.mean["w"].numpy(), agg.extras["cv"]["c"]

    expected = weighted_mean([(ArrayRecord({"w": Array(v)}), 7) for v in values], block=1)
    one, one_cv = mean(1)
    assert np.array_equal(one, expected["w"].numpy())
    assert np.array_equal(one_cv.astype(np.float32), one)
    default, default_cv = mean(32)
    assert not np.array_equal(one, default)  # the block size shows in the last bits
    assert not np.array_equal(one_cv, default_cv)


def test_summed_extras_get_their_own_allowance_under_a_configured_cap():
    (to,) = _instructions(1)
    model_bytes = 3 * 4
    reply = _reply(to, 1.0, {"num-examples": 2}, extra=[1.0] * 64)
    summed = {"cv": spec_of(ArrayRecord({"c": Array(np.zeros(64, np.float32))}))}
    agg = PlainExchange(max_reply_bytes=model_bytes).aggregate(
        [reply], arrays=GLOBAL, summed=summed
    )
    assert agg.num_clients == 1 and not agg.rejected


def test_a_reply_with_other_array_records_is_rejected_naming_them():
    (to,) = _instructions(1)
    reply = _reply(to, 1.0, {"num-examples": 2}, extra=[1.0])
    agg = PlainExchange().aggregate([reply], arrays=GLOBAL)
    (rejection,) = agg.rejected
    assert (rejection.node_id, rejection.stage) == (to.metadata.dst_node_id, "train")
    assert rejection.reason == "expected ArrayRecords ['arrays'], found ['arrays', 'cv']"
