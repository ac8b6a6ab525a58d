"""Identities bound to node ids: the CA-signed admitted list, relayed updates, the client's roster.

Kits come from the real ``fedcore provision``; every signature is real (the kits' EC
P-384 identity keys, the CA's ECDSA over ``admitted.json``); the roster is the one
:func:`fedcore.secagg.identities.roster_for` builds from a Flower ``Context`` holding the
node config ``fedcore client`` passes (identity-key, admitted-list, federation-ca).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from flwr.app import Context, RecordDict

from fedcore.core.errors import DeploymentError, SecureAggregationError
from fedcore.deploy.provision import FederationPaths, provision, revoke
from fedcore.secagg.identities import ADMITTED_FILE, identity_for, roster_for
from fedcore.secagg.protocol.rosters import (
    BoundRoster,
    CaRoster,
    CertificateIdentity,
    EphemeralIdentity,
    KeyIdentity,
)
from fedcore.storage.admitted import (
    SignedAdmitted,
    read_admitted_blob,
    sign_document,
    signature_path,
)
from fedcore.storage.keys import (
    ADMITTED_LIST,
    FEDERATION_CA,
    IDENTITY_KEY,
    TRUST_ON_FIRST_USE,
    fingerprint,
    load_identity_key,
)

MSG = b"run 1, round 1: advertised keys"


@pytest.fixture
def fed(tmp_path: Path) -> FederationPaths:
    return provision(tmp_path / "fed", clients=4)


def _kit_config(kit: Path, **extra: object) -> dict[str, object]:
    """The node config `fedcore client --kit KIT` passes."""
    return {
        IDENTITY_KEY: str(kit / "identity.key"),
        FEDERATION_CA: str(kit / "ca.pem"),
        ADMITTED_LIST: str(kit / "admitted.json"),
        **extra,
    }


def _context(node_config: dict[str, object], node_id: int = 1) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )


def _signer(fed: FederationPaths, name: str) -> KeyIdentity:
    return KeyIdentity(load_identity_key(fed.client_kit(name)))


def _advert(ident: object, node: int) -> tuple[int, bytes, bytes, bytes]:
    return node, ident.credential, MSG, ident.sign(MSG)  # type: ignore[attr-defined]


def _ca(fed: FederationPaths) -> bytes:
    return (fed.ca_dir / "ca.pem").read_bytes()


# -- the signed list -------------------------------------------------------------------


def test_signed_list_verifies_and_travels_as_one_blob(fed: FederationPaths) -> None:
    signed = SignedAdmitted.load(fed.client_kit("client-1") / "admitted.json")
    accepted = signed.verify(_ca(fed))
    assert sorted(accepted.values()) == ["client-1", "client-2", "client-3", "client-4"]
    key = load_identity_key(fed.client_kit("client-3")).public_key()
    assert accepted[fingerprint(key)] == "client-3"
    assert signed.version == 1
    blob = read_admitted_blob(fed.admitted)
    assert blob is not None and SignedAdmitted.from_bytes(blob) == signed
    assert SignedAdmitted.from_bytes(blob).verify(_ca(fed)) == accepted
    # no signature beside it (an older federation): nothing to relay
    signature_path(fed.admitted).unlink()
    assert read_admitted_blob(fed.admitted) is None
    with pytest.raises(DeploymentError, match=r"has no signature \(admitted.json.sig missing\)"):
        SignedAdmitted.load(fed.admitted)


def test_tampered_list_or_signature_or_another_ca_is_refused(
    fed: FederationPaths, tmp_path: Path
) -> None:
    signed = SignedAdmitted.load(fed.admitted)
    doc = json.loads(signed.document)
    mallory = provision(tmp_path / "other", clients=["mallory"])
    doc["clients"]["mallory"] = json.loads(mallory.admitted.read_text())["clients"]["mallory"]
    forged = SignedAdmitted(json.dumps(doc).encode(), signed.signature)
    with pytest.raises(DeploymentError, match="signature does not verify .* altered"):
        forged.verify(_ca(fed))
    flipped = bytearray(signed.signature)
    flipped[-1] ^= 1
    with pytest.raises(DeploymentError, match="signature does not verify"):
        SignedAdmitted(signed.document, bytes(flipped)).verify(_ca(fed))
    with pytest.raises(DeploymentError, match="signature does not verify"):
        signed.verify(_ca(mallory))  # another federation's CA
    # mallory's own list, properly signed by mallory's CA, is refused by this kit's CA
    theirs = SignedAdmitted.load(mallory.admitted)
    assert theirs.verify(_ca(mallory))
    with pytest.raises(DeploymentError, match="signature does not verify"):
        theirs.verify(_ca(fed))


def test_a_list_for_another_federation_or_malformed_is_refused(fed: FederationPaths) -> None:
    ca_key = serialization.load_pem_private_key((fed.ca_dir / "ca.key").read_bytes(), None)
    doc = json.loads(SignedAdmitted.load(fed.admitted).document)

    def signed(d: object) -> SignedAdmitted:
        raw = json.dumps(d).encode()
        return SignedAdmitted(raw, sign_document(raw, ca_key))  # type: ignore[arg-type]

    with pytest.raises(DeploymentError, match="is for federation 'feedbeef', but this kit is for"):
        signed({**doc, "federation": "feedbeef"}).verify(_ca(fed))
    with pytest.raises(DeploymentError, match="version None; an integer >= 1 expected"):
        signed({k: v for k, v in doc.items() if k != "version"}).verify(_ca(fed))
    with pytest.raises(DeploymentError, match="format"):
        signed({**doc, "format": "fedcore-admitted/1"}).verify(_ca(fed))
    one = next(iter(doc["clients"]))
    clash = {**doc, "clients": {**doc["clients"], "twin": doc["clients"][one]}}
    with pytest.raises(DeploymentError, match="share one key"):
        signed(clash).verify(_ca(fed))
    with pytest.raises(DeploymentError, match="not valid JSON"):
        signed_raw = b"{not json"
        SignedAdmitted(signed_raw, sign_document(signed_raw, ca_key)).verify(_ca(fed))  # type: ignore[arg-type]
    blob = SignedAdmitted.load(fed.admitted).to_bytes()
    with pytest.raises(DeploymentError, match="truncated"):
        SignedAdmitted.from_bytes(blob[:10])
    with pytest.raises(DeploymentError, match="header announces"):
        SignedAdmitted.from_bytes(blob + b"\0")
    with pytest.raises(DeploymentError, match="not an admitted-list blob"):
        SignedAdmitted.from_bytes(b"\x80\x04pickle" + blob[8:])


# -- the client's roster -----------------------------------------------------------------


def test_a_kit_accepts_its_federation_and_refuses_fabricated_neighbours(
    fed: FederationPaths,
) -> None:
    """The review's attack: a server inventing 12 neighbours with keys of its own."""
    roster, save = roster_for(_context(_kit_config(fed.client_kit("client-1"))))
    assert isinstance(roster, BoundRoster)
    for i, name in enumerate(("client-2", "client-3", "client-4")):
        roster.verify(*_advert(_signer(fed, name), 100 + i))
    refused = 0
    for node in range(200, 212):
        fresh = KeyIdentity(ec.generate_private_key(ec.SECP384R1()))  # signs correctly
        with pytest.raises(
            SecureAggregationError, match="is not in the federation's admitted list"
        ):
            roster.verify(*_advert(fresh, node))
        refused += 1
    assert refused == 12 and set(roster.pins) == {100, 101, 102}  # none of them pinned
    save()


