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

No wrap-around. Every coordinate's true sum is at most ``N * 2^(bits-1) + n``
in absolute value; the decoder refuses (``SecureAggregationError``) unless
``N * 2^(bits-1) + n < 2^(R-1)``, so a decoded sum is never a wrapped one. With
``R = 64`` and ``bits = 16`` that allows ``N < 2^47`` examples in a round; with
``R = 32``, ``N < 2^15``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import SecureAggregationError
from .crypto import keystream_words

__all__ = ["Decoded", "Quantizer", "decode", "encode", "extra_coordinates"]

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
    metric_clip : float (default: 1024.0)
        ``M``: metrics (e.g. ``train_loss``) are clipped to ``[-M, M]``.

    """

    clip: float
    bits: int
    ring_bits: int
    metric_clip: float = 1024.0

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


def _stochastic_round(v: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """``floor(v) + [u < frac(v)]`` as int64 (``v`` is overwritten)."""
    floor = np.floor(v)
    np.subtract(v, floor, out=v)  # v := frac in [0, 1)
    up = uniforms < v
    out = floor.astype(np.int64)
    out += up
    return out


def encode(
    delta: np.ndarray,
    weight: int,
    metrics: Sequence[float],
    q: Quantizer,
    rounding_key: bytes,
) -> np.ndarray:
    """Encode a client's update as its unmasked ring vector (layout: module docstring).

    Parameters
    ----------
    delta : numpy.ndarray
        1-D float update (trained minus global), any float dtype.
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
        ``q.dtype`` vector of length ``len(delta) + 2 + len(metrics)``.

    """
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight <= 0:
        raise SecureAggregationError(f"weight must be a positive integer, got {weight!r}")
    weight = int(weight)
    if weight > q.max_weight():
        raise SecureAggregationError(
            f"weight {weight} does not fit a {q.ring_bits}-bit ring with {q.bits} bits; "
            "use secagg.ring-bits = 64 or fewer secagg.bits"
        )
    x = np.asarray(delta, dtype=np.float64).ravel()
    m = np.asarray(list(metrics), dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(m).all()):
        raise SecureAggregationError(
            "the update or a metric is NaN or infinite; refusing to send it"
        )
    d = x.size
    clipped = int(np.count_nonzero(np.abs(x) > q.clip))
    v = np.clip(x, -q.clip, q.clip)
    v *= weight / q.step
    mv = np.clip(m, -q.metric_clip, q.metric_clip) * (weight / q.metric_step)
    u = keystream_words(rounding_key, d + m.size, np.uint32).astype(np.float64)
    u *= 2.0**-32
    qi = _stochastic_round(v, u[:d])
    qm = _stochastic_round(mv, u[d:])
    out = np.empty(d + extra_coordinates(m.size), dtype=q.dtype)
    out[:d] = qi.astype(q.dtype, casting="unsafe")  # two's complement mod 2^R
    out[d + _WEIGHT] = weight
    out[d + _CLIPPED] = clipped
    out[d + 2 :] = qm.astype(q.dtype, casting="unsafe")
    return out


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
