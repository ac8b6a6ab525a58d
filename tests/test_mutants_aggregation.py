"""The FedAvg kernel: documented behaviour that mutation testing showed was unchecked.

Each test states a promise of ``fedcore.core.aggregation``'s docstrings: the default
block, float16's float32 products, the float64 route of huge contributions (by
``max|theta| * n * block``), zero-size arrays, the ``finite`` switch, results that keep
their dtype whatever torch's default dtype, no model-sized copy when a float32 result
is formed, a quiet first call, and error messages that say what was wrong.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedcore.core.aggregation import (
    ArraySpec,
    WeightedMean,
    array_view,
    numpy_to_array,
    spec_of,
    weighted_mean,
)
from fedcore.core.errors import AggregationError

U32 = 2.0**-24


def rec(**arrays):
    return ArrayRecord({k: numpy_to_array(np.asarray(v)) for k, v in arrays.items()})


def _exactly(message):
    return "^" + re.escape(message) + "$"


def _exact_mean(values, weights):
    num = sum(np.float64(n) * v.astype(np.float64) for v, n in zip(values, weights))
    return num / sum(weights)


def test_the_default_block_is_32_clients():
    template = spec_of(rec(w=np.zeros(3, np.float32)))
    assert WeightedMean(template).block == 32
    # weighted_mean uses the same default: with 33 clients the 33rd falls in a second
    # block, whose float32 rounding differs from one block of 33
    g = np.random.default_rng(1)
    replies = [
        (rec(w=g.normal(0, 1, 2000).astype(np.float32)), int(n)) for n in g.integers(1, 50, 33)
    ]
    acc = WeightedMean(spec_of(replies[0][0]), block=32)
    for r, n in replies:
        acc.add(r, n)
    expected = acc.result()["w"].numpy()
    assert np.array_equal(weighted_mean(replies)["w"].numpy(), expected)
    other = WeightedMean(spec_of(replies[0][0]), block=33)
    for r, n in replies:
        other.add(r, n)
    assert not np.array_equal(other.result()["w"].numpy(), expected)  # the check can fail


@pytest.mark.parametrize("block", [1, 2, 32])
def test_float16_is_weighted_in_float32_within_the_documented_bound(block):
    """float16 products are float32 (widened before the multiply), then one final rounding."""
    g = np.random.default_rng(2)
    values = [g.normal(0, 1, 20000).astype(np.float16) for _ in range(3)]
    weights = [3, 7, 5]
    out = weighted_mean([(rec(w=v), n) for v, n in zip(values, weights)], block=block)["w"]
    got = out.numpy()
    assert got.dtype == np.float16
    exact = _exact_mean(values, weights)
    scale = sum(n * np.abs(v.astype(np.float64)) for v, n in zip(values, weights)) / sum(weights)
    half_ulp = np.spacing(np.abs(got).astype(np.float16)).astype(np.float64) / 2
    assert np.all(np.abs(got.astype(np.float64) - exact) <= block * U32 * scale + half_ulp)


def test_huge_contributions_with_large_weights_go_to_float64():
    """The route is chosen by max|theta| * n * block: a weight of 200 makes 3e36 overflow."""
    g = np.random.default_rng(3)
    values = [(g.uniform(-1, 1, 64) * 3e36).astype(np.float32) for _ in range(3)]
    weights = [200, 100, 300]
    got = weighted_mean([(rec(w=v), n) for v, n in zip(values, weights)])["w"].numpy()
    assert np.all(np.isfinite(got))
    exact = _exact_mean(values, weights)
    assert np.all(np.abs(got - exact) <= 1e-6 * np.max(np.abs(exact)))


def test_zero_size_arrays_are_averaged():
    empty = np.zeros((0, 3), np.float32)
    assert array_view(numpy_to_array(empty)).shape == (0, 3)
    replies = [(rec(w=empty, b=np.float32([1.0])), 1), (rec(w=empty, b=np.float32([4.0])), 2)]
    out = weighted_mean(replies)
    assert out["w"].numpy().shape == (0, 3) and out["b"].numpy().tolist() == [3.0]


def test_check_refuses_nan_by_default_and_finite_false_skips_the_read():
    template = spec_of(rec(w=np.zeros(2, np.float32)))
    bad = rec(w=np.float32([1.0, np.nan]))
    with pytest.raises(AggregationError, match=_exactly("array 'w' contains NaN or Inf")):
        WeightedMean(template).check(bad)
    # finite=False: the caller has refused NaN/Inf already, so the kernel does not read
    # the data again (a NaN it was promised is not there goes straight into the sum)
    acc = WeightedMean(template)
    acc.add(bad, 1, finite=False)
    assert np.isnan(acc.result()["w"].numpy()[1])


def test_results_keep_their_dtype_whatever_torchs_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # a user's training code may do this
    try:
        replies = [(rec(w=np.float32([1.0, 2.0])), 1), (rec(w=np.float32([4.0, 8.0])), 2)]
        out = weighted_mean(replies)["w"]
    finally:
        torch.set_default_dtype(before)
    assert out.dtype == "float32"
    assert out.numpy().dtype == np.float32 and out.numpy().tolist() == [3.0, 6.0]


def test_a_float32_result_is_formed_without_a_model_sized_copy():
    """The mean is written over the block buffer: forming it costs one payload, not two."""
    n = 1 << 20
    template = spec_of(rec(w=np.zeros(n, np.float32)))
    acc = WeightedMean(template)
    for i in range(3):
        acc.add(rec(w=np.full(n, i, np.float32)), 1)
    tracemalloc.start()
    try:
        out = acc.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["w"].numpy()[0] == 1.0
    assert peak < 1.5 * 4 * n, f"forming the result peaked at {peak} bytes for a {4 * n}-byte model"


def test_the_first_call_in_a_process_is_quiet():
    """torch warns once per process about read-only arrays; the kernel keeps it quiet."""
    code = textwrap.dedent(
        """
        import warnings
        import numpy as np
        from flwr.app import ArrayRecord
        from fedcore.core.aggregation import numpy_to_array, weighted_mean
        warnings.simplefilter("error")  # after the imports: only the kernel's calls count
        r = lambda v: ArrayRecord({"w": numpy_to_array(np.float32(v))})
        print(weighted_mean([(r([1, 2]), 1), (r([4, 8]), 2)])["w"].numpy().tolist())
        print(weighted_mean([(r([2, 2]), 1), (r([5, 8]), 2)])["w"].numpy().tolist())
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # ... and a fresh process computes what this one does
    here = [
        weighted_mean([(rec(w=np.float32(a)), 1), (rec(w=np.float32(b)), 2)])["w"].numpy()
        for a, b in [([1, 2], [4, 8]), ([2, 2], [5, 8])]
    ]
    assert (
        done.stdout.split("\n")[:2]
        == [str(h.tolist()) for h in here]
        == [
            "[3.0, 6.0]",
            "[4.0, 6.0]",
        ]
    )