def test_one_key_claimed_by_two_node_ids_is_refused(fed: FederationPaths) -> None:
    ctx = _context(_kit_config(fed.client_kit("client-1")))
    roster, save = roster_for(ctx)
    two = _signer(fed, "client-2")
    roster.verify(*_advert(two, 11))
    with pytest.raises(SecureAggregationError, match=r"signed for node 12, .* for node 11"):
        roster.verify(*_advert(two, 12))
    save()
    # the pins last for the run: next round's roster refuses it too
    again, _ = roster_for(ctx)
    with pytest.raises(SecureAggregationError, match=r"\(client-2\) signed for node 13"):
        again.verify(*_advert(two, 13))
    again.verify(*_advert(two, 11))


def test_a_node_id_switching_keys_is_refused(fed: FederationPaths) -> None:
    ctx = _context(_kit_config(fed.client_kit("client-1")))
    roster, save = roster_for(ctx)
    roster.verify(*_advert(_signer(fed, "client-2"), 11))
    with pytest.raises(
        SecureAggregationError, match="node 11 signed with key .*client-3.* earlier"
    ):
        roster.verify(*_advert(_signer(fed, "client-3"), 11))
    save()
    later, _ = roster_for(ctx)
    with pytest.raises(SecureAggregationError, match="node 11 signed with key"):
        later.verify(*_advert(_signer(fed, "client-3"), 11))


