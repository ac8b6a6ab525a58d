"""Message conventions of the secure exchanges (shared by the server exchange and the client)."""

from __future__ import annotations

import struct
from typing import Any

from fedcore.core.errors import SecureAggregationError

__all__ = ["MASKED", "SECAGG", "pack_ids", "unpack_ids"]

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
