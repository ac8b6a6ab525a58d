"""Where a client's secure-aggregation identity and roster come from: its kit, or its own state.

Bonawitz et al., CCS 2017, Sec. 6: a client signs its advertised keys, and its
peers must know whose keys to accept. :func:`identity_for` is what this node
signs with, :func:`roster_for` what it checks its neighbours with:

- **deployment** (node config ``identity-key``, the kit's key, which ``fedcore
  client`` passes): peers must be in the federation's admitted list, signed by the
  federation CA (node config ``admitted-list``, checked against ``federation-ca``;
  both from the kit). A newer list relayed by the server replaces the kit's when
  the CA signed it and its version is higher; the newest verified list is kept
  (in ``Context.state`` and, with a ``state-dir``, on disk) and wins afterwards,
  so a revocation, once seen, stays. An older or unsigned list is ignored, with a
  log line. A kit without a list (an older fedcore) takes the first list its CA
  signed that the server relays; until then a provisioned node refuses to
  aggregate, unless node config ``trust-on-first-use`` is true (``fedcore client
  --trust-on-first-use``);
- **certificate scheme** (``ca-cert``): peers need a certificate from that CA;
- **simulation** (no ``identity-key``): an Ed25519 key made here from the CSPRNG,
  kept in ``Context.state``; peers are pinned on first use.

Every roster binds node ids to keys for the run (:class:`BoundRoster`): a node id
keeps one key, a key signs for one node id. The pins live in ``Context.state``
(record ``fedcore.secagg``), which lasts as long as the run on the node.

Use from a ClientApp handler::

    roster, save = roster_for(context, admitted_update=fields.get("admitted-list"))
    boxes = client_round.share(..., roster)   # raises on a refused peer
    save()                                    # the pins and a newer list, kept

(If the server relays the list in an earlier stage than the one that verifies the
adverts, call ``roster_for(context, admitted_update=blob)`` and ``save()`` there: the
later ``roster_for(context)`` finds the newer list kept.)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedcore.clientside.state import STATE_DIR
from fedcore.core.errors import DeploymentError, SecureAggregationError
from fedcore.secagg.protocol.rosters import (
    BoundRoster,
    CaRoster,
    CertificateIdentity,
    EphemeralIdentity,
    Identity,
    KeyIdentity,
    Roster,
    check_key_file,
)
from fedcore.storage.admitted import SignedAdmitted
from fedcore.storage.files import atomic_write
from fedcore.storage.keys import (
    ADMITTED_KEYS,
    ADMITTED_LIST,
    CA_CERT,
    FEDERATION_CA,
    IDENTITY_CERT,
    IDENTITY_KEY,
    TRUST_ON_FIRST_USE,
    fingerprint,
    load_admitted_keys,
    load_identity_key,
)

__all__ = ["ADMITTED_FILE", "STATE", "identity_for", "roster_for"]

#: Record in ``Context.state`` holding this client's secure-aggregation state.
STATE = "fedcore.secagg"
#: In a node's ``state-dir``: the newest admitted list it verified (a SignedAdmitted blob).
ADMITTED_FILE = "admitted-list.signed"
_PINS = "bound-pins"  # {node id: key fingerprint (hex)} for this run
_NEWEST = "admitted-list"  # the newest verified list, as a SignedAdmitted blob

log = logging.getLogger("fedcore.secagg")

NO_LIST = (
    "this node has a provisioned identity (node config identity-key) but no admitted list "
    "(node config admitted-list), so it cannot tell the federation's clients from keys the "
    "server makes up. Re-provision the kit (`fedcore provision` puts admitted.json and "
    "admitted.json.sig in every client kit, and `fedcore client` passes them), or accept "
    "trust on first use explicitly: `fedcore client --trust-on-first-use` (node config "
    "trust-on-first-use = true)"
)


def _record(context: Context) -> ConfigRecord:
    rec = context.state.config_records.get(STATE)
    if rec is None:
        rec = ConfigRecord()
        context.state[STATE] = rec
    return rec


@functools.lru_cache(maxsize=4)
def _certificate_identity(key_path: str, cert_path: str) -> CertificateIdentity:
    return CertificateIdentity.from_files(key_path, cert_path)


@functools.lru_cache(maxsize=4)
def _kit_identity(key_path: str) -> KeyIdentity:
    check_key_file(Path(key_path))
    return KeyIdentity(load_identity_key(key_path))


def identity_for(context: Context) -> Identity:
    """Return this node's identity: its provisioned key, or a CSPRNG key kept in its state.

    Node config ``identity-key`` (the kit's key, as ``fedcore client`` passes it),
    with ``identity-cert`` when the kit has a certificate; otherwise (simulation)
    an Ed25519 key generated here the first time and kept in ``Context.state``.
    """
    nc = context.node_config
    if IDENTITY_KEY in nc:
        if IDENTITY_CERT in nc:
            return _certificate_identity(str(nc[IDENTITY_KEY]), str(nc[IDENTITY_CERT]))
        return _kit_identity(str(nc[IDENTITY_KEY]))
    rec = _record(context)
    raw = rec.get("identity")
    if isinstance(raw, bytes):
        return EphemeralIdentity.from_private_bytes(raw)
    ident = EphemeralIdentity.generate()
    rec["identity"] = ident.private_bytes()
    return ident


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise SecureAggregationError(f"node config {key} = {value!r}: expected true or false")


@functools.lru_cache(maxsize=1)
def _warn_tofu() -> None:
    log.warning(
        "trust on first use (node config %s): peers' keys are pinned the first time this "
        "node sees them, not checked against the federation's admitted list; an active "
        "server can introduce keys of its own for nodes this node has not seen yet",
        TRUST_ON_FIRST_USE,
    )


@functools.lru_cache(maxsize=16)
def _verified(blob: bytes, ca_pem: bytes) -> tuple[int, tuple[tuple[bytes, str], ...]]:
    """``(version, accepted items)`` of a blob the CA signed; DeploymentError otherwise."""
    signed = SignedAdmitted.from_bytes(blob)
    accepted = signed.verify(ca_pem)
    return signed.version, tuple(accepted.items())


class _Lists:
    """The newest verified admitted list among the kit's, the kept ones and a relayed one.

    A kit without a list (provisioned by an older fedcore) but with its CA
    (``federation-ca``) takes the first list the CA signed that reaches it.
    """

    def __init__(self, nc: Mapping[str, Any], rec: ConfigRecord, update: bytes | None) -> None:
        ca_path = nc.get(FEDERATION_CA)
        if not ca_path:
            raise SecureAggregationError(
                f"node config {ADMITTED_LIST} is set but {FEDERATION_CA} (the kit's ca.pem, "
                "whose CA signs the list) is not; `fedcore client` passes both"
            )
        try:
            self.ca_pem = Path(str(ca_path)).read_bytes()
        except OSError as exc:
            raise SecureAggregationError(
                f"node config {FEDERATION_CA} = {ca_path!r} cannot be read ({exc})"
            ) from None
        self.version = 0
        self.accepted: dict[bytes, str] | None = None
        self.newest: bytes | None = None  # a list newer than the kit's, to keep
        if ADMITTED_LIST in nc:
            path = Path(str(nc[ADMITTED_LIST]))
            try:
                self.version, accepted = _verified(
                    SignedAdmitted.load(path).to_bytes(), self.ca_pem
                )
            except DeploymentError as exc:
                raise SecureAggregationError(
                    f"the kit's admitted list {path} is unusable: {exc}. Copy admitted.json "
                    "and admitted.json.sig from the server kit into the client kit, or "
                    "re-provision"
                ) from None
            self.accepted = dict(accepted)
        state_dir = nc.get(STATE_DIR)
        self.file = Path(str(state_dir)) / ADMITTED_FILE if state_dir else None
        kept = rec.get(_NEWEST)
        if isinstance(kept, bytes):
            self._offer(kept, "kept in this node's state", quiet=True)
        if self.file is not None and self.file.is_file():
            try:
                self._offer(self.file.read_bytes(), f"kept in {self.file}", quiet=True)
            except OSError as exc:
                log.warning("could not read the admitted list kept in %s: %s", self.file, exc)
        if update is not None:
            self._offer(bytes(update), "relayed by the server", quiet=False)

    def _offer(self, blob: bytes, source: str, *, quiet: bool) -> None:
        try:
            version, accepted = _verified(blob, self.ca_pem)
        except DeploymentError as exc:
            log.warning("ignored the admitted list %s: %s", source, exc)
            return
        if version > self.version:
            if not quiet:
                log.info(
                    "admitted list version %d %s replaces version %d", version, source, self.version
                )
            self.version, self.accepted, self.newest = version, dict(accepted), blob
        elif version < self.version and not quiet:
            log.warning(
                "ignored the admitted list %s: version %d is older than this node's %d",
                source,
                version,
                self.version,
            )

    def save(self, rec: ConfigRecord) -> None:
        if self.newest is None:
            return
        rec[_NEWEST] = self.newest
        if self.file is not None:
            try:
                current = self.file.read_bytes() if self.file.is_file() else None
            except OSError:
                current = None
            if current != self.newest:
                atomic_write(self.file, self.newest, mode=0o644)


def _unsigned_list(nc: Mapping[str, Any], update: bytes | None) -> dict[bytes, str]:
    """``admitted-keys``: an unsigned copy of ``admitted.json`` the operator put there."""
    if update is not None:
        log.warning(
            "ignored the admitted list relayed by the server: this node reads a fixed, "
            "unsigned list (node config %s); give it %s and %s to receive revocations",
            ADMITTED_KEYS,
            ADMITTED_LIST,
            FEDERATION_CA,
        )
    keys = load_admitted_keys(str(nc[ADMITTED_KEYS]))
    return {fingerprint(key): name for name, key in keys.items()}


def roster_for(
    context: Context, *, admitted_update: bytes | None = None
) -> tuple[Roster, Callable[[], None]]:
    """The roster this node verifies its peers with, and a ``save()`` that keeps what it learnt.

    Parameters
    ----------
    context : Context
        The node's context (node config and ``state``).
    admitted_update : bytes, optional
        A signed admitted list relayed by the server
        (:meth:`~fedcore.storage.admitted.SignedAdmitted.to_bytes`); used if the
        federation CA signed it and it is newer than the node's.

    Returns
    -------
    (Roster, save)
        ``save()`` writes the node-id pins and a newer admitted list into
        ``context.state`` (record ``fedcore.secagg``; the list also to
        ``state-dir``): call it after the adverts verified.

    Raises
    ------
    SecureAggregationError
        A provisioned node without an admitted list (and without
        ``trust-on-first-use``), or an unusable kit list.

    """
    nc = context.node_config
    rec = _record(context)
    raw = rec.get(_PINS)
    pins: dict[int, bytes] = (
        {int(k): bytes.fromhex(v) for k, v in json.loads(str(raw)).items()} if raw else {}
    )
    lists: _Lists | None = None
    roster: Roster
    if CA_CERT in nc:
        roster = CaRoster.from_file(str(nc[CA_CERT]), now=dt.datetime.now(dt.UTC), pins=pins)
    elif IDENTITY_KEY in nc:
        accepted: dict[bytes, str] | None = None
        if ADMITTED_LIST in nc or FEDERATION_CA in nc:
            lists = _Lists(nc, rec, admitted_update)
            accepted = lists.accepted
        if accepted is None:
            if ADMITTED_KEYS in nc:
                accepted = _unsigned_list(nc, admitted_update if lists is None else None)
            elif _flag(nc, TRUST_ON_FIRST_USE):
                _warn_tofu()
            else:
                raise SecureAggregationError(NO_LIST)
        roster = BoundRoster(accepted, pins)
    else:
        roster = BoundRoster(None, pins)

    def save() -> None:
        rec[_PINS] = json.dumps({str(k): v.hex() for k, v in sorted(pins.items())})
        if lists is not None:
            lists.save(rec)

    return roster, save