def test_a_revocation_reaches_the_client_through_the_relayed_list(
    fed: FederationPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "client-1-state"
    nc = _kit_config(fed.client_kit("client-1"), **{"state-dir": str(state_dir)})
    ctx = _context(nc)
    three = _signer(fed, "client-3")
    roster, save = roster_for(ctx)
    roster.verify(*_advert(three, 13))  # admitted in version 1
    save()
    old_blob = read_admitted_blob(fed.client_kit("client-1") / "admitted.json")

    revoke(fed.root, "client-3")  # version 2, on the server only
    relayed = read_admitted_blob(fed.admitted)  # what the server sends
    roster, save = roster_for(ctx, admitted_update=relayed)
    with pytest.raises(SecureAggregationError, match="revoked or never provisioned"):
        roster.verify(*_advert(three, 13))
    roster.verify(*_advert(_signer(fed, "client-2"), 12))
    save()
    # kept: the next round without a relayed list, and a new run of this client, refuse it
    roster, _ = roster_for(ctx)
    with pytest.raises(SecureAggregationError, match="revoked"):
        roster.verify(*_advert(three, 13))
    assert (state_dir / ADMITTED_FILE).read_bytes() == relayed
    roster, _ = roster_for(_context(dict(nc), node_id=1))
    with pytest.raises(SecureAggregationError, match="revoked"):
        roster.verify(*_advert(three, 30))
    # a server replaying version 1 (rollback) is ignored, with a log line
    with caplog.at_level(logging.WARNING, logger="fedcore.secagg"):
        roster, save = roster_for(ctx, admitted_update=old_blob)
    assert "version 1 is older than this node's 2" in caplog.text
    with pytest.raises(SecureAggregationError, match="revoked"):
        roster.verify(*_advert(three, 13))


def test_without_a_state_dir_the_newer_list_is_kept_in_the_context(fed: FederationPaths) -> None:
    ctx = _context(_kit_config(fed.client_kit("client-1")))
    revoke(fed.root, "client-3")
    _, save = roster_for(ctx, admitted_update=read_admitted_blob(fed.admitted))
    save()  # e.g. in the keys stage, where the server relays it
    roster, _ = roster_for(ctx)  # the shares stage: no list relayed
    with pytest.raises(SecureAggregationError, match="revoked"):
        roster.verify(*_advert(_signer(fed, "client-3"), 13))


def test_an_unsigned_or_altered_relayed_list_is_ignored(
    fed: FederationPaths, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = _context(_kit_config(fed.client_kit("client-1")))
    revoke(fed.root, "client-3")
    blob = bytearray(read_admitted_blob(fed.admitted) or b"")
    blob[-1] ^= 1  # the signature's last byte
    with caplog.at_level(logging.WARNING, logger="fedcore.secagg"):
        roster, _ = roster_for(ctx, admitted_update=bytes(blob))
        roster_for(ctx, admitted_update=b"a pickle, or anything else")
    assert "ignored the admitted list relayed by the server: the admitted list's signature" in (
        caplog.text
    )
    assert "not an admitted-list blob" in caplog.text
    roster.verify(*_advert(_signer(fed, "client-3"), 13))  # still the kit's version 1


def test_trust_on_first_use_only_without_a_kit_or_with_the_flag(
    fed: FederationPaths, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = KeyIdentity(ec.generate_private_key(ec.SECP384R1()))
    # simulation (no kit): first key pinned, then bound
    roster, _ = roster_for(_context({"partition-id": 0}))
    assert isinstance(roster, BoundRoster) and roster.accepted is None
    roster.verify(*_advert(stranger, 5))
    with pytest.raises(SecureAggregationError, match="node 5 signed with key"):
        roster.verify(*_advert(EphemeralIdentity.generate(), 5))
    # a kit without a list: refused, naming the flag and re-provisioning
    kit = fed.client_kit("client-1")
    bare = {IDENTITY_KEY: str(kit / "identity.key")}
    with pytest.raises(SecureAggregationError, match=r"--trust-on-first-use.*") as info:
        roster_for(_context(bare))
    assert "Re-provision" in str(info.value)
    with pytest.raises(SecureAggregationError, match="trust-on-first-use"):
        roster_for(_context({**bare, TRUST_ON_FIRST_USE: "false"}))
    with pytest.raises(SecureAggregationError, match="expected true or false"):
        roster_for(_context({**bare, TRUST_ON_FIRST_USE: "maybe"}))
    # ... accepted with the flag (warned), pins still bind
    with caplog.at_level(logging.WARNING, logger="fedcore.secagg"):
        roster, _ = roster_for(_context({**bare, TRUST_ON_FIRST_USE: True}))
    roster.verify(*_advert(stranger, 5))
    with pytest.raises(SecureAggregationError, match="already signed for node 5"):
        roster.verify(*_advert(stranger, 6))
    # the flag does not weaken a kit that has its list
    roster, _ = roster_for(_context(_kit_config(kit, **{TRUST_ON_FIRST_USE: True})))
    with pytest.raises(SecureAggregationError, match="not in the federation's admitted list"):
        roster.verify(*_advert(stranger, 5))


def test_an_old_kit_takes_the_first_list_its_ca_signed(fed: FederationPaths) -> None:
    kit = fed.client_kit("client-1")
    old = {IDENTITY_KEY: str(kit / "identity.key"), FEDERATION_CA: str(kit / "ca.pem")}
    with pytest.raises(SecureAggregationError, match="trust-on-first-use"):
        roster_for(_context(old))
    roster, save = roster_for(_context(old), admitted_update=read_admitted_blob(fed.admitted))
    stranger = KeyIdentity(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(SecureAggregationError, match="not in the federation's admitted list"):
        roster.verify(*_advert(stranger, 5))
    roster.verify(*_advert(_signer(fed, "client-2"), 6))


def test_a_kit_list_from_another_federation_is_refused(
    fed: FederationPaths, tmp_path: Path
) -> None:
    other = provision(tmp_path / "other", clients=1)
    nc = _kit_config(fed.client_kit("client-1"))
    nc[ADMITTED_LIST] = str(other.admitted)
    with pytest.raises(SecureAggregationError, match="admitted list .* is unusable"):
        roster_for(_context(nc))


def test_the_kit_key_signs_and_simulation_keeps_its_own(fed: FederationPaths) -> None:
    kit = fed.client_kit("client-2")
    ident = identity_for(_context(_kit_config(kit)))
    assert isinstance(ident, KeyIdentity)
    roster, _ = roster_for(_context(_kit_config(fed.client_kit("client-1"))))
    roster.verify(*_advert(ident, 2))
    sim = _context({"partition-id": 0})
    assert identity_for(sim).credential == identity_for(sim).credential  # kept in state


# -- the certificate scheme pins node ids too ---------------------------------------------


def _cert(subject: object, issuer_key: object, name: str) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
        .public_key(subject.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )


def test_the_ca_roster_binds_node_ids(tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(_cert(ca_key, ca_key, "ca").public_bytes(serialization.Encoding.PEM))
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
    ids = [CertificateIdentity(k, _cert(k, ca_key, f"n{i}")) for i, k in enumerate(keys)]
    ctx = _context({"ca-cert": str(ca_path)})
    roster, save = roster_for(ctx)
    assert isinstance(roster, CaRoster)
    roster.verify(*_advert(ids[0], 1))
    with pytest.raises(SecureAggregationError, match="already signed for node 1"):
        roster.verify(*_advert(ids[0], 2))
    with pytest.raises(SecureAggregationError, match="node 1 signed with key"):
        roster.verify(*_advert(ids[1], 1))
    save()
    again, _ = roster_for(ctx)
    with pytest.raises(SecureAggregationError, match="already signed for node 1"):
        again.verify(*_advert(ids[0], 3))


# -- the server's side: the ServerApp finds the list to relay ------------------------------


def test_the_serverapp_context_names_the_server_kits_list(
    fed: FederationPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `fedcore server`'s SuperLink process does before serving (Flower gives {})."""
    from flwr.server.superlink.linkstate import LinkState, LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from fedcore import flower_adapter as flower

    original = LinkState._refresh_run_series_context  # restored after the test
    monkeypatch.setattr(LinkState, "_refresh_run_series_context", original)
    flower.set_serverapp_node_config({ADMITTED_LIST: str(fed.admitted)})
    state = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    ).state()
    run_id = state.create_run(None, None, None, {}, "", None, None, "serverapp")
    series = state.get_run_info(run_ids=[run_id])[0].series_id
    node_config = state.get_run_series_context(series).node_config
    assert node_config == {ADMITTED_LIST: str(fed.admitted)}
    blob = read_admitted_blob(node_config[ADMITTED_LIST])
    assert blob is not None and SignedAdmitted.from_bytes(blob).verify(_ca(fed))
