"""SecAgg+ building blocks against their specifications (known answers and edges).

Mutation testing of ``fedcore.secagg.protocol.crypto`` showed that nothing pinned the
formats that two clients (possibly of two fedcore versions) must agree on. Checked here,
each against an independent construction from its specification:

- X25519 with RFC 7748's own test vectors (scalars are little-endian);
- key derivation is HKDF-SHA256 (RFC 5869, computed here with ``hmac``) with salt
  ``fedcore/secagg/v1`` and ``info = label || 0x00 || binding || ids`` (8-byte big-endian
  ids), a pair key binding both ends in order;
- the round binding encodes the run id as 64 bits (two's complement when negative, as
  Flower's state stores run ids as sint64);
- relayed shares are ChaCha20-Poly1305 with associated data
  ``fedcore/secagg/share || 0x00 || binding || sender || receiver``;
- commitments are SHA-256 over a domain label, the binding, the node id and the secret
  (32 bytes, little-endian);
- secrets are rejection-sampled exactly as documented (255 bits, below p; X25519 ones
  clamped as RFC 7748 does);
- keystream buffers and masks at their edges, and refusals that say what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol.crypto import (
    FIELD_PRIME,
    RoundBinding,
    add_keystreams,
    aead_open,
    aead_seal,
    agree,
    commit,
    derive_key,
    keystream_words,
    new_field_secret,
    new_x25519_secret,
    pair_key,
    x25519_public,
)

BINDING = RoundBinding(run_id=7, server_round=3, session=bytes(range(16)))


def _exactly(message):
    return "^" + re.escape(message) + "$"


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869, written out: extract, then expand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _binding_bytes(b: RoundBinding) -> bytes:
    return struct.pack(">QQH", b.run_id % 2**64, b.server_round, len(b.session)) + b.session


def _ids(*ids: int) -> bytes:
    return b"".join(i.to_bytes(8, "big") for i in ids)


def _draws(*chunks: bytes):
    """A randbytes source that hands out the given 32-byte draws, in order."""
    it = iter(chunks)

    def randbytes(n: int) -> bytes:
        assert n == 32, f"asked for {n} bytes, secrets are drawn 32 bytes at a time"
        return next(it)

    return randbytes


# ---------------------------------------------------------------- X25519: RFC 7748, 6.1

_ALICE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
_ALICE_PUB = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
_BOB_PUB = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
_SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def test_x25519_matches_rfc_7748_test_vectors():
    alice = int.from_bytes(bytes.fromhex(_ALICE), "little")
    assert x25519_public(alice) == bytes.fromhex(_ALICE_PUB)
    assert agree(alice, bytes.fromhex(_BOB_PUB)) == bytes.fromhex(_SHARED)
    key = X25519PrivateKey.from_private_bytes(bytes.fromhex(_ALICE))
    assert agree(key, bytes.fromhex(_BOB_PUB)) == bytes.fromhex(_SHARED)


def test_an_unusable_peer_key_is_refused_saying_why():
    with pytest.raises(SecureAggregationError, match="^unusable X25519 public key: "):
        agree(5, bytes(32))  # the all-zero point has order 1


# ---------------------------------------------------------------- key derivation


def test_derive_key_is_hkdf_sha256_with_the_documented_salt_and_info():
    ikm = hashlib.sha256(b"shared").digest()
    info = b"mask" + b"\x00" + _binding_bytes(BINDING) + _ids(4, 9)
    expected = _hkdf_sha256(ikm, b"fedcore/secagg/v1", info)
    assert derive_key(ikm, b"mask", BINDING, 4, 9) == expected
    assert derive_key(ikm, b"mask", BINDING, 4, 9, 1) != expected  # every id is bound


def test_a_pair_key_binds_both_ends_in_order():
    ikm = hashlib.sha256(b"pair").digest()
    want = derive_key(ikm, b"share", BINDING, 3, 11)
    assert pair_key(ikm, b"share", BINDING, 11, 3) == pair_key(ikm, b"share", BINDING, 3, 11)
    assert pair_key(ikm, b"share", BINDING, 11, 3) == want
    assert pair_key(ikm, b"share", BINDING, 5, 11) != want


@pytest.mark.parametrize("run_id", [0, 200, 2**40 + 3, 2**63 + 5, 2**64 - 1, -1, -(2**63)])
def test_the_round_binding_encodes_any_64_bit_run_id(run_id):
    binding = RoundBinding(run_id=run_id, server_round=9, session=b"s" * 16)
    assert binding.encode() == _binding_bytes(binding)
    assert binding.encode()[:8] == (run_id % 2**64).to_bytes(8, "big")


# ---------------------------------------------------------------- relayed shares


def _aad(binding, sender, receiver):
    return b"fedcore/secagg/share\x00" + _binding_bytes(binding) + _ids(sender, receiver)


def test_relayed_shares_are_chacha20_poly1305_with_the_documented_associated_data():
    key = hashlib.sha256(b"k").digest()
    nonce = bytes(12)
    sealed = nonce + ChaCha20Poly1305(key).encrypt(nonce, b"share", _aad(BINDING, 2, 5))
    assert aead_open(key, sealed, BINDING, 2, 5) == b"share"
    ours = aead_seal(key, b"share", BINDING, 2, 5, randbytes=lambda n: bytes(n))
    assert ours == sealed


def test_a_share_opened_for_another_receiver_fails_even_under_the_same_key():
    key = hashlib.sha256(b"k").digest()
    sealed = aead_seal(key, b"share", BINDING, 2, 5)
    message = (
        "relayed share from 2 to 6 failed authentication (tampered with, replayed from "
        "another round, or sent under another sender)"
    )
    with pytest.raises(SecureAggregationError, match=_exactly(message)):
        aead_open(key, sealed, BINDING, 2, 6)


def test_an_empty_share_opens_and_a_short_one_is_refused_by_length():
    key = hashlib.sha256(b"k").digest()
    sealed = aead_seal(key, b"", BINDING, 1, 2)
    assert len(sealed) == 28 and aead_open(key, sealed, BINDING, 1, 2) == b""
    with pytest.raises(
        SecureAggregationError,
        match=_exactly("relayed share from 1 to 2 is 27 bytes; at least 28 expected"),
    ):
        aead_open(key, sealed[:27], BINDING, 1, 2)


# ---------------------------------------------------------------- commitments


def test_a_commitment_is_sha256_over_label_binding_node_and_secret():
    secret = FIELD_PRIME - 12345
    expected = hashlib.sha256(
        b"fedcore/secagg/commit\x00"
        + _binding_bytes(BINDING)
        + _ids(42)
        + secret.to_bytes(32, "little")
    ).digest()
    assert commit(secret, BINDING, 42) == expected


# ---------------------------------------------------------------- secrets


def test_field_secrets_are_255_bit_draws_below_p_rejection_sampled():
    top = b"\xff" * 32  # 2^255 - 1 after masking: >= p, rejected
    p_itself = FIELD_PRIME.to_bytes(32, "little")  # exactly p: rejected
    draw = bytes(range(1, 32)) + b"\x9f"  # top bit set: masked off
    got = new_field_secret(_draws(top, p_itself, draw))
    assert got == int.from_bytes(draw, "little") & (2**255 - 1)
    assert got < FIELD_PRIME and got % 2 == 1  # odd: the low bit is kept


def test_x25519_secrets_are_clamped_as_rfc_7748_does():
    top = b"\xff" * 32  # clamps to 2^255 - 8 >= p: rejected
    draw = bytes([0x07] + [0xA5] * 30 + [0x80])  # low 3 bits set, bit 255 set, 254 clear
    got = new_x25519_secret(_draws(top, draw))
    raw = bytearray(draw)
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    assert got == int.from_bytes(raw, "little")
    assert got % 8 == 0 and got >> 254 == 1


# ---------------------------------------------------------------- keystreams and masks


def test_keystream_buffers_of_the_documented_size_are_used_and_smaller_ones_are_not():
    key = hashlib.sha256(b"mask").digest()
    want = keystream_words(key, 10, np.uint32)
    exact = np.zeros(40 + 15, dtype=np.uint8)
    got = keystream_words(key, 10, np.uint32, out=exact)
    assert np.array_equal(got, want) and np.shares_memory(got, exact)
    small = np.zeros(40, dtype=np.uint8)  # below count * itemsize + 15: a fresh buffer
    got = keystream_words(key, 10, np.uint32, out=small)
    assert np.array_equal(got, want) and not np.shares_memory(got, small)


def test_a_mask_key_must_be_32_bytes():
    with pytest.raises(ValueError, match=_exactly("mask keys are 32 bytes")):
        keystream_words(b"short", 4, np.uint32)


@pytest.mark.parametrize("size", [0, 1, 2])
def test_masks_are_added_to_accumulators_of_any_size(size):
    key = hashlib.sha256(b"mask").digest()
    acc = np.zeros(size, dtype=np.uint64)
    add_keystreams(acc, [(key, 1)])
    assert np.array_equal(acc, keystream_words(key, size, np.uint64))
    add_keystreams(acc, [(key, -1)])
    assert not acc.any()


@pytest.mark.parametrize(
    "acc", [np.zeros((2, 2), np.uint32), np.zeros(4, np.float64), np.zeros(4, np.int64)]
)
def test_masks_need_a_flat_unsigned_accumulator(acc):
    with pytest.raises(ValueError, match=_exactly("acc must be a 1-D uint32 or uint64 array")):
        add_keystreams(acc, [(b"k" * 32, 1)])
