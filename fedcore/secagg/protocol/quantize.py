"""Fixed-point encoding of weighted updates into the masking ring, and back.

Bonawitz et al., CCS 2017 (Sec. 3: inputs are vectors over Z_R); stochastic
rounding as in Gupta et al., "Deep Learning with Limited Numerical Precision",
ICML 2015.

Client ``i`` with ``n_i`` examples and update ``delta_i`` (its trained model
minus the global model, all arrays flattened) sends, before masking, the vector
over ``Z_{2^R}`` (``R = ring_bits``, 32 or 64)::

    [ SR(n_i * clip(delta_i, C) / step)  |  n_i  |  #clipped  |  SR(n_i * clip(m_ij, M) / step_m) ]
      d model coordinates                  weight   diagnostics  one per metric (e.g. train_loss)

with ``step = C / 2^(bits-1)`` (``C`` = ``clip``, ``bits`` = quantization bits)
and ``SR`` stochastic rounding: ``floor(v) + [u < v - floor(v)]`` with ``u``
uniform from an AES-CTR keystream keyed by a per-(run seed, round, client)
256-bit key, so rounding is unbiased and the run reproducible. Negative values
are stored in two's complement (the ring's centred representation).

Error bound. Let ``c_i = clip(delta_i, C)``, ``N = sum n_i`` over the ``n``
counted clients. The server decodes ``m = step * sum_i q_i / N`` and, for every
coordinate::

    | m - sum_i n_i c_i / N |  <  n * step / N  =  n * C / (2^(bits-1) * N)  <=  C / 2^(bits-1)

(each client's rounding error is below one ``step``), with ``E[m] = sum n_i c_i / N``
(unbiased) and standard deviation at most ``sqrt(n) * step / (2 N)``. Add the
clipping error ``sum_i n_i |delta_i - c_i| / N`` (zero when every
``|delta_i| <= C``; the ``#clipped`` coordinate reports how many were clipped),
a float64 rounding of about ``2^-52`` relative, and half an ulp of the array's
dtype when the new global model is cast back (float32: ``2^-24`` relative).
Metrics obey the same bound with ``M`` (``metric_clip``) in place of ``C``.

No wrap-around. Every coordinate's true sum is at most ``N * 2^(bits-1) + n`` in
absolute value; the decoder refuses (``SecureAggregationError``) unless
``N * 2^(bits-1) + n < 2^(R-1)``, so a decoded sum is never a wrapped one. With
``R = 64`` and ``bits = 16`` that allows ``N < 2^47`` examples in a round; with
``R = 32``, ``N < 2^15``. A 32-bit ring halves what is masked, sent and unmasked;
:func:`choose_quantizer` picks it when the previous round's total weight shows it
is safe. The ring never changes the quantized values, only their capacity, so
the result of a round does not depend on which ring carried it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol.crypto import keystream_words

__all__ = [
    "WEIGHT_OVERFLOW",
    "Decoded",
    "Quantizer",
    "choose_quantizer",
    "decode",
    "encode",
    "extra_coordinates",
]

#: Marker in the error a client raises when its weight does not fit the round's ring.
WEIGHT_OVERFLOW = "does not fit the ring"

#: Coordinates after the model's: the weight and the clipped-coordinate count.
_WEIGHT, _CLIPPED = 0, 1


def extra_coordinates(num_metrics: int) -> int:
    """Coordinates appended to the model's: weight, clipped count, one per metric."""
    return 2 + num_metrics


