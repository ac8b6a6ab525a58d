"""Secure aggregation building blocks: Shamir, AEAD, masks, quantization, graph, identity."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from fedcore.core.errors import SecureAggregationError
from fedcore.core.seeds import rng
from fedcore.secagg.protocol import shamir
from fedcore.secagg.protocol.crypto import (
    FIELD_PRIME,
    RoundBinding,
    add_keystreams,
    aead_open,
    aead_seal,
    agree,
    keystream_words,
    new_field_secret,
    new_x25519_secret,
    pair_key,
    x25519_public,
)
from fedcore.secagg.protocol.graph import auto_neighbours, harary_graph, is_connected, resolve
from fedcore.secagg.protocol.quantize import (
    WEIGHT_OVERFLOW,
    Quantizer,
    choose_quantizer,
    decode,
    encode,
)
from fedcore.secagg.protocol.rosters import (
    CaRoster,
    CertificateIdentity,
    EphemeralIdentity,
    PinnedRoster,
)

B = RoundBinding(run_id=5, server_round=3, session=b"s" * 16)
P = FIELD_PRIME


# -- Shamir -------------------------------------------------------------------------
def test_shamir_any_t_shares_reconstruct_and_fewer_fail():
    secrets = [new_field_secret(), FIELD_PRIME - 1, 0]
    holders = [1001, 1002, 1003, 1004, 1005]
    shares = shamir.split(secrets, 3, holders)
    for subset in ([1001, 1002, 1003], [1005, 1003, 1001], [1002, 1004, 1005]):
        for i, s in enumerate(secrets):
            assert shamir.reconstruct({h: shares[h][i] for h in subset}, 3) == s
    with pytest.raises(SecureAggregationError, match="2 share"):
        shamir.reconstruct({h: shares[h][0] for h in holders[:2]}, 3)


def _holders(g, count):
    """``count`` distinct nonzero 63-bit evaluation points (node ids)."""
    out: list[int] = []
    while len(out) < count:
        h = int.from_bytes(g.bytes(8), "big") >> 1
        if h and h not in out:
            out.append(h)
    return out


def _poly_through(points):
    """Coefficients (constant first) of the unique polynomial of degree < len(points)
    through ``points`` over GF(p): Lagrange's basis, expanded (a slow, independent oracle)."""
    coeffs = [0] * len(points)
    for j, (xj, yj) in enumerate(points):
        basis, den = [1], 1  # prod_{m != j} (X - x_m), lowest degree first
        for m, (xm, _) in enumerate(points):
            if m != j:
                basis = [
                    ((basis[i - 1] if i else 0) - xm * (basis[i] if i < len(basis) else 0)) % P
                    for i in range(len(basis) + 1)
                ]
                den = den * (xj - xm) % P
        scale = yj * pow(den, -1, P) % P
        coeffs = [(c + scale * b) % P for c, b in zip(coeffs, basis, strict=True)]
    return coeffs


def _at(coeffs, x):
    return sum(c * pow(x, i, P) for i, c in enumerate(coeffs)) % P


@pytest.mark.parametrize("t", [2, 3, 4, 5])
def test_shamir_t_minus_one_shares_fit_every_secret_and_do_not_reveal_it(t):
    """Perfect hiding: t-1 shares lie on exactly one degree-(t-1) polynomial for EVERY
    candidate secret, and interpolating them alone (as if t-1 were enough) does not give
    the secret. A degree-(t-2) polynomial (t-1 shares reconstruct) fails the second check."""
    g = rng(0, "test-shamir-secrecy", t)
    for _ in range(200):
        secret, other = new_field_secret(g.bytes), new_field_secret(g.bytes)
        holders = _holders(g, t + 2)
        shares = {h: v[0] for h, v in shamir.split([secret], t, holders, g.bytes).items()}
        seen = {h: shares[h] for h in holders[: t - 1]}
        rest = holders[t - 1 :]
        assert shamir.reconstruct(seen, t - 1) != secret  # equal with probability 1/p
        fits = {}
        for candidate in (secret, other):
            coeffs = _poly_through([(0, candidate), *seen.items()])
            assert len(coeffs) == t and coeffs[0] == candidate
            assert all(_at(coeffs, h) == y for h, y in seen.items())
            fits[candidate] = all(_at(coeffs, h) == shares[h] for h in rest)
        # only a t-th share tells the two apart: the true secret's polynomial is the one
        # the other holders' shares lie on, the other candidate's is not
        assert fits == {secret: True, other: False}


