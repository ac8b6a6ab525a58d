"""Provisioned identities: the ClientApp signs with its kit key; server and peers check the CA.

The exchange runs in-process through a test grid that hands every message, as
Flower protobuf bytes, to the real fedcore ClientApp with a deployment-style
node config (``identity-key``, ``identity-cert``, ``ca-cert``); no worker
processes, so it stays quick.
"""

from __future__ import annotations

import datetime as dt
from uuid import uuid4

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedcore.core.config import config_from_dict, to_flat
from fedcore.secagg.exchange import SecAggSettings, SecureExchange
from fedcore.secagg.protocol.machine import STAGE_KEYS, STAGE_SHARES
from fedcore.secagg.protocol.rosters import CaRoster, fingerprint
from fedcore.serverside.strategies import FedAvg

from .exchanges import train_step

CLIENTS = 4


def _roundtrip(msg):
    proto = ProtoMessage()
    proto.ParseFromString(message_to_proto(msg).SerializeToString())
    return message_from_proto(proto)


class InlineGrid(Grid):
    """Delivers each message to the ClientApp in this process (protobuf round trip both ways)."""

    def __init__(self, app, contexts, registered=None):
        self._run = Run.create_empty(1)
        self.app = app
        self.contexts = contexts
        self.registered = registered or {}  # node id -> PEM key, as the SuperLink registers
        self.answered: dict[str, object] = {}  # message id -> its reply

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, *args, **kwargs):  # pragma: no cover - deprecated API
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

        return [NodeInfo(node_id=n, public_key=self.registered.get(n, b"")) for n in self.contexts]

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is used
        raise NotImplementedError

    def pull_messages(self, message_ids):
        # send_and_receive answers every message at once; a reply the exchange did not
        # read (it ends an attempt early, then pulls the late ones) is pulled from here
        return [self.answered[m] for m in message_ids if m in self.answered]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex
            m = _roundtrip(m)
            node = m.metadata.dst_node_id
            TaskIdentity.node_id = node
            try:
                reply = self.app(m, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what the engines do
                from flwr.app import Error, Message

                reply = Message(Error(0, f"{type(exc).__name__}: {exc}"), reply_to=m)
            finally:
                TaskIdentity.node_id = SUPERLINK_NODE_ID
            replies.append(_roundtrip(reply))
            self.answered[m.metadata.message_id] = replies[-1]
        return replies


def _cert(subject_key, issuer_key, name, issuer):
    now = dt.datetime.now(dt.UTC)
    algo = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(issuer_key, algo)
    )


def _kit(tmp_path, name, ca_key, ca_cert_path, issuer="fedcore-ca"):
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if name.endswith("1")
        else ed25519.Ed25519PrivateKey.generate()
    )
    kp, cp = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    kp.chmod(0o600)
    cp.write_bytes(_cert(key, ca_key, name, issuer).public_bytes(serialization.Encoding.PEM))
    return {"identity-key": str(kp), "identity-cert": str(cp), "ca-cert": str(ca_cert_path)}


