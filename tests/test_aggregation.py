"""The streaming FedAvg kernel: hand-checkable cases and Flower's own FedAvg as oracle."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.core.aggregation import (
    WeightedMean,
    array_view,
    numpy_to_array,
    spec_of,
    weighted_mean,
)
from fedcore.core.errors import AggregationError
from fedcore.serverside.pools import aggregation_pool


def rec(**arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def test_hand_computed_weighted_mean():
    a = rec(w=np.array([1.0, 2.0], np.float32), b=np.array([[0.0]], np.float32))
    b = rec(w=np.array([4.0, 8.0], np.float32), b=np.array([[3.0]], np.float32))
    out = weighted_mean([(a, 1), (b, 2)])
    # (1*[1,2] + 2*[4,8]) / 3 = [3, 6];  (1*0 + 2*3) / 3 = 2
    assert out["w"].numpy().tolist() == [3.0, 6.0]
    assert out["b"].numpy().tolist() == [[2.0]]
    assert out["w"].numpy().dtype == np.float32


def test_equal_weights_is_plain_mean_and_single_client_is_identity():
    x = np.array([0.1, -7.25, 3e5], np.float32)
    assert np.array_equal(weighted_mean([(rec(w=x), 17)])["w"].numpy(), x)
    out = weighted_mean([(rec(w=np.float32([1, 3])), 5), (rec(w=np.float32([3, 5])), 5)])
    assert out["w"].numpy().tolist() == [2.0, 4.0]


def test_integer_buffers_are_weighted_then_rounded_half_to_even():
    # BatchNorm's num_batches_tracked: (1*10 + 1*11)/2 = 10.5 -> 10 (half to even)
    a = rec(n=np.array(10, np.int64))
    b = rec(n=np.array(11, np.int64))
    out = weighted_mean([(a, 1), (b, 1)])["n"].numpy()
    assert out.dtype == np.int64 and int(out) == 10
    out = weighted_mean([(a, 1), (b, 3)])["n"].numpy()  # 10.75 -> 11
    assert int(out) == 11


def _flower_oracle(arrays_list, weights):
    replies = [
        RecordDict({"arrays": a, "metrics": MetricRecord({"num-examples": w})})
        for a, w in zip(arrays_list, weights, strict=True)
    ]
    return aggregate_arrayrecords(replies, "num-examples")


@pytest.mark.property
@settings(max_examples=50, deadline=None)
@given(
    n_clients=st.integers(1, 40),
    size=st.integers(1, 300),
    block=st.sampled_from([1, 3, 16, 64]),
    seed=st.integers(0, 2**31),
)
def test_matches_flower_fedavg(n_clients, size, block, seed):
    g = np.random.default_rng(seed)
    arrays = [
        rec(w=g.normal(0, 3, size).astype(np.float32), b=g.normal(0, 1, (2, 3)).astype(np.float32))
        for _ in range(n_clients)
    ]
    weights = [int(w) for w in g.integers(1, 10_000, n_clients)]
    ours = weighted_mean(zip(arrays, weights, strict=True), block=block)
    oracle = _flower_oracle(arrays, weights)
    exact = {
        k: sum(np.float64(w) * array_view(a[k]).astype(np.float64) for a, w in zip(arrays, weights))
        / sum(weights)
        for k in ("w", "b")
    }
    for key in ("w", "b"):
        mag = sum(
            w * np.abs(array_view(a[key]).astype(np.float64)) for a, w in zip(arrays, weights)
        ) / sum(weights)
        np.testing.assert_allclose(ours[key].numpy(), oracle[key].numpy(), rtol=1e-5, atol=1e-5)
        # documented bound: (block - 1) * u32 * mean|x| + half an ulp of float32
        bound = (max(block, 1)) * 2.0**-24 * mag + np.abs(exact[key]) * 2.0**-24 + 1e-30
        assert np.all(np.abs(ours[key].numpy().astype(np.float64) - exact[key]) <= bound)


def test_float64_block_1_is_at_least_as_close_as_flower():
    g = np.random.default_rng(0)
    arrays = [rec(w=(g.normal(0, 1, 10_000) + 1000).astype(np.float32)) for _ in range(200)]
    weights = [int(w) for w in g.integers(1, 10**6, 200)]
    exact = sum(
        np.float64(w) * array_view(a["w"]).astype(np.float64) for a, w in zip(arrays, weights)
    ) / sum(weights)
    ours = weighted_mean(zip(arrays, weights), block=1)["w"].numpy().astype(np.float64)
    flower = _flower_oracle(arrays, weights)["w"].numpy().astype(np.float64)
    assert np.max(np.abs(ours - exact)) <= np.max(np.abs(flower - exact))


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (rec(w=np.zeros(3, np.float32)), "missing ['b']"),
        (
            rec(w=np.zeros(2, np.float32), b=np.zeros(1, np.float32), c=np.zeros(1, np.float32)),
            "extra ['c']",
        ),
        (rec(w=np.zeros(3, np.float32), b=np.zeros(1, np.float32)), "float32[3]"),
        (rec(w=np.zeros(2, np.float64), b=np.zeros(1, np.float32)), "float64[2]"),
        (rec(w=np.array([0, np.nan], np.float32), b=np.zeros(1, np.float32)), "NaN or Inf"),
        (rec(w=np.array([np.inf, 0], np.float32), b=np.zeros(1, np.float32)), "NaN or Inf"),
    ],
)
def test_bad_contribution_is_refused_and_leaves_the_sum_unchanged(bad, fragment):
    good = rec(w=np.float32([1, 2]), b=np.float32([3]))
    acc = WeightedMean(spec_of(good))
    acc.add(good, 2)
    with pytest.raises(AggregationError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        acc.add(bad, 5)
    assert acc.count == 1 and acc.total_weight == 2
    assert acc.result()["w"].numpy().tolist() == [1.0, 2.0]


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_bad_weight_is_refused(weight):
    good = rec(w=np.float32([1, 2]))
    with pytest.raises(AggregationError, match="positive finite"):
        WeightedMean(spec_of(good)).add(good, weight)


def test_finite_array_that_overflows_a_float32_sum_is_accepted():
    big = rec(w=np.full(4, 3e38, np.float32))
    out = weighted_mean([(big, 1), (big, 1)])
    assert np.allclose(out["w"].numpy(), 3e38)


def test_malformed_npy_payload_is_refused():
    good = numpy_to_array(np.zeros(4, np.float32))
    truncated = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=good.data[:-4])
    with pytest.raises(AggregationError, match="bytes"):
        array_view(truncated)
    with pytest.raises(AggregationError, match="not a .npy"):
        array_view(Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"junk" * 8))
    obj = Array(np.array([1, 2], dtype=np.int64))
    assert array_view(obj).tolist() == [1, 2]


def test_streaming_keeps_no_reference_to_replies():
    """Memory is O(model): the accumulator must not hold on to any reply."""
    template = rec(w=np.zeros(1000, np.float32))
    acc = WeightedMean(spec_of(template))
    refs = []
    for i in range(20):
        r = rec(w=np.full(1000, i, np.float32))
        refs.append(weakref.ref(r))
        acc.add(r, 1)
        del r
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert float(acc.result()["w"].numpy()[0]) == pytest.approx(9.5)


def test_result_is_taken_once():
    good = rec(w=np.float32([1]))
    acc = WeightedMean(spec_of(good))
    acc.add(good, 1)
    acc.result()
    with pytest.raises(AggregationError):
        acc.result()


@pytest.mark.parametrize("huge_at", [(0,), (1,), (2,), (0, 1), (1, 2, 4), (4,)])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_huge_contributions_go_to_float64_without_disturbing_the_blocks(huge_at, block):
    g = np.random.default_rng(0)
    vals = [g.normal(0, 1, 8).astype(np.float32) for _ in range(5)]
    for i in huge_at:
        vals[i] = (vals[i] * 1e36).astype(np.float32)  # * weight * block > 1e37
    weights = [3, 1, 4, 1, 5]
    out = weighted_mean([(rec(w=v), n) for v, n in zip(vals, weights)], block=block)["w"].numpy()
    exact = sum(np.float64(n) * v.astype(np.float64) for v, n in zip(vals, weights)) / sum(weights)
    scale = sum(n * np.abs(v.astype(np.float64)) for v, n in zip(vals, weights)) / sum(weights)
    assert np.all(np.isfinite(out))
    assert np.all(np.abs(out - exact) <= 1e-6 * scale)


def _threaded_inputs(seed: int) -> list[tuple[ArrayRecord, float]]:
    """Replies whose big arrays are split over threads (sizes not multiples of a chunk)."""
    rng = np.random.default_rng(seed)
    big = (1 << 18) + 12_345  # above the split threshold, not a multiple of the chunk
    out = []
    for i in range(7):
        arrays = {
            "w32": rng.standard_normal(big).astype(np.float32),
            "w16": rng.standard_normal(big).astype(np.float16),
            "w64": rng.standard_normal(big),
            "count": np.array(rng.integers(0, 1000), dtype=np.int64),
            "small": rng.standard_normal(10).astype(np.float32),
        }
        if i == 3:  # a contribution that goes to float64 (it could overflow a float32 block)
            arrays["w32"][17] = np.float32(3e37)
        out.append((ArrayRecord({k: Array(v) for k, v in arrays.items()}), float(i + 1)))
    return out


@pytest.mark.parametrize("block", [1, 3, 32])
def test_any_number_of_threads_gives_bit_identical_results(block):
    replies = _threaded_inputs(seed=block)
    results = []
    for threads in (1, 2, 3, 4):
        pool = aggregation_pool(threads)
        assert (pool.threads if pool else 1) == threads
        acc = WeightedMean(spec_of(replies[0][0]), block=block, pool=pool)
        for arrays, n in replies:
            acc.add(arrays, n)
        results.append({k: v.numpy() for k, v in acc.result().items()})
    for other in results[1:]:
        for name, value in results[0].items():
            assert value.dtype == other[name].dtype
            assert value.tobytes() == other[name].tobytes(), name
    # and the threads computed the right thing: against a float64 reference
    total = sum(n for _, n in replies)
    ref = sum(n * a["w64"].numpy() for a, n in replies) / total
    np.testing.assert_allclose(results[-1]["w64"], ref, rtol=1e-12, atol=1e-14)


def test_a_nan_in_a_slice_another_thread_checks_is_refused():
    replies = _threaded_inputs(seed=0)
    acc = WeightedMean(spec_of(replies[0][0]), pool=aggregation_pool(2))
    acc.add(*replies[0])
    bad = {k: v.numpy().copy() for k, v in replies[1][0].items()}
    bad["w32"][-5] = np.nan  # in the last slice: checked by a pool thread
    with pytest.raises(AggregationError, match="'w32' contains NaN"):
        acc.add(ArrayRecord({k: Array(v) for k, v in bad.items()}), 1.0)
    acc.add(*replies[1])
    again = WeightedMean(spec_of(replies[0][0]))
    again.add(*replies[0])
    again.add(*replies[1])
    # the refused reply changed nothing: the sums equal those of the two good replies
    got, want = acc.result(), again.result()
    for name, value in got.items():
        assert value.numpy().tobytes() == want[name].numpy().tobytes(), name


@pytest.mark.parametrize("module", ["fedcore.core.aggregation", "fedcore.serverside.pools"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