@pytest.mark.parametrize("t", [2, 3, 4, 5])
def test_shamir_t_minus_one_shares_are_distributed_alike_for_any_secret(t):
    """Chi-square (alpha 1e-6 each): for fixed holders, each of t-1 shares and their
    Lagrange value at 0 fall in 8 equal slices of the field uniformly, for secret 0 and
    for secret p-1 alike. A degree-(t-2) polynomial puts the Lagrange value on the secret."""
    from scipy.stats import chi2, chisquare

    g = rng(0, "test-shamir-distribution", t)
    holders = _holders(g, t)
    seen = holders[: t - 1]
    trials, bins = 400, 8
    critical = chi2.ppf(1 - 1e-6, bins - 1)
    counts = {}
    for secret in (0, FIELD_PRIME - 1):
        hist = np.zeros((t, bins), np.int64)  # rows: each share, then the value at 0
        for _ in range(trials):
            shares = shamir.split([secret], t, holders, g.bytes)
            values = [shares[h][0] for h in seen]
            values.append(shamir.reconstruct(dict(zip(seen, values, strict=True)), t - 1))
            for row, v in enumerate(values):
                hist[row, v * bins // FIELD_PRIME] += 1
        for row in hist:
            assert chisquare(row).statistic < critical, (secret, hist)
        counts[secret] = hist
    # and the two secrets' histograms are alike (two-sample chi-square, 2 x 8 table)
    for a, b in zip(counts[0], counts[FIELD_PRIME - 1], strict=True):
        expected = (a + b) / 2
        stat = float((((a - expected) ** 2 + (b - expected) ** 2) / expected).sum())
        assert stat < critical, (a, b)


def test_shamir_refuses_bad_holders_and_thresholds():
    with pytest.raises(SecureAggregationError):
        shamir.split([1], 4, [1, 2, 3])
    with pytest.raises(SecureAggregationError):
        shamir.split([1], 2, [1, 1, 2])
    with pytest.raises(SecureAggregationError):
        shamir.split([FIELD_PRIME], 2, [1, 2])


# -- key agreement, AEAD ---------------------------------------------------------------
def test_x25519_secrets_are_clamped_field_elements_and_agree():
    a, b = new_x25519_secret(), new_x25519_secret()
    assert a < FIELD_PRIME and a % 8 == 0 and a >> 254 == 1
    assert agree(a, x25519_public(b)) == agree(b, x25519_public(a))
    assert pair_key(agree(a, x25519_public(b)), b"l", B, 1, 2) == pair_key(
        agree(b, x25519_public(a)), b"l", B, 2, 1
    )


def test_keys_are_bound_to_run_round_session_and_pair():
    shared = os.urandom(32)
    base = pair_key(shared, b"mask", B, 1, 2)
    others = [
        pair_key(shared, b"mask", RoundBinding(6, 3, B.session), 1, 2),
        pair_key(shared, b"mask", RoundBinding(5, 4, B.session), 1, 2),
        pair_key(shared, b"mask", RoundBinding(5, 3, b"t" * 16), 1, 2),
        pair_key(shared, b"mask", B, 1, 3),
        pair_key(shared, b"share", B, 1, 2),
    ]
    assert len(base) == 32 and base not in others and len(set(others)) == len(others)


def test_aead_rejects_tampering_replay_and_misrouting():
    key = os.urandom(32)
    box = aead_seal(key, b"x" * 64, B, 1, 2)
    assert aead_open(key, box, B, 1, 2) == b"x" * 64
    flipped = box[:20] + bytes([box[20] ^ 1]) + box[21:]
    with pytest.raises(SecureAggregationError, match="authentication"):
        aead_open(key, flipped, B, 1, 2)
    with pytest.raises(SecureAggregationError):  # replayed into the next round
        aead_open(key, box, RoundBinding(5, 4, B.session), 1, 2)
    with pytest.raises(SecureAggregationError):  # replayed under another session of the round
        aead_open(key, box, RoundBinding(5, 3, b"u" * 16), 1, 2)
    with pytest.raises(SecureAggregationError):  # claimed to come from another sender
        aead_open(key, box, B, 3, 2)
    with pytest.raises(SecureAggregationError):  # reflected back to its sender
        aead_open(key, box, B, 2, 1)
    with pytest.raises(SecureAggregationError):
        aead_open(key, box[:10], B, 1, 2)


def test_keystream_is_aes_ctr_little_endian_words():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    ref = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 1000))
    w64 = keystream_words(key, 1000, np.uint64)
    assert w64.tobytes() == ref and w64.dtype == np.dtype("<u8")
    assert keystream_words(key, 7, np.uint32).tobytes() == ref[:28]
    buf = np.empty(8 * 1000 + 15, dtype=np.uint8)
    assert keystream_words(key, 1000, np.uint64, out=buf).tobytes() == ref


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_masks_equal_the_sum_of_keystreams(dtype, threads):
    d = 3 * (1 << 18) // np.dtype(dtype).itemsize + 5  # several blocks, ragged end
    keys = [bytes([i]) * 32 for i in range(3)]
    acc = np.arange(d, dtype=dtype)
    ref = acc.copy()
    ref += keystream_words(keys[0], d, dtype)
    ref -= keystream_words(keys[1], d, dtype)
    ref += keystream_words(keys[2], d, dtype)
    add_keystreams(acc, [(keys[0], 1), (keys[1], -1), (keys[2], 1)], threads=threads)
    assert np.array_equal(acc, ref)


