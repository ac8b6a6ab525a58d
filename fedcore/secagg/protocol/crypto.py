"""Cryptographic building blocks of SecAgg+: key agreement, key derivation, AEAD, masks.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017; Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020.

Everything here comes from ``cryptography`` (OpenSSL):

- key agreement: X25519 (RFC 7748); private keys are 32 bytes from the
  operating system's CSPRNG (``os.urandom``), clamped as RFC 7748 does;
- key derivation: HKDF-SHA256 (RFC 5869) with a domain label, the run, the
  round, the round's session nonce and the (ordered) pair bound into ``info``;
- relayed shares: ChaCha20-Poly1305 (RFC 8439) with a fresh random nonce, the
  associated data binding run, round, session, sender and receiver;
- masks: the AES-256-CTR keystream under a full 256-bit derived key, read as
  little-endian ``uint32``/``uint64`` words. No short seeds, no ``RandomState``.

Nothing in this module logs, reads the clock or touches a global RNG; every
secret comes from an explicit ``randbytes`` callable (``os.urandom`` unless a
test passes its own).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.core.errors import SecureAggregationError

__all__ = [
    "FIELD_PRIME",
    "RandBytes",
    "RoundBinding",
    "add_keystreams",
    "aead_open",
    "aead_seal",
    "agree",
    "commit",
    "derive_key",
    "keystream_words",
    "new_field_secret",
    "new_x25519_secret",
    "x25519_private",
    "x25519_public",
]

RandBytes = Callable[[int], bytes]

#: 2**255 - 19: the prime of Shamir's field (255 bits; every secret shared is < it).
FIELD_PRIME = 2**255 - 19

_SALT = b"fedcore/secagg/v1"
_NONCE_LEN = 12
_ZEROS_CACHE: dict[int, np.ndarray] = {}


@dataclass(frozen=True)
class RoundBinding:
    """What every derived key, signature and associated data is bound to.

    Parameters
    ----------
    run_id : int
        Flower run id.
    server_round : int
        Round number.
    session : bytes
        The round's 16-byte nonce chosen by the server (a retried round gets a new one).

    """

    run_id: int
    server_round: int
    session: bytes

    def encode(self) -> bytes:
        """Fixed-length, unambiguous encoding (8 + 8 + length-prefixed session)."""
        return struct.pack(
            ">QQH", self.run_id & (2**64 - 1), self.server_round, len(self.session)
        ) + (self.session)


def _ids(*node_ids: int) -> bytes:
    return b"".join(struct.pack(">Q", n) for n in node_ids)


def new_x25519_secret(randbytes: RandBytes = os.urandom) -> int:
    """Return a clamped X25519 private scalar (RFC 7748) that is also a field element (< p)."""
    while True:
        raw = bytearray(randbytes(32))
        raw[0] &= 248
        raw[31] &= 127
        raw[31] |= 64
        value = int.from_bytes(raw, "little")
        if value < FIELD_PRIME:
            return value


def new_field_secret(randbytes: RandBytes = os.urandom) -> int:
    """Return a uniformly random 255-bit secret below the field prime (rejection sampled)."""
    while True:
        value = int.from_bytes(randbytes(32), "little") & (2**255 - 1)
        if value < FIELD_PRIME:
            return value


def _x25519_private(secret: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(secret.to_bytes(32, "little"))


def x25519_public(secret: int) -> bytes:
    """Return the 32-byte public key of an X25519 private scalar."""
    return _x25519_private(secret).public_key().public_bytes_raw()


def x25519_private(secret: int) -> X25519PrivateKey:
    """Build the key object of a private scalar (once, when agreeing with many peers)."""
    return _x25519_private(secret)


def agree(secret: int | X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret; refuses malformed or low-order peer keys."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        own = _x25519_private(secret) if isinstance(secret, int) else secret
        return own.exchange(peer)
    except ValueError as exc:
        raise SecureAggregationError(f"unusable X25519 public key: {exc}") from None


def derive_key(ikm: bytes, label: bytes, binding: RoundBinding, *node_ids: int) -> bytes:
    """Derive a 256-bit key: HKDF-SHA256(ikm, salt, info = label || binding || node ids)."""
    info = label + b"\x00" + binding.encode() + _ids(*node_ids)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(ikm)


def pair_key(shared: bytes, label: bytes, binding: RoundBinding, a: int, b: int) -> bytes:
    """Key of the unordered pair ``{a, b}`` (both ends derive the same one)."""
    lo, hi = (a, b) if a < b else (b, a)
    return derive_key(shared, label, binding, lo, hi)


def _share_aad(binding: RoundBinding, sender: int, receiver: int) -> bytes:
    return b"fedcore/secagg/share\x00" + binding.encode() + _ids(sender, receiver)


def aead_seal(
    key: bytes,
    plaintext: bytes,
    binding: RoundBinding,
    sender: int,
    receiver: int,
    randbytes: RandBytes = os.urandom,
) -> bytes:
    """ChaCha20-Poly1305 ``nonce || ciphertext`` with AAD binding round, sender and receiver."""
    nonce = randbytes(_NONCE_LEN)
    return nonce + ChaCha20Poly1305(key).encrypt(
        nonce, plaintext, _share_aad(binding, sender, receiver)
    )


def aead_open(
    key: bytes, sealed: bytes, binding: RoundBinding, sender: int, receiver: int
) -> bytes:
    """Decrypt and authenticate; ``SecureAggregationError`` if tampered, misrouted or replayed."""
    if len(sealed) < _NONCE_LEN + 16:
        raise SecureAggregationError(
            f"relayed share from {sender} to {receiver} is {len(sealed)} bytes; "
            f"at least {_NONCE_LEN + 16} expected"
        )
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:_NONCE_LEN], sealed[_NONCE_LEN:], _share_aad(binding, sender, receiver)
        )
    except InvalidTag:
        raise SecureAggregationError(
            f"relayed share from {sender} to {receiver} failed authentication "
            "(tampered with, replayed from another round, or sent under another sender)"
        ) from None


def commit(secret: int, binding: RoundBinding, node_id: int) -> bytes:
    """SHA-256 commitment to a 255-bit secret (hiding: the secret has 255 bits of entropy)."""
    h = hashlib.sha256(b"fedcore/secagg/commit\x00")
    h.update(binding.encode())
    h.update(_ids(node_id))
    h.update(secret.to_bytes(32, "little"))
    return h.digest()


def _zeros(nbytes: int) -> np.ndarray:
    z = _ZEROS_CACHE.get(nbytes)
    if z is None:
        if len(_ZEROS_CACHE) > 4:
            _ZEROS_CACHE.clear()
        z = _ZEROS_CACHE[nbytes] = np.zeros(nbytes, dtype=np.uint8)
    return z


def keystream_words(
    key: bytes, count: int, dtype: np.dtype | type, out: np.ndarray | None = None
) -> np.ndarray:
    """``count`` little-endian words of the AES-256-CTR keystream under ``key``.

    Parameters
    ----------
    key : bytes
        32-byte key (a full-entropy HKDF output; never reused across purposes).
    count : int
        Number of words.
    dtype : numpy dtype
        ``uint32`` or ``uint64``.
    out : numpy.ndarray, optional
        A buffer of at least ``count * itemsize + 15`` bytes (``uint8``) to write
        into, so repeated calls do not allocate.

    Returns
    -------
    numpy.ndarray
        A view of ``count`` words (into ``out`` when given).

    """
    if len(key) != 32:
        raise ValueError("mask keys are 32 bytes")
    dt = np.dtype(dtype).newbyteorder("<")
    nbytes = count * dt.itemsize
    if out is None or out.nbytes < nbytes + 15:
        out = np.empty(nbytes + 15, dtype=np.uint8)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    written = enc.update_into(_zeros(nbytes), out)
    if written != nbytes:  # pragma: no cover - CTR is a stream mode
        raise AssertionError("short keystream")
    return out[:nbytes].view(dt)


_CHUNK_BYTES = 1 << 18  # 256 KiB of keystream per block: it is added while still in cache


def add_keystreams(
    acc: np.ndarray, streams: Sequence[tuple[bytes, int]], *, threads: int = 1
) -> None:
    """``acc += sum(sign * PRG(key))`` modulo ``2^(8 * itemsize)``, in place.

    ``PRG(key)`` is exactly :func:`keystream_words` ``(key, acc.size, acc.dtype)``.
    All streams are generated block by block and added while the block is in
    cache (one pass over ``acc``); with ``threads > 1`` disjoint coordinate
    ranges run in parallel (OpenSSL releases the GIL), each starting its CTR
    counter at its own offset.

    Parameters
    ----------
    acc : numpy.ndarray
        1-D ``uint32``/``uint64`` array, C-contiguous.
    streams : Sequence[tuple[bytes, int]]
        ``(32-byte key, +1 or -1)`` pairs.
    threads : int (default: 1)
        Worker threads.

    """
    if acc.ndim != 1 or acc.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError("acc must be a 1-D uint32 or uint64 array")
    if not streams or acc.size == 0:
        return
    item = acc.dtype.itemsize
    words = _CHUNK_BYTES // item
    d = acc.size
    blocks = -(-d // words)
    per = -(-blocks // max(1, threads))
    ranges = [(b * words, min(d, (b + per) * words)) for b in range(0, blocks, per)]

    def work(lo: int, hi: int) -> None:
        counter = (lo * item // 16).to_bytes(16, "big")  # lo * item is a multiple of 16
        encs = [
            (Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor(), sign)
            for key, sign in streams
        ]
        buf = np.empty(_CHUNK_BYTES + 15, dtype=np.uint8)
        zeros = _zeros(_CHUNK_BYTES)
        for s in range(lo, hi, words):
            e = min(hi, s + words)
            nbytes = (e - s) * item
            a = acc[s:e]
            for enc, sign in encs:
                enc.update_into(zeros[:nbytes], buf)
                w = buf[:nbytes].view(acc.dtype)
                if sign > 0:
                    np.add(a, w, out=a)
                else:
                    np.subtract(a, w, out=a)

    _zeros(_CHUNK_BYTES)  # filled once, before any thread reads it
    if len(ranges) == 1:
        work(*ranges[0])
        return
    with ThreadPoolExecutor(len(ranges)) as pool:
        for f in [pool.submit(work, lo, hi) for lo, hi in ranges]:
            f.result()