@pytest.fixture
def federation(tmp_path):
    from clients.app import app
    from fedcore.clientside.data import holdout
    from fedcore.core.records import model_to_arrays
    from fedcore.runtime.serve import initial_model

    ca_key = ed25519.Ed25519PrivateKey.generate()
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(
        _cert(ca_key, ca_key, "fedcore-ca", "fedcore-ca").public_bytes(serialization.Encoding.PEM)
    )
    cfg = config_from_dict(
        {
            "run": {"seed": 1, "clients": CLIENTS, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 200, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
            "train": {"local-epochs": 1, "batch-size": 16},
        }
    )
    contexts = {}
    for p in range(CLIENTS):
        node_config = {
            "partition-id": p,
            "num-partitions": CLIENTS,
            **_kit(tmp_path, f"client{p}", ca_key, ca_path),
        }
        contexts[2000 + p] = Context(
            run_id=1,
            node_id=2000 + p,
            node_config=node_config,
            state=RecordDict(),
            run_config=to_flat(cfg),
        )
    _, test = holdout(cfg.data, seed=1)
    arrays = model_to_arrays(initial_model(cfg, test))
    roster = CaRoster.from_file(ca_path, now=dt.datetime.now(dt.UTC))
    return InlineGrid(app, contexts), arrays, roster, tmp_path, ca_path


def _round(grid, arrays, roster, rnd=1):
    stage = SecureExchange(SecAggSettings(stage_timeout=10.0), seed=1, roster=roster)
    return train_step(
        stage,
        grid,
        FedAvg(seed=1),
        server_round=rnd,
        arrays=arrays,
        config=ConfigRecord({"lr": 0.1, "local-epochs": 1, "batch-size": 16}),
        node_ids=list(grid.contexts),
        timeout=30.0,
    )


def test_provisioned_clients_aggregate_and_keep_no_ephemeral_identity(federation):
    grid, arrays, roster, _, _ = federation
    result = _round(grid, arrays, roster)
    assert result.rejected == () and result.num_clients == CLIENTS
    assert any(not np.array_equal(result.arrays[k].numpy(), arrays[k].numpy()) for k in arrays)
    for ctx in grid.contexts.values():
        state = ctx.state.config_records["fedcore.secagg"]
        assert "identity" not in state and "pins" not in state  # the kit's key and CA were used


def test_a_client_certified_by_another_ca_is_removed(federation):
    grid, arrays, roster, tmp_path, ca_path = federation
    rogue_ca = ed25519.Ed25519PrivateKey.generate()
    grid.contexts[2003].node_config.update(
        _kit(tmp_path, "rogue", rogue_ca, ca_path, issuer="rogue-ca")
    )
    result = _round(grid, arrays, roster, rnd=2)
    assert [(r.node_id, r.stage) for r in result.rejected] == [(2003, STAGE_KEYS)]
    assert "trusted CA" in result.rejected[0].reason
    assert result.num_clients == CLIENTS - 1


def test_clients_refuse_a_peer_the_server_let_through(federation):
    """A server that skips its own check: honest clients still verify against the CA."""
    grid, arrays, _, tmp_path, ca_path = federation
    rogue_ca = ed25519.Ed25519PrivateKey.generate()
    grid.contexts[2003].node_config.update(
        _kit(tmp_path, "rogue", rogue_ca, ca_path, issuer="rogue-ca")
    )

    class AcceptAll:  # no CA check, no signature check: any certificate's key goes
        def verify(self, node_id, credential, message, signature):
            return fingerprint(x509.load_der_x509_certificate(credential).public_key())

    result = _round(grid, arrays, AcceptAll(), rnd=3)
    assert result.arrays is None  # the honest three refused to share with the rogue peer
    refused = {
        r.node_id for r in result.rejected if r.stage == STAGE_SHARES and "trusted CA" in r.reason
    }
    assert refused == {2000, 2001, 2002}


# -- kits made by `fedcore provision` (EC P-384 keys, no certificates) ------------------


@pytest.fixture
def kit_federation(tmp_path):
    from clients.app import app
    from fedcore.clientside.data import holdout
    from fedcore.core.records import model_to_arrays
    from fedcore.deploy.provision import provision
    from fedcore.runtime.serve import initial_model
    from fedcore.storage.keys import load_public_key, public_key_pem

    fed = provision(tmp_path / "fed", clients=CLIENTS)
    cfg = config_from_dict(
        {
            "run": {"seed": 1, "clients": CLIENTS, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 200, "partition": "iid"},
            "model": {"factory": "mlp", "kwargs": {"hidden": 8}},
            "train": {"local-epochs": 1, "batch-size": 16},
        }
    )
    contexts, registered = {}, {}
    for p in range(CLIENTS):
        kit = fed.client_kit(f"client-{p + 1}")
        node = 3000 + p
        contexts[node] = Context(
            run_id=1,
            node_id=node,
            node_config={  # what `fedcore client --kit` passes
                "partition-id": p,
                "num-partitions": CLIENTS,
                "identity-key": str(kit / "identity.key"),
                "federation-ca": str(kit / "ca.pem"),
                "admitted-list": str(kit / "admitted.json"),  # signed by the federation CA
            },
            state=RecordDict(),
            run_config=to_flat(cfg),
        )
        registered[node] = public_key_pem(load_public_key((kit / "identity.pub").read_bytes()))
    _, test = holdout(cfg.data, seed=1)
    arrays = model_to_arrays(initial_model(cfg, test))
    return InlineGrid(app, contexts, registered), arrays, cfg, tmp_path


def _kit_round(grid, arrays, cfg, rnd=1):
    from fedcore.runtime.serve import build_exchanges

    stage, _ = build_exchanges(cfg)  # the server's real wiring
    return train_step(
        stage,
        grid,
        FedAvg(seed=1),
        server_round=rnd,
        arrays=arrays,
        config=ConfigRecord({"lr": 0.1, "local-epochs": 1, "batch-size": 16}),
        node_ids=list(grid.contexts),
        timeout=30.0,
    )


def test_kit_keys_sign_and_the_server_checks_them_against_the_registered_keys(kit_federation):
    grid, arrays, cfg, _ = kit_federation
    result = _kit_round(grid, arrays, cfg)
    assert result.rejected == () and result.num_clients == CLIENTS
    for ctx in grid.contexts.values():
        assert "identity" not in ctx.state.config_records["fedcore.secagg"]  # the kit key signed


def test_a_node_signing_with_another_key_than_its_registered_one_is_removed(kit_federation):
    from fedcore.deploy.provision import provision

    grid, arrays, cfg, tmp_path = kit_federation
    other = provision(tmp_path / "other", clients=["mallory"]).client_kit("mallory")
    grid.contexts[3002].node_config["identity-key"] = str(other / "identity.key")
    result = _kit_round(grid, arrays, cfg, rnd=2)
    assert [(r.node_id, r.stage) for r in result.rejected] == [(3002, STAGE_KEYS)]
    assert "registered" in result.rejected[0].reason
    assert result.num_clients == CLIENTS - 1


def test_clients_with_the_admitted_list_check_peers_themselves(kit_federation):
    """A server that does not check (no registered keys): the admitted list stops an impostor."""
    from fedcore.deploy.provision import provision

    grid, arrays, cfg, tmp_path = kit_federation
    admitted = tmp_path / "fed" / "server" / "admitted.json"
    for ctx in grid.contexts.values():
        ctx.node_config["admitted-keys"] = str(admitted)
    other = provision(tmp_path / "other", clients=["mallory"]).client_kit("mallory")
    grid.contexts[3003].node_config["identity-key"] = str(other / "identity.key")
    grid.registered = {}  # the server has nothing to check with
    result = _kit_round(grid, arrays, cfg, rnd=3)
    assert result.arrays is None
    refused = {
        r.node_id for r in result.rejected if r.stage == STAGE_SHARES and "admitted" in r.reason
    }
    assert refused == {3000, 3001, 3002}