# -- quantization -----------------------------------------------------------------------
@pytest.mark.parametrize("ring", [32, 64])
def test_encode_decode_sum_within_bound(ring):
    q = Quantizer(clip=2.0, bits=12, ring_bits=ring, metric_clip=16.0)
    g = np.random.default_rng(0)
    deltas = [g.uniform(-3, 3, 500) for _ in range(4)]
    weights = [3, 10, 1, 40]
    metrics = [(0.5,), (1.5,), (2.0,), (0.25,)]
    total = np.zeros(502 + 1, dtype=q.dtype)
    for i, (d, w, m) in enumerate(zip(deltas, weights, metrics, strict=True)):
        total += encode(d, w, m, q, hashlib.sha256(bytes([i])).digest())
    out = decode(total, q, 1, 4)
    n = sum(weights)
    ref = sum(w * np.clip(d, -2, 2) for d, w in zip(deltas, weights, strict=True)) / n
    assert out.total_weight == n
    assert np.abs(out.mean - ref).max() < q.error_bound(4, n) == 4 * q.step / n
    assert out.clipped == sum(int((np.abs(d) > 2).sum()) for d in deltas)
    ref_m = sum(w * m[0] for w, m in zip(weights, metrics, strict=True)) / n
    assert abs(out.metrics[0] - ref_m) < 4 * q.metric_step / n


def test_stochastic_rounding_is_unbiased_and_reproducible():
    q = Quantizer(clip=1.0, bits=4, ring_bits=32)
    x = np.full(200_000, 0.3 * q.step)
    a = encode(x, 1, (), q, b"k" * 32)
    assert np.array_equal(a, encode(x, 1, (), q, b"k" * 32))
    frac_up = a[:-2].astype(np.float64).mean()
    assert abs(frac_up - 0.3) < 0.01  # E[SR(0.3)] = 0.3


def test_encode_refuses_nan_and_oversized_weight_and_decode_refuses_wrap():
    q = Quantizer(clip=1.0, bits=20, ring_bits=32)
    with pytest.raises(SecureAggregationError, match="NaN"):
        encode(np.array([np.nan]), 1, (), q, b"k" * 32)
    with pytest.raises(SecureAggregationError, match="ring"):
        encode(np.zeros(3), 5000, (), q, b"k" * 32)
    vec = encode(np.zeros(3), 2100, (), q, b"k" * 32)
    with pytest.raises(SecureAggregationError, match="wrapped"):
        decode(vec + vec, q, 0, 2)  # 4200 * 2^19 > 2^31
    with pytest.raises(SecureAggregationError):
        Quantizer(clip=1.0, bits=30, ring_bits=32)


def test_encode_of_array_pairs_equals_encode_of_their_difference():
    q = Quantizer(clip=1.0, bits=20, ring_bits=64)
    g = np.random.default_rng(1)
    new = [g.standard_normal((30, 7)).astype(np.float32), g.standard_normal(5).astype(np.float32)]
    old = [g.standard_normal((30, 7)).astype(np.float32), g.standard_normal(5).astype(np.float32)]
    flat = np.concatenate(
        [(a.astype(np.float64) - b).ravel() for a, b in zip(new, old, strict=True)]
    )
    key = b"r" * 32
    assert np.array_equal(
        encode(list(zip(new, old, strict=True)), 7, (1.0,), q, key), encode(flat, 7, (1.0,), q, key)
    )


