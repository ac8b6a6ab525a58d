"""Streaming weighted FedAvg kernel: ``theta = sum_i n_i theta_i / sum_i n_i``.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (arXiv:1602.05629).

Each reply is added into one accumulator as it is read, so memory stays
O(model) whatever the number of clients; the array bytes of a reply are read in
place (a zero-copy view of the ``.npy`` payload), never decoded into a copy.

Precision (documented rule). float32 and float16 arrays are summed as
``n_i * theta_i`` in float32 *blocks* of at most ``block`` clients; each block
is flushed into a float64 accumulator (exactly: a float32 value is a float64),
and the final division by ``sum n_i`` happens in float64 before rounding to the
array's own dtype. With unit roundoff ``u32 = 2**-24``, every element of the
result differs from the exact weighted mean by at most::

    |error| <= block * u32 * sum_i n_i |theta_i| / sum_i n_i   (products and block sums)
             + (number of blocks + 1) * u64 * (same)             (float64: negligible)
             + half an ulp of the output dtype                   (final rounding)

(to first order: a block of k clients rounds each product or running sum once
per client, k roundings of at most ``u32`` relative to ``sum |n_i theta_i|``).
For the default ``block = 32`` that is about ``2e-6`` relative to the mean
magnitude whatever the number of clients N, against ``N * u32`` for a plain
float32 running sum such as Flower's (``3e-6`` at N = 50, ``6e-5`` at N = 1000).
``block = 1`` rounds only the products (float64 sums). Block sums are float32:
a contribution whose ``max|theta_i| * n_i * block`` exceeds 1e37 (it could
overflow a float32 block) is added to the float64 accumulator directly (known
when NaN/Inf checking is on, the default). A smaller block is more
precise and slower: each flush reads the block and reads and writes the float64
accumulator (20 bytes of memory traffic per parameter, as much as three to five
clients' adds), so block 16 costs more time than block 32 (docs/benchmarks.md). float64 arrays are
accumulated in float64 directly. ``tests/test_aggregation_perf.py`` checks the
bound.

Integer and boolean arrays (e.g. BatchNorm's ``num_batches_tracked``) are
accumulated in float64, weighted the same way, rounded half-to-even and cast
back to their dtype.

Threads. The kernel is memory-bound: one core reads the replies at close to the
machine's bandwidth, and the server usually aggregates while clients train on
the other cores. torch's intra-op threads then oversubscribe the cores and spin
(50 x 1M float32 on a shared 2-core machine: median 836 ms with 2 threads, 77 ms
with 1), so :class:`WeightedMean` runs its arithmetic with one torch thread and
restores the caller's setting afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedcore.core.errors import AggregationError

__all__ = [
    "ArraySpec",
    "WeightedMean",
    "SlicePool",
    "array_view",
    "numpy_to_array",
    "spec_of",
    "weighted_mean",
]

_NPY_MAGIC = b"\x93NUMPY"
_F32_SAFE = 1e37  # float32 block sums stay below float32's 3.4e38 with margin


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: str


def spec_of(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The ``{name: (shape, dtype)}`` template of a record (no data decoded)."""
    return {k: ArraySpec(tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in record.items()}


_MAX_HEADER = 65536  # bytes; numpy's own reader refuses headers over 10,000 by default
_MAX_CACHED_HEADER = 4096


def _parse_header(header: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and element count from a complete ``.npy`` header (magic to padding)."""
    head = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    except Exception as exc:  # noqa: BLE001 - any malformed header is a reply error
        raise AggregationError(f"malformed .npy header: {exc}") from exc
    if head.tell() != len(header):
        raise AggregationError("malformed .npy header: length field does not match")
    if fortran or dtype.hasobject or dtype.kind not in "biuf":
        raise AggregationError(f"unsupported array layout or dtype {dtype}")
    return tuple(int(d) for d in shape), dtype, math.prod(shape)


# Every client sends the same few headers (one per array), so each is parsed once:
# ``np.lib.format`` parses with ``ast.literal_eval`` (~70 us, a third of the kernel's
# time at 50 clients x 1M parameters before this cache). Only validated headers are
# cached, at most 256 of at most 4 KiB each.
_parse_header_cached = functools.lru_cache(maxsize=256)(_parse_header)


def array_view(arr: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array``'s ``.npy`` bytes, without copying.

    Only plain, little-endian or native, C-ordered numeric payloads are viewed in
    place; anything else is refused (``AggregationError``), so a hostile payload
    can never make the reader allocate more than the bytes it sent.
    """
    data = arr.data
    if not isinstance(data, bytes | bytearray | memoryview) or data[:6] != _NPY_MAGIC:
        raise AggregationError("array payload is not a .npy buffer")
    major = data[6] if len(data) > 6 else 0
    if major == 1 and len(data) >= 10:
        offset = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3) and len(data) >= 12:
        offset = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise AggregationError(f"malformed .npy header: unsupported format version {major}")
    if offset > min(len(data), _MAX_HEADER):
        raise AggregationError(
            f"malformed .npy header: {offset} header bytes in a {len(data)}-byte payload"
        )
    header = bytes(data[:offset])
    parse = _parse_header_cached if offset <= _MAX_CACHED_HEADER else _parse_header
    shape, dtype, count = parse(header)
    if len(data) - offset != count * dtype.itemsize:
        raise AggregationError(
            f"array payload has {len(data) - offset} bytes, header says {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def numpy_to_array(arr: np.ndarray) -> Array:
    """``Array`` from a NumPy array with one copy (Flower's ``np.save`` path makes two)."""
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
        arr = arr.copy(order="C")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return Array(
        dtype=str(arr.dtype),
        shape=tuple(int(d) for d in arr.shape),
        stype="numpy.ndarray",
        # join copies the array's bytes once, straight into the payload
        data=b"".join((head.getvalue(), memoryview(arr))),
    )


_warned = False


def _as_tensor(view: np.ndarray) -> torch.Tensor:
    """Wrap a (read-only) NumPy view as a tensor; the kernel only ever reads it."""
    global _warned
    if not _warned:
        # torch warns once per process that the array is not writable; keep it quiet
        # (later calls take the fast path: the warning is never raised again)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(view)
        _warned = True
        return tensor
    return torch.from_numpy(view)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the caller's setting."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class _Slot:
    """One template array as the kernel reads it (its last validated ``.npy`` header)."""

    name: str
    spec: ArraySpec
    shape: tuple[int, ...]
    dtype: np.dtype
    count: int
    blocks: bool  # summed in float32 blocks (float16/32) rather than in float64
    header: bytes | None = None
    payload: int = -1  # header + data bytes of a payload with that header

    @classmethod
    def of(cls, name: str, spec: ArraySpec) -> _Slot:
        dtype = _dtype(spec.dtype)
        return cls(
            name,
            spec,
            spec.shape,
            dtype,
            math.prod(spec.shape),
            dtype.kind == "f" and dtype.itemsize <= 4,
        )


class WeightedMean:
    """Accumulates ``n_i * theta_i`` reply by reply; :meth:`result` divides by ``sum n_i``.

    Parameters
    ----------
    template : Mapping[str, ArraySpec]
        Names, shapes and dtypes every contribution must match (the global model).
    block : int (default: 32)
        Clients summed in float32 before a flush into float64 (see module docstring).
    pool : SlicePool, optional
        Worker threads (owned by the caller: the core starts none) that the
        arithmetic of one reply is split over, in contiguous slices of each large
        array, the calling thread taking one slice. ``None`` (the default) computes
        everything in the calling thread: in a simulation the other cores train
        clients while the server aggregates (docs/benchmarks.md).
        Every element sees the same
        operations in the same order whatever the split, so the result is
        bit-identical for any pool.

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

    def __init__(
        self,
        template: Mapping[str, ArraySpec],
        *,
        block: int = 32,
        pool: SlicePool | None = None,
    ) -> None:
        if block < 1:
            raise ValueError("block must be >= 1")
        self.template = dict(template)
        self.block = block
        self.pool = pool
        self.total_weight = 0.0
        self.count = 0
        # Flat buffers: float32 block sums of float16/32 arrays, float64 accumulators.
        self._blk: dict[str, torch.Tensor] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._in_block = 0  # clients in the current block sums
        self._done = False
        # Worker lanes' slices of the last replies, not waited for yet: the lanes run
        # behind the calling thread, which goes on to check the next reply meanwhile.
        self._lagging: collections.deque[list[_Future]] = collections.deque()
        self._slots = [_Slot.of(name, spec) for name, spec in self.template.items()]

    def check(self, arrays: ArrayRecord, *, finite: bool = True) -> dict[str, np.ndarray]:
        """Views of ``arrays`` if they match the template; else ``AggregationError``.

        ``finite`` also refuses NaN and Inf, at the cost of one extra read of the
        data (a float32 sum: NaN/Inf always survive it; only a non-finite sum is
        re-checked element-wise, so a finite array that overflows is not refused).
        """
        flat = self._read(arrays)
        if finite:
            with _one_thread():
                self._magnitudes(flat)
        return {slot.name: view.reshape(slot.shape) for slot, view in flat}

    def _read(self, arrays: ArrayRecord) -> list[tuple[_Slot, np.ndarray]]:
        """Each template array's flat read-only view in ``arrays``, checked; template order.

        Every client sends the same ``.npy`` header for an array, so a payload that
        starts with the header last validated for that name and has its length is
        viewed without parsing it again (the full path, :func:`array_view`, took a
        third of the per-reply Python work at 50 x 1M parameters).
        """
        if arrays.keys() != self.template.keys():
            missing = sorted(set(self.template) - set(arrays.keys()))
            extra = sorted(set(arrays.keys()) - set(self.template))
            raise AggregationError(
                f"array keys differ from the model: missing {missing}, extra {extra}"
            )
        out: list[tuple[_Slot, np.ndarray]] = []
        for slot in self._slots:
            arr = arrays[slot.name]
            data = arr.data
            header = slot.header
            if (
                header is not None
                and type(data) is bytes
                and len(data) == slot.payload
                and data.startswith(header)
            ):
                view = np.frombuffer(data, dtype=slot.dtype, count=slot.count, offset=len(header))
            else:
                full = array_view(arr)
                if full.shape != slot.shape or full.dtype != slot.dtype:
                    raise AggregationError(
                        f"array '{slot.name}' is {full.dtype}{list(full.shape)}, "
                        f"the model has {slot.spec.dtype}{list(slot.spec.shape)}"
                    )
                if type(data) is bytes:
                    slot.header = data[: len(data) - full.nbytes]
                    slot.payload = len(data)
                view = full.reshape(-1)
            out.append((slot, view))
        return out

    def _magnitudes(self, flat: Sequence[tuple[_Slot, np.ndarray]]) -> dict[str, float]:
        """``max |x|`` of each float array, refusing NaN and Inf."""
        floats = [(slot.name, v) for slot, v in flat if v.dtype.kind == "f" and v.size]
        parts = _run_sliced(
            [(v.size, _slice_magnitude(_as_tensor(v), v.size)) for _, v in floats], self.pool
        )
        magnitude: dict[str, float] = {}
        for (name, _), found in zip(floats, parts, strict=True):
            # not max(): max([1.0, nan]) is 1.0, and a NaN in any slice must count
            value = float(np.max(found))
            if not np.isfinite(value):
                raise AggregationError(f"array '{name}' contains NaN or Inf")
            magnitude[name] = value
        return magnitude

    def add(self, arrays: ArrayRecord, weight: float, *, finite: bool = True) -> None:
        """Add one client's arrays with weight ``n_i``; validated before anything changes.

        Pass ``finite=False`` only when the caller has already refused NaN/Inf.
        """
        if not (isinstance(weight, int | float) and weight > 0 and np.isfinite(weight)):
            raise AggregationError(f"weight must be a positive finite number, got {weight!r}")
        if self._done:
            raise AggregationError("cannot add to an accumulator whose result was taken")
        flat = self._read(arrays)
        w = float(weight)
        first = self._in_block == 0  # the block sums start from this client's products
        closing = self._in_block + 1 >= self.block  # ... or end with them (flush)
        handed: list[_Future] = []
        n_threads = torch.get_num_threads()
        if n_threads != 1:
            torch.set_num_threads(1)
        try:
            magnitude = self._magnitudes(flat) if finite else {}
            jobs: list[tuple[int, _SliceJob]] = []
            for slot, view in flat:
                name, size = slot.name, slot.count
                t = _as_tensor(view)
                if not slot.blocks:
                    jobs.append((size, self._float64_job(name, t, w)))
                    continue
                # A contribution that could overflow a float32 block goes to float64,
                # and the block takes a zero in its place (its bookkeeping stays exact).
                # Both steps of one array run in one job, in this order, on each slice.
                steps: list[_SliceJob] = []
                wb = w
                if magnitude.get(name, 0.0) * w * self.block > _F32_SAFE:
                    steps.append(self._float64_job(name, t, w))
                    wb = 0.0
                blk = self._blk.get(name)
                if blk is None:
                    blk = self._blk[name] = torch.empty(size, dtype=torch.float32)
                if not closing:
                    steps.append(_block_job(blk, t, wb, first, size))
                else:
                    acc = self._acc.get(name)
                    flush: Callable[..., Any] = np.add
                    if acc is None:  # the first flush copies (float32 -> float64 is exact)
                        acc = self._acc[name] = torch.empty(size, dtype=torch.float64)
                        flush = _copy
                    steps.append(_flush_job(blk, acc, t, wb, first, flush))
                jobs.append((size, steps[0] if len(steps) == 1 else _in_order(steps)))
            _run_sliced(jobs, self.pool, deferred=handed)
        finally:
            self._lagging.append(handed)
            if n_threads != 1:
                torch.set_num_threads(n_threads)
        self.total_weight += w
        self.count += 1
        self._in_block = 0 if closing else self._in_block + 1
        while len(self._lagging) > _MAX_LAG:
            _wait_all(self._lagging.popleft())

    def _catch_up(self) -> None:
        """Wait until the worker lanes have added every reply handed to them."""
        while self._lagging:
            _wait_all(self._lagging.popleft())

    def _float64_job(self, name: str, t: torch.Tensor, w: float) -> _SliceJob:
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = torch.zeros(t.numel(), dtype=torch.float64)

        def job(lo: int, hi: int) -> None:
            part = t[lo:hi]
            wide = part if part.dtype == torch.float64 else part.to(torch.float64)
            acc[lo:hi].add_(wide, alpha=w)

        return job

    def result(self) -> ArrayRecord:
        """The weighted mean, each array in its template dtype (callable once)."""
        if self._done:
            raise AggregationError("result() was already taken from this accumulator")
        if self.count == 0:
            raise AggregationError("no contributions to average")
        self._catch_up()
        total = self.total_weight
        out: dict[str, Array] = {}
        for name, spec in self.template.items():
            dtype = np.dtype(spec.dtype)
            acc = self._acc.pop(name, None)
            blk = self._blk.pop(name, None)
            acc_np = None if acc is None else acc.numpy()
            if dtype.kind != "f":
                assert acc_np is not None
                np.divide(acc_np, total, out=acc_np)
                mean = np.rint(acc_np, out=acc_np).astype(dtype).reshape(spec.shape)  # half-even
            else:
                # Flush the open block and divide in float64, chunk by chunk, rounding
                # once into the output dtype; float32 results are written over the
                # block buffer (no further model-sized allocation).
                pending = blk.numpy() if blk is not None and self._in_block else None
                if blk is not None and dtype == np.float32:
                    flat = blk.numpy()
                else:
                    flat = np.empty(math.prod(spec.shape), dtype=dtype)
                with _one_thread():
                    _run_sliced([(flat.size, _divide_job(flat, acc_np, pending, total))], self.pool)
                mean = flat.reshape(spec.shape)
                del acc, acc_np, pending
            out[name] = numpy_to_array(mean)
        self._done = True
        return ArrayRecord(out)


# Elements per step when a block is flushed or the result is formed: 256 KiB of
# float32 (512 KiB of float64) stays in cache between the two operations on it.
_CHUNK = 1 << 16


#: Arrays below this many elements are not split over threads (the split costs more).
_PARALLEL_MIN = 1 << 18

#: The calling thread's slice of a split array, relative to a worker lane's 1.0
#: (it also does the replies' Python work; 0.5 measured fastest of 0.25-1.0, see
#: docs/benchmarks.md).
_CALLER_SHARE = 0.5

#: Replies a worker lane may still be adding when the next one is handed over;
#: the oldest is waited for beyond that (each one waited for keeps its arrays alive).
_MAX_LAG = 2

#: ``job(lo, hi)`` does one array's work on elements ``[lo, hi)``; returns anything.
_SliceJob = Callable[[int, int], Any]


class _Future(Protocol):
    def result(self) -> Any: ...


class SlicePool(Protocol):
    """What :class:`WeightedMean` needs of a thread pool: ``threads - 1`` ordered lanes.

    ``threads`` counts the calling thread; lanes are numbered 1 to ``threads - 1``
    and each runs what it is given in submission order, one job at a time (e.g.
    :func:`fedcore.serverside.pools.aggregation_pool`: one worker thread per lane).
    """

    threads: int

    def submit(self, lane: int, fn: Callable[..., Any], /, *args: Any) -> _Future:
        """Run ``fn(*args)`` on lane ``lane`` after its earlier jobs; ``result()`` re-raises."""
        ...


def _slices(size: int, shares: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges covering ``size`` in proportion to ``shares``.

    Cuts fall on ``_CHUNK`` multiples; a range may be empty (then it is dropped
    by the caller).
    """
    chunks = -(-size // _CHUNK)
    total = float(sum(shares))
    bounds = list(itertools.accumulate(shares))
    cuts = [0] + [min(size, round(chunks * b / total) * _CHUNK) for b in bounds[:-1]] + [size]
    return list(itertools.pairwise(cuts))


def _shares(threads: int) -> list[float]:
    """The calling thread's share of a split array, then each worker lane's.

    The calling thread also does every reply's Python work (checks, views, the
    small arrays), about 0.1 ms per reply against 0.24 ms of arithmetic for 1M
    float32 (docs/benchmarks.md), so it takes a smaller slice.
    """
    return [_CALLER_SHARE] + [1.0] * (threads - 1)


def _run_sliced(
    jobs: Sequence[tuple[int, _SliceJob]],
    pool: SlicePool | None,
    *,
    deferred: list[_Future] | None = None,
) -> list[list[Any]]:
    """Run each ``(size, job)`` over slices of its range; per job, the slices' results.

    Large arrays are split over the calling thread and ``pool.threads - 1`` worker
    lanes (torch and numpy release the GIL in their loops); small ones run whole,
    in this thread. Each element gets the same operations whatever the split, and
    a lane runs its slices in the order they were given, so a slice of reply k+1
    never overtakes reply k's. With ``deferred`` the lanes' futures are appended
    to it instead of waited for (their slices' results are then not returned).
    """
    out: list[list[Any]] = [[] for _ in jobs]
    threads = pool.threads if pool is not None else 1
    split = [i for i, (size, _) in enumerate(jobs) if threads > 1 and size >= _PARALLEL_MIN]
    futures: list[tuple[int, _Future]] = []
    mine: list[tuple[int, int, int]] = []
    for i in split:
        size, job = jobs[i]
        first, *rest = _slices(size, _shares(threads))
        mine.append((i, *first))
        assert pool is not None
        futures.extend(
            (i, pool.submit(lane, job, lo, hi))
            for lane, (lo, hi) in enumerate(rest, start=1)
            if hi > lo
        )
    try:
        for i, (size, job) in enumerate(jobs):
            if i not in split:
                out[i].append(job(0, size))
        for i, lo, hi in mine:
            if hi > lo:
                out[i].append(jobs[i][1](lo, hi))
    finally:
        if deferred is not None:
            deferred.extend(f for _, f in futures)
        else:
            for i, future in futures:
                out[i].append(future.result())  # re-raises a slice's exception
    return out


def _wait_all(futures: Iterable[_Future]) -> None:
    for future in futures:
        future.result()  # re-raises a slice's exception


def _in_order(steps: Sequence[_SliceJob]) -> _SliceJob:
    def job(lo: int, hi: int) -> None:
        for step in steps:
            step(lo, hi)

    return job


def _slice_magnitude(t: torch.Tensor, size: int) -> _SliceJob:
    return lambda lo, hi: _magnitude(t if hi - lo == size else t[lo:hi])


def _block_job(blk: torch.Tensor, t: torch.Tensor, w: float, first: bool, size: int) -> _SliceJob:
    def job(lo: int, hi: int) -> None:
        if hi - lo == size:  # the whole array (slicing a tensor costs ~1 us)
            _block_add(blk, t, w, first)
        else:
            _block_add(blk[lo:hi], t[lo:hi], w, first)

    return job


def _flush_job(
    blk: torch.Tensor,
    acc: torch.Tensor,
    t: torch.Tensor,
    w: float,
    first: bool,
    flush: Callable[..., Any],
) -> _SliceJob:
    acc_np, blk_np = acc.numpy(), blk.numpy()

    def job(start: int, stop: int) -> None:
        # Add and flush chunk by chunk, while the block's chunk is in cache.
        for lo in range(start, stop, _CHUNK):
            hi = min(lo + _CHUNK, stop)
            _block_add(blk[lo:hi], t[lo:hi], w, first)
            flush(acc_np[lo:hi], blk_np[lo:hi], out=acc_np[lo:hi])

    return job


def _divide_job(
    flat: np.ndarray, acc_np: np.ndarray | None, pending: np.ndarray | None, total: float
) -> _SliceJob:
    def job(start: int, stop: int) -> None:
        for lo in range(start, stop, _CHUNK):
            hi = min(lo + _CHUNK, stop)
            if acc_np is None:
                assert pending is not None
                np.divide(pending[lo:hi], total, out=flat[lo:hi], dtype=np.float64)
                continue
            if pending is not None:
                np.add(acc_np[lo:hi], pending[lo:hi], out=acc_np[lo:hi])
            np.divide(acc_np[lo:hi], total, out=flat[lo:hi], casting="same_kind")

    return job


def _copy(_: np.ndarray, src: np.ndarray, *, out: np.ndarray) -> None:
    np.copyto(out, src)


def _block_add(blk: torch.Tensor, t: torch.Tensor, w: float, first: bool) -> None:
    """``blk += w * t``; ``first``: ``blk = w * t`` (no zeroing pass)."""
    if first and t.dtype == torch.float32:
        torch.mul(t, w, out=blk)
    elif first:
        blk.zero_()
        blk.add_(t, alpha=w)  # float16 is widened before the multiply
    else:
        blk.add_(t, alpha=w)


@functools.lru_cache(maxsize=64)
def _dtype(dtype: str) -> np.dtype:
    """``"float32"`` -> ``np.dtype("<f4")`` (byte order included: ``>f4`` is refused)."""
    return np.dtype(dtype)


def _magnitude(t: torch.Tensor) -> float:
    """``max |t|`` in one pass (``aminmax``), NaN or Inf if any element is."""
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (torch.isnan(lo) or torch.isnan(hi)) else float("nan")


def weighted_mean(
    contributions: Iterable[tuple[ArrayRecord, float]], *, block: int = 32
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