@dataclass(frozen=True)
class Quantizer:
    """The public encoding parameters of a round.

    Parameters
    ----------
    clip : float
        ``C``: each coordinate of an update is clipped to ``[-C, C]``.
    bits : int
        Quantization bits: ``step = C / 2^(bits-1)``.
    ring_bits : int
        ``R``: arithmetic is modulo ``2^R`` (32 or 64).
    metric_clip : float (default: 64.0)
        ``M``: metrics (e.g. ``train_loss``) are clipped to ``[-M, M]``.

    """

    clip: float
    bits: int
    ring_bits: int
    metric_clip: float = 64.0

    def __post_init__(self) -> None:
        if self.ring_bits not in (32, 64):
            raise SecureAggregationError(f"ring_bits must be 32 or 64, got {self.ring_bits}")
        if not 2 <= self.bits <= self.ring_bits - 8:
            raise SecureAggregationError(
                f"bits must be in [2, {self.ring_bits - 8}] for a {self.ring_bits}-bit ring, "
                f"got {self.bits}"
            )
        for name in ("clip", "metric_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SecureAggregationError(f"{name} must be a positive number, got {value}")

    @property
    def dtype(self) -> np.dtype:
        """``uint32`` or ``uint64``."""
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    @property
    def step(self) -> float:
        """Quantization step of model coordinates."""
        return self.clip / 2 ** (self.bits - 1)

    @property
    def metric_step(self) -> float:
        """Quantization step of metrics."""
        return self.metric_clip / 2 ** (self.bits - 1)

    def max_weight(self, clients: int = 1) -> int:
        """Largest total weight ``N`` the ring holds without wrap-around for ``clients``."""
        return (2 ** (self.ring_bits - 1) - 1 - clients) // 2 ** (self.bits - 1)

    def error_bound(self, clients: int, total_weight: int) -> float:
        """Worst-case quantization error of a model coordinate of the mean (see module doc)."""
        return clients * self.step / total_weight


_CHUNK = 1 << 16  # coordinates per block: the working set stays in L2 cache


def _quantize_into(
    out: np.ndarray,
    x: np.ndarray,
    clip: float,
    scale: float,
    uniforms: np.ndarray,
    base: np.ndarray | None = None,
) -> int:
    """``out[i] = SR(clip(x[i] - base[i], clip) * scale)`` as two's-complement words.

    Returns the number of clipped coordinates. ``base`` (optional) is
    subtracted in float64, exactly for float32 inputs. ``uniforms`` are
    ``uint32`` words: rounding up when ``u < frac * 2^32`` is rounding up with
    probability ``frac`` (exactly, up to 2^-32).
    """
    n = x.size
    signed = out.view(np.int64 if out.dtype.itemsize == 8 else np.int32)
    chunk = min(n, _CHUNK) or 1
    v = np.empty(chunk, dtype=np.float64)
    f = np.empty(chunk, dtype=np.float64)
    up = np.empty(chunk, dtype=bool)
    clipped = 0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        m = e - s
        vv, ff, uu = v[:m], f[:m], up[:m]
        if base is None:
            np.copyto(vv, x[s:e], casting="same_kind")
        else:
            np.subtract(x[s:e], base[s:e], out=vv, dtype=np.float64)
        hi, lo = float(vv.max()), float(vv.min())  # NaN propagates into both
        if not (np.isfinite(hi) and np.isfinite(lo)):
            raise SecureAggregationError(
                "the update or a metric is NaN or infinite; refusing to send it"
            )
        if hi > clip or lo < -clip:  # rare: only then count and clip
            np.abs(vv, out=ff)
            clipped += int(np.count_nonzero(ff > clip))
            np.clip(vv, -clip, clip, out=vv)
        vv *= scale
        np.floor(vv, out=ff)
        np.subtract(vv, ff, out=vv)  # fractional part in [0, 1)
        vv *= 2.0**32
        np.less(uniforms[s:e], vv, out=uu)
        np.add(ff, uu, out=ff)
        np.copyto(signed[s:e], ff, casting="unsafe")  # exact: |ff| < 2^53
    return clipped


def encode(
    update: np.ndarray | Sequence[tuple[np.ndarray, np.ndarray | None]],
    weight: int,
    metrics: Sequence[float],
    q: Quantizer,
    rounding_key: bytes,
) -> np.ndarray:
    """Encode a client's update as its unmasked ring vector (layout: module docstring).

    Parameters
    ----------
    update : numpy.ndarray or sequence of (new, old) array pairs
        The float update (trained minus global), flattened; or the trained and
        global arrays themselves, whose difference is taken block by block in
        float64 (no full-size temporary). A pair whose ``old`` is ``None`` is
        encoded as it is (a vector that is already a difference).
    weight : int
        ``n_i`` (> 0).
    metrics : Sequence[float]
        Scalar metrics to average with the same weights.
    q : Quantizer
        Encoding parameters.
    rounding_key : bytes
        32-byte key of the stochastic-rounding keystream.

    Returns
    -------
    numpy.ndarray
        ``q.dtype`` vector of length ``d + 2 + len(metrics)``.

    """
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight <= 0:
        raise SecureAggregationError(f"weight must be a positive integer, got {weight!r}")
    weight = int(weight)
    if weight > q.max_weight():
        raise SecureAggregationError(
            f"weight {weight} {WEIGHT_OVERFLOW} ({q.ring_bits} bits, {q.bits} quantization "
            "bits); use secagg.ring-bits = 64 or fewer secagg.bits"
        )
    if isinstance(update, np.ndarray):
        x = update.ravel()
        parts = [(x if x.dtype.kind == "f" else x.astype(np.float64), None)]
    else:
        parts = []
        for new, old in update:
            if old is None:  # already a difference (e.g. a control-variate delta)
                parts.append((new.ravel(), None))
                continue
            if new.shape != old.shape:
                raise SecureAggregationError(f"update shapes differ: {new.shape} vs {old.shape}")
            parts.append((new.ravel(), old.ravel()))
    m = np.asarray(list(metrics), dtype=np.float64)
    d = sum(p.size for p, _ in parts)
    u = keystream_words(rounding_key, d + m.size, np.uint32)
    out = np.empty(d + extra_coordinates(m.size), dtype=q.dtype)
    scale = weight / q.step
    clipped = offset = 0
    for new, old in parts:
        end = offset + new.size
        clipped += _quantize_into(out[offset:end], new, q.clip, scale, u[offset:end], old)
        offset = end
    _quantize_into(out[d + 2 :], m, q.metric_clip, weight / q.metric_step, u[d:])
    out[d + _WEIGHT] = weight
    out[d + _CLIPPED] = clipped
    return out


def choose_quantizer(
    *, clip: float, bits: int, ring_bits: int, clients: int, previous_weight: int | None
) -> Quantizer:
    """Pick the round's ring: the forced one, or (``ring_bits = 0``) the cheapest safe one.

    The quantization (``clip``, ``bits``) is the same whatever the ring, so the
    ring never changes a round's result (a resumed run, which has forgotten
    ``previous_weight``, ends with the same model). Automatic choice: a 32-bit
    ring (half the bytes of a 64-bit one to mask, send and unmask) when the
    total weight of the previous round, ``previous_weight``, leaves room for
    4x growth::

        4 * previous_weight * 2^(bits-1) + clients < 2^31   and   clients < 2^bits

    otherwise (first round, or too much weight) a 64-bit ring. Safety does not
    rest on the guess: every client refuses a weight above ``max_weight()`` (so
    ``clients < 2^bits`` keeps the total below ``2^32`` and the weight
    coordinate exact) and :func:`decode` refuses any sum that could have
    wrapped, so a bad guess fails the round cleanly instead of corrupting it.
    """
    if ring_bits in (32, 64):
        return Quantizer(clip=clip, bits=bits, ring_bits=ring_bits)
    if (
        previous_weight is not None
        and bits <= 24
        and 4 * previous_weight * 2 ** (bits - 1) + clients < 2**31
        and clients < 2**bits
    ):
        return Quantizer(clip=clip, bits=bits, ring_bits=32)
    return Quantizer(clip=clip, bits=bits, ring_bits=64)


@dataclass(frozen=True)
class Decoded:
    """The unmasked aggregate: weighted mean update, total weight, metrics."""

    mean: np.ndarray
    total_weight: int
    clipped: int
    metrics: tuple[float, ...]


def decode(total: np.ndarray, q: Quantizer, num_metrics: int, clients: int) -> Decoded:
    """Decode the unmasked ring sum of ``clients`` vectors into the weighted mean.

    Raises
    ------
    SecureAggregationError
        If the total weight is not positive or the sum could have wrapped around.

    """
    signed = total.view(np.int32 if q.ring_bits == 32 else np.int64)
    d = signed.size - extra_coordinates(num_metrics)
    weight = int(total[d + _WEIGHT])
    if weight <= 0:
        raise SecureAggregationError(f"decoded total weight is {weight}; expected > 0")
    if weight > q.max_weight(clients):
        raise SecureAggregationError(
            f"total weight {weight} of {clients} clients could have wrapped the "
            f"{q.ring_bits}-bit ring with {q.bits} quantization bits "
            f"(limit {q.max_weight(clients)}); "
            "use secagg.ring-bits = 64 or fewer secagg.bits"
        )
    mean = signed[:d].astype(np.float64)
    mean *= q.step / weight
    metric_sums = signed[d + 2 :].astype(np.float64) * (q.metric_step / weight)
    return Decoded(
        mean=mean,
        total_weight=weight,
        clipped=int(total[d + _CLIPPED]),
        metrics=tuple(float(v) for v in metric_sums),
    )
