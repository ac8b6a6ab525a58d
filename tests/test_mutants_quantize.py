"""Fixed-point encoding for secure aggregation: the documented rules, at their edges.

What mutation testing showed unchecked in ``fedcore.secagg.protocol.quantize``:
stochastic rounding is unbiased for values with an integer part and for negative ones;
``#clipped`` counts exactly the coordinates outside ``[-C, C]``, over every chunk; an
infinite coordinate is refused even when the other extreme is finite; the weight and
``bits`` limits are inclusive; ``max_weight`` is the largest safe total; the ring choice
follows its documented inequality; pairs whose ``old`` is ``None`` are encoded as they
are; and every refusal says what was wrong and what to change.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol.quantize import (
    WEIGHT_OVERFLOW,
    Quantizer,
    choose_quantizer,
    decode,
    encode,
    extra_coordinates,
)

KEY = b"k" * 32


def _exactly(message):
    return "^" + re.escape(message) + "$"


def _signed(vec, q):
    return vec.view(np.int32 if q.ring_bits == 32 else np.int64)


@pytest.mark.parametrize("steps", [2.3, -2.3, 5.75, -0.6])
def test_stochastic_rounding_is_unbiased_whatever_the_integer_part(steps):
    q = Quantizer(clip=1.0, bits=8, ring_bits=32)
    x = np.full(100_000, steps * q.step)
    values = _signed(encode(x, 1, (), q, KEY), q)[:-2].astype(np.float64)
    assert set(np.unique(values)) <= {np.floor(steps), np.floor(steps) + 1}
    assert abs(values.mean() - steps) < 0.01  # std of the mean: 0.5 / sqrt(1e5)


def test_clipped_counts_the_coordinates_outside_c_over_every_chunk():
    q = Quantizer(clip=2.0, bits=8, ring_bits=64)
    x = np.zeros(200_000)  # four chunks of 2^16
    x[[0, 10, 70_000, 199_999]] = [3.0, -2.5, 9.0, -7.0]  # outside [-2, 2]
    x[[5, 6, 150_000]] = [2.0, -2.0, 1.5]  # on or inside the bound: not clipped
    vec = encode(x, 1, (), q, KEY)
    d = x.size
    assert int(vec[d + 1]) == 4
    values = _signed(vec, q)[:d]
    top = 2 ** (q.bits - 1)
    assert values[0] == top and values[70_000] == top
    assert values[10] == -top and values[199_999] == -top
    assert values[5] == top and values[6] == -top


@pytest.mark.parametrize("bad", [[0.1, np.inf], [-np.inf, 0.1], [np.nan, 0.0]])
def test_a_non_finite_coordinate_is_refused_whatever_the_others(bad):
    q = Quantizer(clip=1.0, bits=8, ring_bits=64)
    message = "the update or a metric is NaN or infinite; refusing to send it"
    with pytest.raises(SecureAggregationError, match=_exactly(message)):
        encode(np.array(bad), 1, (), q, KEY)
    with pytest.raises(SecureAggregationError, match=_exactly(message)):
        encode(np.zeros(3), 1, tuple(bad), q, KEY)


@pytest.mark.parametrize("weight", [0, -3, 2.5, True, "3"])
def test_weights_must_be_positive_integers(weight):
    q = Quantizer(clip=1.0, bits=8, ring_bits=64)
    with pytest.raises(
        SecureAggregationError,
        match=_exactly(f"weight must be a positive integer, got {weight!r}"),
    ):
        encode(np.zeros(3), weight, (), q, KEY)


def test_the_largest_weight_the_ring_holds_is_accepted_and_one_more_is_refused():
    q = Quantizer(clip=1.0, bits=16, ring_bits=32)
    top = q.max_weight()
    vec = encode(np.zeros(3), top, (), q, KEY)
    assert int(vec[3]) == top
    assert decode(vec, q, 0, 1).total_weight == top
    with pytest.raises(SecureAggregationError) as info:
        encode(np.zeros(3), top + 1, (), q, KEY)
    assert str(info.value) == (
        f"weight {top + 1} {WEIGHT_OVERFLOW} (32 bits, 16 quantization bits); "
        "use secagg.ring-bits = 64 or fewer secagg.bits"
    )


@pytest.mark.parametrize("ring", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16, 24])
def test_max_weight_is_the_largest_total_that_cannot_wrap(ring, bits):
    q = Quantizer(clip=1.0, bits=bits, ring_bits=ring)
    assert q.max_weight() == q.max_weight(1)
    for clients in range(1, 20):
        n = q.max_weight(clients)
        assert n * 2 ** (bits - 1) + clients < 2 ** (ring - 1)
        assert (n + 1) * 2 ** (bits - 1) + clients >= 2 ** (ring - 1)


def _total(q, weight, d=3, num_metrics=0):
    vec = np.zeros(d + extra_coordinates(num_metrics), dtype=q.dtype)
    vec[d] = weight
    return vec


def test_decode_accepts_the_limit_and_refuses_beyond_it_and_a_zero_weight():
    q = Quantizer(clip=1.0, bits=16, ring_bits=32)
    limit = q.max_weight(2)
    assert decode(_total(q, limit), q, 0, 2).total_weight == limit
    with pytest.raises(SecureAggregationError) as info:
        decode(_total(q, limit + 1), q, 0, 2)
    assert str(info.value) == (
        f"total weight {limit + 1} of 2 clients could have wrapped the 32-bit ring with 16 "
        f"quantization bits (limit {limit}); use secagg.ring-bits = 64 or fewer secagg.bits"
    )
    with pytest.raises(
        SecureAggregationError, match=_exactly("decoded total weight is 0; expected > 0")
    ):
        decode(_total(q, 0), q, 0, 2)


def test_one_example_from_one_client_decodes():
    q = Quantizer(clip=1.0, bits=8, ring_bits=64)
    x = np.array([0.5, -0.25, 0.0])  # multiples of the step: rounding is exact
    out = decode(encode(x, 1, (1.5,), q, KEY), q, 1, 1)
    assert out.total_weight == 1 and out.mean.tolist() == [0.5, -0.25, 0.0]
    assert out.metrics == (1.5,)


def test_pairs_whose_old_is_none_are_encoded_as_they_are():
    """A (delta, None) pair (e.g. a control-variate delta) and (new, old) pairs mix."""
    q = Quantizer(clip=1.0, bits=8, ring_bits=64)
    g = np.random.default_rng(0)
    delta, new, old = g.normal(0, 0.1, 5), g.normal(0, 0.1, (2, 3)), g.normal(0, 0.1, (2, 3))
    parts = [(delta, None), (new, old), (delta[:2], None)]
    flat = np.concatenate([delta, (new - old).ravel(), delta[:2]])
    assert np.array_equal(encode(parts, 3, (0.5,), q, KEY), encode(flat, 3, (0.5,), q, KEY))


def test_pairs_of_different_shapes_are_refused():
    q = Quantizer(clip=1.0, bits=8, ring_bits=64)
    with pytest.raises(
        SecureAggregationError, match=_exactly("update shapes differ: (2, 3) vs (3, 2)")
    ):
        encode([(np.zeros((2, 3)), np.zeros((3, 2)))], 1, (), q, KEY)


def _ring(**kw):
    return choose_quantizer(
        **{"clip": 1.0, "bits": 16, "ring_bits": 0, "clients": 3, **kw}
    ).ring_bits


def test_the_ring_choice_follows_its_documented_inequality():
    # 4 * w * 2^(bits-1) + clients < 2^31 and clients < 2^bits
    assert _ring(previous_weight=16_000) == 32  # 4 * 16000 * 2^15 = 2.10e9 < 2^31
    assert _ring(previous_weight=16_383) == 32  # 2^31 - 2^17 + 3
    assert _ring(previous_weight=16_384) == 64  # 2^31 + 3
    assert _ring(previous_weight=1, clients=100) == 32  # 100 < 2^16
    assert _ring(previous_weight=1, bits=6, clients=64) == 64  # 64 = 2^6
    assert _ring(previous_weight=1, bits=6, clients=63) == 32
    assert _ring(previous_weight=10, bits=24) == 32  # the widest quantization a 32-bit ring takes
    assert _ring(previous_weight=1, bits=25) == 64  # too wide for 32 bits
    assert _ring(previous_weight=None) == 64  # first round


@pytest.mark.parametrize("ring", [32, 64])
def test_a_forced_ring_is_kept(ring):
    assert _ring(ring_bits=ring, previous_weight=1) == ring
    assert _ring(ring_bits=ring, previous_weight=None) == ring


@pytest.mark.parametrize(("ring", "bits"), [(32, 2), (32, 24), (64, 2), (64, 56)])
def test_bits_limits_are_inclusive(ring, bits):
    assert Quantizer(clip=1.0, bits=bits, ring_bits=ring).bits == bits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ring_bits": 16}, "ring_bits must be 32 or 64, got 16"),
        ({"bits": 25}, "bits must be in [2, 24] for a 32-bit ring, got 25"),
        ({"bits": 1}, "bits must be in [2, 24] for a 32-bit ring, got 1"),
        ({"ring_bits": 64, "bits": 57}, "bits must be in [2, 56] for a 64-bit ring, got 57"),
        ({"clip": 0.0}, "clip must be a positive number, got 0.0"),
        ({"clip": float("inf")}, "clip must be a positive number, got inf"),
        ({"metric_clip": -1.0}, "metric_clip must be a positive number, got -1.0"),
        ({"metric_clip": float("nan")}, "metric_clip must be a positive number, got nan"),
    ],
)
def test_bad_parameters_are_refused_saying_what_is_allowed(kwargs, message):
    with pytest.raises(SecureAggregationError, match=_exactly(message)):
        Quantizer(**{"clip": 1.0, "bits": 16, "ring_bits": 32, **kwargs})