def test_errors_say_what_was_wrong():
    template = spec_of(rec(w=np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match=_exactly("block must be >= 1")):
        WeightedMean(template, block=0)
    with pytest.raises(AggregationError, match=_exactly("no contributions to average")):
        weighted_mean([])
    with pytest.raises(AggregationError, match=_exactly("no contributions to average")):
        WeightedMean(template).result()
    acc = WeightedMean(template)
    acc.add(rec(w=np.float32([1, 2])), 1)
    acc.result()
    with pytest.raises(
        AggregationError, match=_exactly("result() was already taken from this accumulator")
    ):
        acc.result()
    with pytest.raises(
        AggregationError, match=_exactly("cannot add to an accumulator whose result was taken")
    ):
        acc.add(rec(w=np.float32([1, 2])), 1)


def _payload(data: bytes) -> Array:
    return Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)


def test_malformed_payloads_are_refused_with_what_was_found():
    good = numpy_to_array(np.zeros(4, np.float32)).data
    with pytest.raises(AggregationError, match=_exactly("array payload is not a .npy buffer")):
        array_view(_payload(b"junk" * 8))
    # cut right after the magic, before the version bytes
    with pytest.raises(AggregationError, match="^malformed .npy header"):
        array_view(_payload(good[:6]))
    with pytest.raises(
        AggregationError, match=_exactly("array payload has 12 bytes, header says 16")
    ):
        array_view(_payload(good[:-4]))
    complex_ = numpy_to_array(np.zeros(2, np.complex64))
    with pytest.raises(AggregationError, match="unsupported array layout or dtype complex64"):
        array_view(complex_)


def test_a_later_reply_is_checked_as_fully_as_the_first_one():
    """The header fast path (a header seen before is not parsed again) keeps every check."""
    good = numpy_to_array(np.ones(4, np.float32)).data
    acc = WeightedMean({"w": ArraySpec((4,), "float32")})
    acc.add(ArrayRecord({"w": _payload(good)}), 1)  # validated in full: its header is known now
    for bad, why in (
        (good + b"\0" * 4, "array payload has 20 bytes, header says 16"),  # known header, longer
        (good[:-4], "array payload has 12 bytes, header says 16"),  # known header, shorter
        (numpy_to_array(np.ones(5, np.float32)).data, "array 'w' is float32[5]"),
        (numpy_to_array(np.ones(4, np.float64)).data, "array 'w' is float64[4]"),
        # the same total length as a good payload, another header: never taken for it
        (numpy_to_array(np.ones((2, 2), np.float32)).data, "array 'w' is float32[2, 2]"),
        (numpy_to_array(np.ones(4, np.int32)).data, "array 'w' is int32[4]"),
    ):
        with pytest.raises(AggregationError, match=re.escape(why)):
            acc.add(ArrayRecord({"w": _payload(bad)}), 1)
    nan = numpy_to_array(np.array([1, np.nan, 1, 1], np.float32)).data  # the known header
    with pytest.raises(AggregationError, match="contains NaN or Inf"):
        acc.add(ArrayRecord({"w": _payload(nan)}), 1)
    acc.add(ArrayRecord({"w": _payload(numpy_to_array(np.full(4, 3, np.float32)).data)}), 1)
    assert acc.count == 2 and acc.result()["w"].numpy().tolist() == [2.0, 2.0, 2.0, 2.0]


def test_integer_buffers_of_every_width_are_weighted_then_rounded():
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint8):
        replies = [(rec(b=np.array([1, 10], dtype)), 1), (rec(b=np.array([2, 20], dtype)), 2)]
        out = weighted_mean(replies)["b"].numpy()
        # (1*1 + 2*2)/3 = 1.67 -> 2 ; (10 + 40)/3 = 16.67 -> 17
        assert out.dtype == dtype and out.tolist() == [2, 17], dtype
