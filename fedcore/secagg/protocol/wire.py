"""Message conventions of the secure exchanges (shared by the server exchange and the client)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

from fedcore.core.errors import SecureAggregationError

__all__ = ["MASKED", "SECAGG", "content_digest", "pack_ids", "unpack_ids"]

#: ConfigRecord carrying the protocol fields (both directions).
SECAGG = "secagg"
#: ArrayRecord of the masked vector (client -> server, stage 3).
MASKED = "masked"


def pack_ids(ids: Any) -> bytes:
    """Node ids (unsigned 64-bit) as packed big-endian bytes."""
    ids = list(ids)
    return struct.pack(f">{len(ids)}Q", *ids)


def unpack_ids(data: bytes) -> list[int]:
    """Inverse of :func:`pack_ids`."""
    data = bytes(data)
    if len(data) % 8:
        raise SecureAggregationError(f"a node-id list of {len(data)} bytes is not a multiple of 8")
    return list(struct.unpack(f">{len(data) // 8}Q", data))


def _scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return [_scalar(v) for v in value]
    if isinstance(value, float):
        return {"float": value.hex()}
    return value


def content_digest(
    records: Mapping[str, Any], *, skip: str = SECAGG, cache: dict[int, bytes] | None = None
) -> bytes:
    """SHA-256 of a message's records (model arrays, config, strategy records), minus ``skip``.

    What a client signs in the consistency check: the model and config it trained
    on. Arrays hash by name, dtype, shape and their serialized bytes (no copy);
    config and metric records by their sorted items, exactly (floats by ``hex``).
    Duck-typed over Flower's record classes (an array record holds values with
    ``.data``). ``cache`` maps ``id(record)`` to its digest, for a server sending the
    same record object to many clients.
    """
    h = hashlib.sha256(b"fedcore/secagg/content\x00")
    for name in sorted(records):
        if name == skip:
            continue
        rec = records[name]
        key = id(rec)
        if cache is not None and key in cache:
            part = cache[key]
        else:
            r = hashlib.sha256()
            for k in sorted(rec.keys()):
                v = rec[k]
                if hasattr(v, "data") and hasattr(v, "shape"):
                    head = json.dumps([k, "array", str(v.dtype), list(v.shape), str(v.stype)])
                    r.update(struct.pack(">I", len(head)) + head.encode())
                    r.update(struct.pack(">Q", len(v.data)))
                    r.update(v.data)
                else:
                    item = json.dumps([k, _scalar(v)], sort_keys=True).encode()
                    r.update(struct.pack(">I", len(item)) + item)
            part = r.digest()
            if cache is not None:
                cache[key] = part
        label = name.encode()
        h.update(struct.pack(">I", len(label)) + label + part)
    return h.digest()
