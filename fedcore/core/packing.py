"""A record's arrays as one object on the wire: fewer requests per message in deployment.

Flower 1.42 moves a message between processes as a tree of objects, each pulled or
pushed with its own signed HTTPS request to the SuperLink (one per ``Array`` and one
per 5 MiB ``ArrayChunk`` of it), and the SuperLink spends a few milliseconds of CPU
on each (docs/benchmarks.md: ~210 object requests per plain round of 3 clients with
the default CNN). A train message of the default CNN is 20 objects (8 arrays, 8
chunks, the records, the message); packed, it is 4 (the message, its record dict,
the packed arrays and the config record).

:func:`pack_content` turns every ``ArrayRecord`` of ``.npy`` arrays into one
safetensors blob of them (the names' order in its metadata) under the reserved key
:data:`PACKED_KEY`; :func:`unpack_content` reverses it, bit for bit. A blob of at
most :data:`INLINE_MAX_BYTES` travels as the one ``bytes`` value of a
``ConfigRecord`` (a single object on the wire, where an ``ArrayRecord`` is three:
the record, the array and its chunk); a larger one, of two or more arrays, as the
one array of an ``ArrayRecord``, which Flower splits into 5 MiB chunks (no request
larger than Flower's own). Both ends of fedcore's deployment use it (the server's
:class:`~fedcore.engines.polling.PollingGrid` and ``fedcore client``, or the
ClientApp's :func:`~fedcore.clientside.policy.packed_arrays_mod` under a stock
SuperNode); nothing else ever sees a packed record.

safetensors is the parser because its input comes from the other side (a
malicious server or client): it bounds the header, checks every offset and dtype,
and executes nothing.

>>> import numpy as np
>>> from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
>>> rec = ArrayRecord({"w": Array(np.ones((2, 3), np.float32)), "b": Array(np.zeros(3))})
>>> packed = pack_content(RecordDict({"arrays": rec}))
>>> type(packed["arrays"]).__name__, list(packed["arrays"].keys())
('ConfigRecord', ['fedcore.packed'])
>>> back, was_packed = unpack_content(packed)
>>> was_packed, list(back["arrays"].keys()), back["arrays"]["w"].numpy().tolist()
(True, ['w', 'b'], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
"""

from __future__ import annotations

import json

import numpy as np
import safetensors
import safetensors.numpy
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedcore.core.aggregation import array_view, numpy_to_array
from fedcore.core.errors import AggregationError, FedcoreError

__all__ = [
    "INLINE_MAX_BYTES",
    "PACKED_KEY",
    "PACKED_STYPE",
    "PackingError",
    "pack_content",
    "unpack_content",
]

#: The one key of a packed ``ArrayRecord``.
PACKED_KEY = "fedcore.packed"
#: The ``stype`` of its ``Array`` (the data is a safetensors file's bytes).
PACKED_STYPE = "fedcore.packed/safetensors"
#: The largest blob sent as a ``ConfigRecord`` value, below Flower's 5 MiB array chunk.
INLINE_MAX_BYTES = 4 * 2**20
#: safetensors metadata key holding the arrays' names in the record's order (JSON list).
_ORDER = "fedcore.order"


class PackingError(FedcoreError):
    """A packed record cannot be unpacked (malformed blob, names or metadata)."""


def _pack_record(record: ArrayRecord) -> ArrayRecord | ConfigRecord | None:
    """``record`` as one packed blob (inline or as an array), or None to send it as it is."""
    if not record or PACKED_KEY in record:
        return None
    views: dict[str, np.ndarray] = {}
    for name, arr in record.items():
        if arr.stype != "numpy.ndarray":
            return None
        try:
            views[name] = array_view(arr)
        except AggregationError:  # not a plain .npy payload: leave the record alone
            return None
    nbytes = sum(v.nbytes for v in views.values())
    if nbytes > INLINE_MAX_BYTES and len(record) < 2:
        return None  # one large array: as many objects either way
    blob = safetensors.numpy.save(views, metadata={_ORDER: json.dumps(list(views))})
    if len(blob) <= INLINE_MAX_BYTES:
        return ConfigRecord({PACKED_KEY: blob})
    packed = Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)
    return ArrayRecord({PACKED_KEY: packed})


def _blob_of(record: ArrayRecord | ConfigRecord) -> bytes:
    """The blob of a packed record in either form; ``PackingError`` for anything else."""
    if isinstance(record, ConfigRecord):
        value = record[PACKED_KEY]
        if len(record) != 1 or not isinstance(value, bytes):
            raise PackingError(
                f"a packed config record holds exactly one '{PACKED_KEY}' bytes value; "
                f"found keys {sorted(record.keys())}, a {type(value).__name__}"
            )
        return value
    arr = record[PACKED_KEY]
    if len(record) != 1 or arr.stype != PACKED_STYPE:
        raise PackingError(
            f"a packed record holds exactly one '{PACKED_KEY}' array of stype "
            f"'{PACKED_STYPE}'; found keys {sorted(record.keys())}, stype {arr.stype!r}"
        )
    return bytes(arr.data)


def _unpack_record(record: ArrayRecord | ConfigRecord) -> ArrayRecord:
    blob = _blob_of(record)
    try:
        arrays = safetensors.numpy.load(blob)
        # the order is in the header's metadata, which load() does not return
        # (the header was just validated by load: an 8-byte length, then JSON)
        size = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
        order = json.loads(meta[_ORDER])
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise PackingError(f"malformed packed arrays: {type(exc).__name__}: {exc}") from None
    if not (
        isinstance(order, list)
        and all(isinstance(n, str) for n in order)
        and len(set(order)) == len(order)
        and set(order) == set(arrays)
    ):
        raise PackingError(
            f"malformed packed arrays: the order {order!r} does not list the arrays "
            f"{sorted(arrays)} once each"
        )
    return ArrayRecord({name: numpy_to_array(arrays[name]) for name in order})


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with each ``ArrayRecord`` of ``.npy`` arrays packed (module docstring)."""
    out: dict[str, object] = {}
    changed = False
    for name, record in content.items():
        packed = _pack_record(record) if isinstance(record, ArrayRecord) else None
        changed = changed or packed is not None
        out[name] = record if packed is None else packed
    return RecordDict(out) if changed else content  # type: ignore[arg-type]


def unpack_content(content: RecordDict) -> tuple[RecordDict, bool]:
    """``content`` with every packed record unpacked, and whether there was one.

    Raises :class:`PackingError` for a packed record that is malformed.
    """
    out: dict[str, object] = {}
    found = False
    for name, record in content.items():
        if isinstance(record, ArrayRecord | ConfigRecord) and PACKED_KEY in record:
            out[name] = _unpack_record(record)
            found = True
        else:
            out[name] = record
    return (RecordDict(out) if found else content), found  # type: ignore[arg-type]