def test_ring_choice_is_64_first_then_32_with_room_and_never_changes_the_values():
    def pick(prev, clients=10, bits=16, ring=0):
        return choose_quantizer(
            clip=4.0, bits=bits, ring_bits=ring, clients=clients, previous_weight=prev
        )

    assert (pick(None).ring_bits, pick(None).bits) == (64, 16)
    q = pick(1300)
    assert (q.ring_bits, q.bits) == (32, 16)
    assert 4 * 1300 * 2**15 + 10 < 2**31
    assert 10 * q.max_weight() < 2**32  # the weight coordinate cannot wrap
    assert pick(20_000).ring_bits == 64  # 4 * 20000 * 2^15 >= 2^31
    assert pick(100, clients=2**16).ring_bits == 64  # clients >= 2^bits
    assert pick(100, bits=30).ring_bits == 64  # too many bits for 32
    assert pick(None, bits=12, ring=32).ring_bits == 32  # forced
    # same quantized values in both rings (two's complement, reduced mod 2^32)
    x = np.random.default_rng(0).uniform(-5, 5, 1000)
    a = encode(x, 7, (0.5,), pick(None), b"k" * 32)
    b = encode(x, 7, (0.5,), q, b"k" * 32)
    assert np.array_equal(a.astype(np.uint32), b)
    with pytest.raises(SecureAggregationError, match=WEIGHT_OVERFLOW):
        encode(np.zeros(2), q.max_weight() + 1, (), q, b"k" * 32)


# -- graph --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4, 7, 10, 20, 33, 100])
def test_harary_graph_is_regular_connected_and_seeded(n):
    nodes = list(range(500, 500 + n))
    k, t = resolve(n, 0, 0)
    g = harary_graph(nodes, k, seed=1, server_round=2)
    assert all(len(v) == k and u not in v for u, v in g.items())
    assert all(u in g[v] for u in g for v in g[u])  # symmetric
    assert is_connected(nodes, g)
    assert g == harary_graph(nodes, k, seed=1, server_round=2)
    assert t == k // 2 + 1
    if n <= 11:
        assert k == n - 1


def test_auto_k_grows_like_log_n_and_tiny_rounds_are_refused():
    assert [auto_neighbours(n) for n in (10, 20, 100, 1000)] == [9, 12, 16, 22]
    assert resolve(7, 3, 0) == (4, 3)  # 7 * 3 is odd: k raised to 4
    with pytest.raises(SecureAggregationError, match="at least 3"):
        resolve(2, 0, 0)


# -- identities ----------------------------------------------------------------------------
def test_pinned_roster_verifies_and_pins_first_key():
    a, b = EphemeralIdentity.generate(), EphemeralIdentity.generate()
    roster = PinnedRoster({})
    roster.verify(1, a.credential, b"m", a.sign(b"m"))
    with pytest.raises(SecureAggregationError, match="invalid signature"):
        roster.verify(1, a.credential, b"m2", a.sign(b"m"))
    with pytest.raises(SecureAggregationError, match="pinned"):
        roster.verify(1, b.credential, b"m", b.sign(b"m"))
    assert EphemeralIdentity.from_private_bytes(a.private_bytes()).credential == a.credential
    assert "private" in repr(a) and a.private_bytes().hex() not in repr(a)


def _cert(subject_key, issuer_key, name, issuer_name=None, days=1):
    now = dt.datetime.now(dt.UTC)
    algo = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(issuer_key, algo)
    )


@pytest.mark.parametrize(
    "node_key",
    [ed25519.Ed25519PrivateKey.generate, lambda: ec.generate_private_key(ec.SECP256R1())],
)
def test_ca_roster_accepts_only_ca_issued_admitted_identities(tmp_path, node_key):
    ca_key = ed25519.Ed25519PrivateKey.generate()
    ca = _cert(ca_key, ca_key, "fedcore-ca")
    key = node_key()
    cert = _cert(key, ca_key, "client-1", "fedcore-ca")
    kp, cp = tmp_path / "node.key", tmp_path / "node.pem"
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.chmod(0o644)
    with pytest.raises(SecureAggregationError, match="chmod 600"):
        CertificateIdentity.from_files(kp, cp)
    kp.chmod(0o600)
    ident = CertificateIdentity.from_files(kp, cp)
    roster = CaRoster([ca], now=dt.datetime.now(dt.UTC))
    fp = roster.verify(9, ident.credential, b"m", ident.sign(b"m"))
    with pytest.raises(SecureAggregationError, match="invalid signature"):
        roster.verify(9, ident.credential, b"other", ident.sign(b"m"))
    # a self-signed (or other-CA) certificate is refused
    rogue = ed25519.Ed25519PrivateKey.generate()
    rogue_id = CertificateIdentity(rogue, _cert(rogue, rogue, "client-1"))
    with pytest.raises(SecureAggregationError, match="trusted CA"):
        roster.verify(9, rogue_id.credential, b"m", rogue_id.sign(b"m"))
    # admitted-key list on the server side
    CaRoster([ca], admitted={fp}).verify(9, ident.credential, b"m", ident.sign(b"m"))
    with pytest.raises(SecureAggregationError, match="admitted"):
        CaRoster([ca], admitted=set()).verify(9, ident.credential, b"m", ident.sign(b"m"))
