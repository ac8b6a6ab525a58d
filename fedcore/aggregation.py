"""Streaming weighted FedAvg kernel: ``theta = sum_i n_i theta_i / sum_i n_i``.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (arXiv:1602.05629).

Each reply is added into one accumulator as it is read, so memory stays
O(model) whatever the number of clients; the array bytes of a reply are read in
place (a zero-copy view of the ``.npy`` payload), never decoded into a copy.

Precision (documented rule). Floating arrays are summed as ``n_i * theta_i`` in
float32 *blocks* of at most ``block`` clients; each block is flushed into a
float64 accumulator, and the final division by ``sum n_i`` happens in float64
before rounding to the array's own dtype. With unit roundoff
``u32 = 2**-24``, the result differs from the exact weighted mean by at most::

    |error| <= (block - 1) * u32 * sum_i n_i |theta_i| / sum_i n_i   (block sums)
             + u64 * (number of blocks) * ...                           (negligible)
             + half an ulp of the output dtype                          (final rounding)

i.e. for ``block = 16`` about ``1e-6`` relative to the mean magnitude, against
``(N - 1) * u32`` for a plain float32 running sum such as Flower's. ``block = 1``
gives pure float64 accumulation (about 2x slower, see docs/benchmarks.md).

A contribution whose ``max|theta_i| * n_i * block`` exceeds 1e37 (it could
overflow a float32 block) is added to the float64 accumulator directly.

Integer and boolean arrays (e.g. BatchNorm's ``num_batches_tracked``) are
accumulated in float64, weighted the same way, rounded half-to-even and cast
back to their dtype.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .errors import AggregationError

__all__ = [
    "ArraySpec",
    "WeightedMean",
    "array_view",
    "numpy_to_array",
    "spec_of",
    "weighted_mean",
]

_NPY_MAGIC = b"\x93NUMPY"
_F32_SAFE = 1e37  # block sums stay below float32's 3.4e38 with margin


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: str


def spec_of(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The ``{name: (shape, dtype)}`` template of a record (no data decoded)."""
    return {k: ArraySpec(tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in record.items()}


def array_view(arr: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array``'s ``.npy`` bytes, without copying.

    Only plain, little-endian or native, C-ordered numeric payloads are viewed in
    place; anything else is refused (``AggregationError``), so a hostile payload
    can never make the reader allocate more than the bytes it sent.
    """
    data = arr.data
    if not isinstance(data, bytes | bytearray | memoryview) or data[:6] != _NPY_MAGIC:
        raise AggregationError("array payload is not a .npy buffer")
    head = io.BytesIO(bytes(data[:65536]))
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    except Exception as exc:  # noqa: BLE001 - any malformed header is a reply error
        raise AggregationError(f"malformed .npy header: {exc}") from exc
    if fortran or dtype.hasobject or dtype.kind not in "biuf":
        raise AggregationError(f"unsupported array layout or dtype {dtype}")
    count = int(np.prod(shape, dtype=np.int64))
    offset = head.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise AggregationError(
            f"array payload has {len(data) - offset} bytes, header says {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def numpy_to_array(arr: np.ndarray) -> Array:
    """``Array`` from a NumPy array with one copy (Flower's ``np.save`` path makes two)."""
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return Array(
        dtype=str(arr.dtype),
        shape=tuple(int(d) for d in arr.shape),
        stype="numpy.ndarray",
        data=head.getvalue() + arr.tobytes(),
    )


def _as_tensor(view: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # The view is read-only; torch only reads it here.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(view)


class WeightedMean:
    """Accumulates ``n_i * theta_i`` reply by reply; :meth:`result` divides by ``sum n_i``.

    Parameters
    ----------
    template : Mapping[str, ArraySpec]
        Names, shapes and dtypes every contribution must match (the global model).
    block : int (default: 16)
        Clients summed in float32 before a flush into float64 (see module docstring).

    Examples
    --------
    >>> import numpy as np
    >>> from flwr.app import ArrayRecord
    >>> a = ArrayRecord({"w": Array(np.array([1.0, 2.0], dtype=np.float32))})
    >>> b = ArrayRecord({"w": Array(np.array([4.0, 8.0], dtype=np.float32))})
    >>> acc = WeightedMean(spec_of(a))
    >>> acc.add(a, 1); acc.add(b, 2)
    >>> acc.result()["w"].numpy().tolist()    # (1*[1,2] + 2*[4,8]) / 3
    [3.0, 6.0]

    """

    def __init__(self, template: Mapping[str, ArraySpec], *, block: int = 16) -> None:
        if block < 1:
            raise ValueError("block must be >= 1")
        self.template = dict(template)
        self.block = block
        self.total_weight = 0.0
        self.count = 0
        self._acc: dict[str, torch.Tensor] = {}
        self._blk: dict[str, torch.Tensor] = {}
        self._in_block = 0
        self._done = False
        self._magnitude: dict[str, float] = {}

    def check(self, arrays: ArrayRecord, *, finite: bool = True) -> dict[str, np.ndarray]:
        """Views of ``arrays`` if they match the template; else ``AggregationError``.

        ``finite`` also refuses NaN and Inf, at the cost of one extra read of the
        data (``torch.aminmax``: NaN and Inf always show in the min or max).
        """
        if set(arrays.keys()) != set(self.template):
            missing = sorted(set(self.template) - set(arrays.keys()))
            extra = sorted(set(arrays.keys()) - set(self.template))
            raise AggregationError(
                f"array keys differ from the model: missing {missing}, extra {extra}"
            )
        views: dict[str, np.ndarray] = {}
        self._magnitude: dict[str, float] = {}
        for name, spec in self.template.items():
            view = array_view(arrays[name])
            if view.shape != spec.shape or str(view.dtype) != spec.dtype:
                raise AggregationError(
                    f"array '{name}' is {view.dtype}{list(view.shape)}, "
                    f"the model has {spec.dtype}{list(spec.shape)}"
                )
            if finite and view.dtype.kind == "f" and view.size:
                lo, hi = (float(v) for v in torch.aminmax(_as_tensor(view)))
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    raise AggregationError(f"array '{name}' contains NaN or Inf")
                self._magnitude[name] = max(-lo, hi)
            views[name] = view
        return views

    def add(self, arrays: ArrayRecord, weight: float, *, finite: bool = True) -> None:
        """Add one client's arrays with weight ``n_i``; validated before anything changes.

        Pass ``finite=False`` only when the caller has already refused NaN/Inf.
        """
        if not (isinstance(weight, int | float) and weight > 0 and np.isfinite(weight)):
            raise AggregationError(f"weight must be a positive finite number, got {weight!r}")
        if self._done:
            raise AggregationError("cannot add to an accumulator whose result was taken")
        views = self.check(arrays, finite=finite)
        w = float(weight)
        for name, view in views.items():
            t = _as_tensor(view)
            # A contribution that could overflow a float32 block goes straight to float64.
            huge = self._magnitude.get(name, 0.0) * w * self.block > _F32_SAFE
            if view.dtype.kind == "f" and not huge:
                blk = self._blk.get(name)
                if blk is None:
                    blk = self._blk[name] = torch.zeros(view.shape, dtype=torch.float32)
                blk.add_(t, alpha=w)
            else:
                acc = self._acc.get(name)
                if acc is None:
                    acc = self._acc[name] = torch.zeros(view.shape, dtype=torch.float64)
                acc.add_(t.to(torch.float64), alpha=w)
        self.total_weight += w
        self.count += 1
        self._in_block += 1
        if self._in_block >= self.block:
            self._flush()

    def _flush(self) -> None:
        for name, blk in self._blk.items():
            acc = self._acc.get(name)
            if acc is None:
                self._acc[name] = blk.to(torch.float64)
            else:
                acc.add_(blk)
            blk.zero_()
        self._in_block = 0

    def result(self) -> ArrayRecord:
        """The weighted mean, each array in its template dtype (callable once)."""
        if self._done:
            raise AggregationError("result() was already taken from this accumulator")
        if self.count == 0:
            raise AggregationError("no contributions to average")
        self._flush()
        out: dict[str, Array] = {}
        for name, spec in self.template.items():
            mean = self._acc[name].div_(self.total_weight)
            dtype = np.dtype(spec.dtype)
            if dtype.kind in "biu":
                mean = torch.round(mean)
            out[name] = numpy_to_array(mean.numpy().astype(dtype, copy=False))
        self._acc.clear()
        self._blk.clear()
        self._done = True
        return ArrayRecord(out)


def weighted_mean(
    contributions: Iterable[tuple[ArrayRecord, float]], *, block: int = 16
) -> ArrayRecord:
    """One-shot helper: the weighted mean of ``(arrays, n_i)`` pairs, streamed."""
    acc: WeightedMean | None = None
    for arrays, weight in contributions:
        if acc is None:
            acc = WeightedMean(spec_of(arrays), block=block)
        acc.add(arrays, weight)
    if acc is None:
        raise AggregationError("no contributions to average")
    return acc.result()
