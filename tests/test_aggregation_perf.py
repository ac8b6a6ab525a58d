"""The optimized weighted-mean kernel: its documented precision bound, block edges,
validation without side effects, header parsing, threads, and O(model) buffers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

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


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: numpy_to_array(v) for k, v in arrays.items()})


def _clients(rng, n, shapes, dtype=np.float32, scale=1.0):
    out = []
    for _ in range(n):
        arrays = {k: (scale * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
        out.append((arrays, int(rng.integers(1, 1000))))
    return out


def _aggregate(clients, block, finite=True):
    acc = WeightedMean(spec_of(_record(clients[0][0])), block=block)
    for arrays, n in clients:
        acc.add(_record(arrays), n, finite=finite)
    return acc.result()


def _exact(clients):
    """Weighted mean with every product and sum in float64 (no float32 rounding)."""
    total = sum(n for _, n in clients)
    return {
        k: sum(n * a[k].astype(np.float64) for a, n in clients) / total for k in clients[0][0]
    }


def _magnitude(clients):
    total = sum(n for _, n in clients)
    return {
        k: sum(n * np.abs(a[k].astype(np.float64)) for a, n in clients) / total
        for k in clients[0][0]
    }


def test_hand_computable_mean():
    a = _record({"w": np.array([1.0, 2.0], np.float32), "b": np.array([3], np.int64)})
    b = _record({"w": np.array([4.0, 8.0], np.float32), "b": np.array([6], np.int64)})
    out = weighted_mean([(a, 1), (b, 2)])
    assert out["w"].numpy().tolist() == [3.0, 6.0]  # (1*[1,2] + 2*[4,8]) / 3
    assert out["b"].numpy().tolist() == [5]  # (3 + 12) / 3


SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (3, 70_000)}


@pytest.mark.parametrize("block", [1, 3, 32])
@pytest.mark.parametrize("n_clients", [1, 2, 3, 4, 7, 33, 70])
def test_every_block_edge_is_within_the_documented_bound(block, n_clients):
    # 70_000 * 3 elements: several flush/result chunks, and a partial last chunk
    rng = np.random.default_rng(block * 100 + n_clients)
    clients = _clients(rng, n_clients, SHAPES)
    out = _aggregate(clients, block)
    exact, mag = _exact(clients), _magnitude(clients)
    for k, ref in exact.items():
        got = out[k].numpy()
        assert got.dtype == np.float32 and got.shape == ref.shape
        bound = min(block, n_clients) * U32 * mag[k] * (1 + 1e-6) + np.spacing(
            np.abs(ref).astype(np.float32)
        )
        assert np.all(np.abs(got - ref) <= bound), k


def test_bound_holds_on_adversarial_magnitudes_and_beats_a_float32_running_sum():
    # values spanning six orders of magnitude with random signs, weights 1..1000:
    # cancellation makes float32 running sums lose most digits
    rng = np.random.default_rng(7)
    clients = []
    for _ in range(400):
        mags = 10.0 ** rng.uniform(-3, 3, size=2_000)
        arr = (mags * rng.choice([-1.0, 1.0], size=2_000)).astype(np.float32)
        clients.append(({"w": arr}, int(rng.integers(1, 1000))))
    exact, mag = _exact(clients)["w"], _magnitude(clients)["w"]
    ours = _aggregate(clients, block=32)["w"].numpy().astype(np.float64)
    bound = 32 * U32 * mag + np.spacing(np.abs(exact).astype(np.float32))
    assert np.all(np.abs(ours - exact) <= bound)
    replies = [
        RecordDict({"arrays": _record(a), "metrics": MetricRecord({"num-examples": n})})
        for a, n in clients
    ]
    flower = aggregate_arrayrecords(replies, "num-examples")["w"].numpy().astype(np.float64)
    ours_err, flower_err = np.abs(ours - exact), np.abs(flower - exact)
    # Flower is the oracle for the value, fedcore for the precision
    assert np.all(np.abs(ours - flower) <= 400 * U32 * mag + bound)
    assert ours_err.mean() < flower_err.mean() / 3
    assert ours_err.max() < flower_err.max()


def test_validation_does_not_change_the_result():
    rng = np.random.default_rng(3)
    clients = _clients(rng, 40, SHAPES)
    a = _aggregate(clients, 32, finite=True)
    b = _aggregate(clients, 32, finite=False)
    assert all(a[k].data == b[k].data for k in a)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", [0, 2, 3, 5])  # block=4: 3 closes a block, 0 opens one
def test_a_non_finite_reply_is_refused_before_anything_changes(bad_value, position):
    rng = np.random.default_rng(11)
    good = _clients(rng, 6, SHAPES)
    spec = spec_of(_record(good[0][0]))
    acc = WeightedMean(spec, block=4)
    for i, (arrays, n) in enumerate(good):
        if i == position:
            bad = {k: v.copy() for k, v in arrays.items()}
            bad["fc.weight"][2, -1] = bad_value  # in the last chunk of the big array
            with pytest.raises(AggregationError, match="'fc.weight' contains NaN or Inf"):
                acc.add(_record(bad), 500)
        acc.add(_record(arrays), n)
    assert acc.count == 6
    expected = _aggregate(good, 4)
    out = acc.result()
    assert all(out[k].data == expected[k].data for k in out)


def test_finite_values_whose_sum_overflows_are_not_refused():
    big = np.full(8, 1e38, np.float32)
    acc = WeightedMean({"w": ArraySpec((8,), "float32")})
    acc.add(_record({"w": big}), 1)  # the check's float32 sum (8e38) overflows; values do not
    acc.add(_record({"w": big}), 1)
    assert np.allclose(acc.result()["w"].numpy(), 1e38, rtol=1e-6)


def test_other_dtypes_follow_the_rule():
    a = {
        "f16": np.array([1.0, 2.0], np.float16),
        "f64": np.array([1.0, 1e-12], np.float64),
        "steps": np.array([1, 2], np.int64),
        "mask": np.array([True, False]),
    }
    b = {
        "f16": np.array([2.0, 4.0], np.float16),
        "f64": np.array([1.0 + 3e-16, 2e-12], np.float64),
        "steps": np.array([2, 3], np.int64),
        "mask": np.array([True, True]),
    }
    out = weighted_mean([(_record(a), 1), (_record(b), 1)], block=2)
    assert out["f16"].numpy().dtype == np.float16
    assert out["f16"].numpy().tolist() == [1.5, 3.0]
    f64 = out["f64"].numpy()  # accumulated in float64, not float32 blocks
    assert f64[0] == (1.0 + (1.0 + 3e-16)) / 2 and f64[1] == 1.5e-12
    assert out["steps"].numpy().tolist() == [2, 2]  # 1.5 -> 2, 2.5 -> 2: half to even
    assert out["mask"].numpy().tolist() == [True, False]  # means 1.0 and 0.5 (-> 0)


def test_buffers_stay_o_model_whatever_the_number_of_clients():
    rng = np.random.default_rng(5)
    clients = _clients(rng, 200, {"w": (50_000,)})
    acc = WeightedMean(spec_of(_record(clients[0][0])), block=8)
    model_bytes = 50_000 * 4
    for arrays, n in clients:
        acc.add(_record(arrays), n)
        held = sum(t.numel() * t.element_size() for t in (*acc._blk.values(), *acc._acc.values()))
        assert held <= 3 * model_bytes  # a float32 block sum + a float64 accumulator
    acc.result()


def test_torch_thread_setting_is_restored_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        acc = WeightedMean({"w": ArraySpec((4,), "float32")})
        acc.add(_record({"w": np.ones(4, np.float32)}), 1)
        assert torch.get_num_threads() == 2
        with pytest.raises(AggregationError):
            acc.add(_record({"w": np.array([1, np.nan, 1, 1], np.float32)}), 1)
        assert torch.get_num_threads() == 2
        acc.result()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _npy(arr: np.ndarray, version=(1, 0)) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    return buf.getvalue()


def _raw(data: bytes, arr: np.ndarray) -> Array:
    return Array(dtype=str(arr.dtype), shape=arr.shape, stype="numpy.ndarray", data=data)


def test_array_view_is_zero_copy_and_reads_every_header_version():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for version in [(1, 0), (2, 0), (3, 0)]:
        a = _raw(_npy(arr, version), arr)
        view = array_view(a)
        assert view.tolist() == arr.tolist() and not view.flags.writeable
        assert np.shares_memory(view, np.frombuffer(a.data, np.uint8))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d[:5], "not a .npy buffer"),
        (lambda d: d[:9], "malformed"),
        (lambda d: d[:6] + b"\x09\x00" + d[8:], "unsupported format version"),
        (lambda d: d[:8] + (60000).to_bytes(2, "little") + d[10:], "header bytes"),
        (lambda d: d[:-4], "payload has"),
        (lambda d: d + b"\x00" * 4, "payload has"),
        (lambda d: d.replace(b"'fortran_order': False", b"'fortran_order': True "), "layout"),
        (lambda d: d.replace(b"'descr': '<f4'", b"'descr': '|O8'"), "dtype"),
        (lambda d: d.replace(b"'descr': '<f4', ", b"'descr': 1+1, "), "malformed"),
    ],
)
def test_malformed_payloads_are_refused(mutate, match):
    arr = np.arange(6, dtype=np.float32)
    with pytest.raises(AggregationError, match=match):
        array_view(_raw(mutate(_npy(arr)), arr))


def test_replies_must_match_the_template_exactly():
    acc = WeightedMean({"w": ArraySpec((2, 2), "float32")})
    bad = [
        ({"w": np.zeros((4,), np.float32)}, "is float32\\[4\\]"),
        ({"w": np.zeros((2, 2), np.float64)}, "is float64"),
        ({"w": np.zeros((2, 2), ">f4")}, "is >f4"),  # byte order is part of the dtype
        ({"v": np.zeros((2, 2), np.float32)}, "missing \\['w'\\], extra \\['v'\\]"),
    ]
    for arrays, match in bad:
        with pytest.raises(AggregationError, match=match):
            acc.add(_record(arrays), 1)
    for weight in (0, -1, float("nan"), float("inf"), "3"):
        with pytest.raises(AggregationError, match="weight"):
            acc.add(_record({"w": np.zeros((2, 2), np.float32)}), weight)
    with pytest.raises(AggregationError, match="no contributions"):
        acc.result()


def test_result_is_taken_once():
    acc = WeightedMean({"w": ArraySpec((1,), "float32")})
    acc.add(_record({"w": np.ones(1, np.float32)}), 1)
    acc.result()
    with pytest.raises(AggregationError, match="already taken"):
        acc.result()
    with pytest.raises(AggregationError, match="result was taken"):
        acc.add(_record({"w": np.ones(1, np.float32)}), 1)


@pytest.mark.parametrize(
    "arr",
    [
        np.array(2.5, np.float32),  # 0-d, like BatchNorm's num_batches_tracked
        np.zeros((0, 3), np.float32),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([True, False]),
        np.arange(4, dtype=">i4"),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    ],
)
def test_numpy_to_array_round_trips_through_flowers_reader(arr):
    a = numpy_to_array(arr)
    back = a.numpy()  # Flower's own np.load path
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr)
