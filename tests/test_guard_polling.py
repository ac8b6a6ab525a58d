"""The SuperLink listener guard (by peer and listener address, opening token, body size)
and the fast-polling grid."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedcore.deploy.guard import (
    OPEN_PATH,
    OPEN_TOKEN_HEADER,
    ListenerGuard,
    fleet_routes,
    is_loopback,
)
from fedcore.engines.polling import PollingGrid

LOCAL = 9093
PUBLIC = ("0.0.0.0", 9092)


def _call(
    guard: ListenerGuard,
    *,
    server: tuple[str, int],
    client: tuple[str, int],
    path: str,
    method: str = "POST",
    kind: str = "http",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, list[str]]:
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    guard.app = app
    scope = {
        "type": kind,
        "method": method,
        "path": path,
        "server": server,
        "client": client,
        "headers": headers or [],
    }
    asyncio.run(guard(scope, receive, send))
    status = sent[0].get("status", sent[0].get("code")) if sent else None
    return status, reached


@pytest.fixture
def guard() -> ListenerGuard:
    return ListenerGuard(None, local_port=LOCAL, public_paths=fleet_routes())  # type: ignore[arg-type]


def test_fleet_routes_are_exactly_flowers_fleet_api() -> None:
    routes = fleet_routes()
    assert "/v1/fleet/pull-messages" in routes and "/v1/fleet/activate-node" in routes
    assert all(r.startswith("/v1/fleet/") for r in routes)


@pytest.mark.parametrize("peer", ["203.0.113.5", "10.0.0.2", "127.0.0.1", "::1"])
def test_public_listener_serves_only_fleet_posts(guard: ListenerGuard, peer: str) -> None:
    ok, reached = _call(guard, server=PUBLIC, client=(peer, 5000), path="/v1/fleet/pull-messages")
    assert ok == 200 and reached == ["/v1/fleet/pull-messages"]
    for path in (
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/runtime/acquire-task",
        "/v1/runtime/pull-task-input",
        "/docs",
        "/openapi.json",
        "/health",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/pull-messages/",
    ):
        status, reached = _call(guard, server=PUBLIC, client=(peer, 5000), path=path)
        assert (status, reached) == (403, []), path
    status, reached = _call(
        guard, server=PUBLIC, client=(peer, 5000), path="/v1/fleet/pull-messages", method="GET"
    )
    assert (status, reached) == (403, [])


def test_local_listener_serves_loopback_peers_only(guard: ListenerGuard) -> None:
    for peer in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        status, reached = _call(
            guard, server=("127.0.0.1", LOCAL), client=(peer, 1), path="/v1/control/start-run"
        )
        assert status == 200 and reached, peer
    for peer in ("10.0.0.2", "192.168.1.4", "::ffff:10.0.0.2", "fe80::1", "garbage"):
        status, reached = _call(
            guard, server=("127.0.0.1", LOCAL), client=(peer, 1), path="/v1/control/start-run"
        )
        assert (status, reached) == (403, []), peer
    # the local port on a non-loopback address is not the local listener
    status, _ = _call(
        guard, server=("10.0.0.1", LOCAL), client=("10.0.0.2", 1), path="/v1/control/start-run"
    )
    assert status == 403


def test_websockets_and_missing_addresses_are_refused(guard: ListenerGuard) -> None:
    status, reached = _call(
        guard, server=PUBLIC, client=("1.2.3.4", 1), path="/v1/control/x", kind="websocket"
    )
    assert (status, reached) == (1008, [])
    status, reached = _call(
        guard,
        server=("127.0.0.1", LOCAL),
        client=None,  # type: ignore[arg-type]
        path="/v1/control/start-run",
    )
    assert (status, reached) == (403, [])


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.2")
    assert not is_loopback("10.0.0.1") and not is_loopback("localhost") and not is_loopback(None)


class _FakeGrid:
    """Replies become available one per pull, in the reverse of push order."""

    def __init__(self, n: int, lost: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.n = n
        self.lost = lost
        self.pushed: list[Message] = []
        self.pulls = 0

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids: Any) -> list[Message]:
        self.pulls += 1
        ready = [f"m{i}" for i in reversed(range(self.n)) if i not in self.lost][: self.pulls]
        out = []
        for mid in ready:
            if mid in set(ids):
                i = int(mid[1:])
                reply = Message(RecordDict({"c": ConfigRecord({"i": i})}), reply_to=self.pushed[i])
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
        return out


def _msgs(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=10 + i, message_type="train") for i in range(n)]


def test_polling_grid_yields_in_push_order() -> None:
    inner = _FakeGrid(4)
    grid = PollingGrid(inner, interval=0.001)  # type: ignore[arg-type]
    got = [r.content.config_records["c"]["i"] for r in grid.send_and_receive(_msgs(4), timeout=5)]
    assert got == [0, 1, 2, 3]
    assert inner.pulls == 4  # one pull per new reply: it did not wait 3 s between pulls


def test_polling_grid_timeout_keeps_replies_that_arrived() -> None:
    inner = _FakeGrid(4, lost={1})
    grid = PollingGrid(inner, interval=0.001)  # type: ignore[arg-type]
    got = [r.content.config_records["c"]["i"] for r in grid.send_and_receive(_msgs(4), timeout=0.2)]
    assert got == [0, 2, 3]


def test_serve_wraps_only_foreign_grids() -> None:
    from fedcore.runtime.serve import fast_polling

    inner = _FakeGrid(1)
    wrapped = fast_polling(inner, 0.05)  # type: ignore[arg-type]
    assert isinstance(wrapped, PollingGrid) and wrapped.interval == 0.05
    assert fast_polling(wrapped, 0.05) is wrapped


def test_public_listener_opens_only_when_told_from_loopback_with_the_token() -> None:
    token = secrets.token_bytes(32)
    g = ListenerGuard(
        None,  # type: ignore[arg-type]
        local_port=LOCAL,
        public_paths=fleet_routes(),
        start_open=False,
        open_token=token,
    )
    good = [(OPEN_TOKEN_HEADER.encode(), token.hex().encode())]
    fleet = "/v1/fleet/activate-node"
    local = ("127.0.0.1", LOCAL)
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=fleet) == (503, [])
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=OPEN_PATH, headers=good)[0] == 403
    assert _call(g, server=local, client=("10.0.0.2", 1), path=OPEN_PATH, headers=good)[0] == 403
    # a local user without the token (or with another one) cannot open it
    assert _call(g, server=local, client=("127.0.0.1", 1), path=OPEN_PATH)[0] == 403
    wrong = [(OPEN_TOKEN_HEADER.encode(), secrets.token_bytes(32).hex().encode())]
    assert _call(g, server=local, client=("127.0.0.1", 1), path=OPEN_PATH, headers=wrong)[0] == 403
    assert (
        _call(g, server=local, client=("127.0.0.1", 1), path=OPEN_PATH, headers=good[:0])[0] == 403
    )
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=fleet) == (503, [])
    assert _call(g, server=local, client=("127.0.0.1", 1), path=OPEN_PATH, headers=good) == (
        200,
        [],
    )
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=fleet) == (200, [fleet])
    # without a token configured, nobody opens anything
    g2 = ListenerGuard(None, local_port=LOCAL, public_paths=fleet_routes(), start_open=False)  # type: ignore[arg-type]
    assert _call(g2, server=local, client=("127.0.0.1", 1), path=OPEN_PATH, headers=good)[0] == 403


# -- the guard in a real uvicorn server on loopback -----------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Served:
    """A ListenerGuard in front of a small app, served by uvicorn on two loopback sockets."""

    def __init__(self, **guard_kwargs: Any) -> None:
        import uvicorn

        self.public, self.local = _port(), _port()
        self.reached: list[tuple[str, int]] = []  # requests the app answered (path, bytes)
        self.cut: list[tuple[str, int]] = []  # bodies cut off by the guard (Starlette raises)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                return
            size = 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    self.cut.append((scope["path"], size))
                    return
                size += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            self.reached.append((scope["path"], size))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"served"})

        self.guard = ListenerGuard(
            app, local_port=self.local, public_paths=fleet_routes(), **guard_kwargs
        )
        sockets = []
        for port in (self.public, self.local):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sockets.append(sock)
        self.server = uvicorn.Server(
            uvicorn.Config(self.guard, log_level="warning", proxy_headers=False, lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets})
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def post(self, port: int, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{port}{path}", timeout=10, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def served_token() -> Iterator[tuple[_Served, bytes]]:
    token = secrets.token_bytes(32)
    served = _Served(start_open=False, open_token=token, max_request_bytes=1024 * 1024)
    try:
        yield served, token
    finally:
        served.stop()


def test_open_endpoint_over_loopback_needs_the_servers_token(served_token) -> None:
    served, token = served_token
    fleet = "/v1/fleet/pull-messages"
    assert served.post(served.public, fleet, content=b"x").status_code == 503
    # any local caller without the token: 403, before the opening ...
    for headers in (
        {},
        {OPEN_TOKEN_HEADER: secrets.token_bytes(32).hex()},
        {OPEN_TOKEN_HEADER: "zz"},
    ):
        r = served.post(served.local, OPEN_PATH, headers=headers)
        assert r.status_code == 403 and "token" in r.text, headers
    assert (
        served.post(served.public, OPEN_PATH, headers={OPEN_TOKEN_HEADER: token.hex()}).status_code
        == 403
    )
    assert served.post(served.public, fleet, content=b"x").status_code == 503  # still closed
    # ... fedcore server's own request opens it ...
    r = served.post(served.local, OPEN_PATH, headers={OPEN_TOKEN_HEADER: token.hex()})
    assert r.status_code == 200
    assert served.post(served.public, fleet, content=b"x").status_code == 200
    # ... and after it, still 403 without the token
    assert served.post(served.local, OPEN_PATH).status_code == 403
    assert served.reached == [(fleet, 1)]


def test_oversized_requests_get_413_and_are_logged(served_token, caplog) -> None:
    served, token = served_token
    served.post(served.local, OPEN_PATH, headers={OPEN_TOKEN_HEADER: token.hex()})
    fleet = "/v1/fleet/push-object"
    limit = 1024 * 1024
    with caplog.at_level(logging.WARNING, logger="fedcore.guard"):
        r = served.post(served.public, fleet, content=b"\0" * (limit + 1))  # content-length
        assert r.status_code == 413 and "larger than 1048576 bytes" in r.text

        def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
            for _ in range(4):
                yield b"\1" * (limit // 2)

        r = served.post(served.public, fleet, content=chunks())
        assert r.status_code == 413
        assert (
            served.post(
                served.local, "/v1/control/start-run", content=b"\0" * (limit + 1)
            ).status_code
            == 413
        )
    assert served.reached == []  # the app answered no oversized request ...
    assert [path for path, _ in served.cut] == [fleet]  # ... the chunked one was cut off
    assert served.cut[0][1] <= limit  # before more than the limit reached the app
    assert sum("413" in rec.getMessage() for rec in caplog.records) == 3
    assert served.post(served.public, fleet, content=b"\0" * limit).status_code == 200
    assert served.reached == [(fleet, limit)]


# -- the real SuperLink process -------------------------------------------------------


@contextlib.contextmanager
def _real_superlink(tmp_path: Path, clients: int = 1) -> Iterator[dict[str, Any]]:
    """`python -m fedcore.deploy.superlink` as `fedcore server` starts it, over TLS on loopback."""
    from fedcore.deploy.guard import OPEN_TOKEN_ENV
    from fedcore.deploy.provision import provision
    from fedcore.engines.processes import free_port
    from tests.procs import stop

    fed = provision(tmp_path / "fed", clients=clients)
    public, local = free_port(), free_port()
    token = secrets.token_bytes(32)
    marker = f"fedcore-guard-test-{secrets.token_hex(4)}"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_INTERNAL_GRPC_CONTROL_API": "0",
        "FLWR_INTERNAL_GRPC_FLEET_API": "0",
        "FEDCORE_TEST_MARKER": marker,
        OPEN_TOKEN_ENV: token.hex(),
    }
    log_path = tmp_path / "superlink.log"
    argv = [sys.executable, "-m", "fedcore.deploy.superlink", "--public", f"127.0.0.1:{public}"]
    argv += ["--local-port", str(local), "--kit", str(fed.server_kit)]
    argv += ["--max-request-bytes", str(1024 * 1024)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(  # noqa: S603
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    ca = str(fed.server_kit / "ca.pem")
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"https://127.0.0.1:{local}/health", verify=ca, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield {
            "proc": proc,
            "public": public,
            "local": local,
            "token": token,
            "ca": ca,
            "fed": fed,
            "log": log_path,
        }
    finally:
        stop([proc], marker)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_superlink_opens_only_with_its_token_which_no_child_inherits(tmp_path) -> None:
    import psutil

    from fedcore.deploy.guard import OPEN_TOKEN_ENV
    from tests.procs import procs_mentioning

    with _real_superlink(tmp_path) as sl:
        proc, public, local, token = sl["proc"], sl["public"], sl["local"], sl["token"]

        def post(port: int, path: str, **kwargs: Any) -> int:
            url = f"https://127.0.0.1:{port}{path}"
            return httpx.post(url, verify=sl["ca"], timeout=10, **kwargs).status_code

        fleet = "/v1/fleet/pull-messages"
        assert post(local, OPEN_PATH) == 403
        assert post(local, OPEN_PATH, headers={OPEN_TOKEN_HEADER: secrets.token_hex(32)}) == 403
        assert post(public, fleet) == 503
        assert post(local, OPEN_PATH, headers={OPEN_TOKEN_HEADER: token.hex()}) == 200
        assert post(public, fleet, content=b"\0" * (1024 * 1024 + 1)) == 413
        assert post(public, fleet, content=b"\0") not in (403, 413, 503)  # Flower answers it
        # the secret: in no command line, in no child's environment, in no log line
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # SuperExec
        for child in children:
            assert OPEN_TOKEN_ENV not in child.environ(), child.cmdline()
        assert procs_mentioning(token.hex(), pids=True) == [proc.pid]  # its own exec env only
        assert token.hex() not in " ".join(psutil.Process(proc.pid).cmdline())
    assert token.hex() not in sl["log"].read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_node_authentication_holds_on_the_superlinks_lean_middleware_path(tmp_path) -> None:
    """A network attacker against Flower's node authentication, which fedcore's SuperLink
    runs without Starlette's per-layer task (``flower_adapter._lean_middleware``): requests
    unsigned, signed by a key no node registered, signed by the node's key over another
    time, or signed by a second admitted node while naming the first one's id are all
    refused; the node's own signed request is answered, its protobuf body read by the
    translation layer and again by the handler. Once the SuperLink has verified (and
    remembered, ``flower_adapter._VerifiedSignatures``) a node's signed timestamp, that
    timestamp and signature are refused under another admitted node's key or id, and
    with the signature altered."""
    from base64 import b64decode, b64encode

    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    from fedcore import flower_adapter as flower
    from fedcore.deploy.node import FleetSession
    from fedcore.deploy.server import Admission
    from fedcore.storage.keys import load_identity_key

    with _real_superlink(tmp_path, clients=2) as sl:
        fed, public, ca = sl["fed"], sl["public"], sl["ca"]
        opened = httpx.post(
            f"https://127.0.0.1:{sl['local']}{OPEN_PATH}",
            headers={OPEN_TOKEN_HEADER: sl["token"].hex()},
            verify=ca,
            timeout=10,
        )
        assert opened.status_code == 200
        # the nodes' keys registered as `fedcore server` does, over the Control API (whose
        # requests keep Starlette's own middleware layers: it streams)
        control = flower.control_client(
            f"127.0.0.1:{sl['local']}", ca_pem=(fed.server_kit / "ca.pem").read_bytes()
        )
        changes = Admission(control, fed.server_kit / "admitted.json").sync()
        assert changes == ["admitted client-1", "admitted client-2"], changes
        sessions: list[FleetSession] = []

        def join(name: str) -> tuple[int, ec.EllipticCurvePrivateKey]:
            """Connect as fedcore client does with kit ``name``: its node id and key."""
            kit = fed.client_kit(name)
            key_path = kit / "identity.key"
            ca_pem = (kit / "ca.pem").read_bytes()
            sessions.append(FleetSession(f"127.0.0.1:{public}", ca_pem=ca_pem, key_path=key_path))
            return sessions[-1].connect(wait=30), load_identity_key(key_path)

        node_id, own = join("client-1")

        def send(
            headers: dict[str, str], node: int = node_id, path: str = "/v1/fleet/pull-messages"
        ) -> int:
            """A pull-messages request for ``node`` with ``headers``; the HTTP status.

            ``path`` may be fedcore's bundled pull, or its bundled push (a push-messages
            request for ``node`` and one object, framed).
            """
            body = PullMessagesRequest(node=Node(node_id=node)).SerializeToString()
            if path == flower.BUNDLED_PUSH:
                obj = PushObjectRequest(node=Node(node_id=node), object_id="0" * 64)
                head = PushMessagesRequest(node=Node(node_id=node))
                body = flower.pack_frames([head.SerializeToString(), obj.SerializeToString()])
            url = f"https://127.0.0.1:{public}{path}"
            headers = {"content-type": "application/protobuf", **headers}
            return httpx.post(url, content=body, headers=headers, verify=ca, timeout=10).status_code

        def pull(
            key: ec.EllipticCurvePrivateKey | None, node: int = node_id, stamp: str = ""
        ) -> int:
            """Flower's signed headers (NodeAuthHttpInterceptor's), from ``key``, over ``stamp``."""
            headers = {}
            if key is not None:
                timestamp = now().isoformat()
                headers[FLEET_HTTP_PUBLIC_KEY_HEADER] = b64encode(
                    public_key_to_bytes(key.public_key())
                ).decode()
                headers[TIMESTAMP_HEADER] = timestamp
                headers[FLEET_HTTP_SIGNATURE_HEADER] = b64encode(
                    sign_message(key, (stamp or timestamp).encode("ascii"))
                ).decode()
            return send(headers, node)

        try:
            assert pull(own) == 200
            assert pull(None) == 401
            assert pull(ec.generate_private_key(ec.SECP384R1())) == 401
            assert pull(own, stamp="2020-01-01T00:00:00+00:00") == 401
            # a second admitted node, registered, naming the first one's node id
            other_id, other_key = join("client-2")
            assert other_id != node_id
            assert pull(other_key, other_id) == 200
            assert pull(other_key, node_id) == 401
            # the headers fedcore's client sends (one signed timestamp for a while): accepted
            # again and again, and remembered by the SuperLink once verified...
            signed = flower._NodeAuthInterceptor(own).headers()
            assert send(signed) == 200
            assert send(signed) == 200
            # ...but never for another node: not under client-2's key, nor naming its id
            other_public = b64encode(public_key_to_bytes(other_key.public_key())).decode()
            assert send({**signed, FLEET_HTTP_PUBLIC_KEY_HEADER: other_public}, other_id) == 401
            assert send({**signed, FLEET_HTTP_PUBLIC_KEY_HEADER: other_public}, node_id) == 401
            assert send(signed, other_id) == 401
            # nor with the signature altered (its last byte, then a different valid-looking one)
            sig = bytearray(b64decode(signed[FLEET_HTTP_SIGNATURE_HEADER]))
            sig[-1] ^= 1
            altered = b64encode(bytes(sig)).decode()
            assert send({**signed, FLEET_HTTP_SIGNATURE_HEADER: altered}) == 401
            resigned = sign_message(own, b"2026-01-01T00:00:00+00:00")
            forged = {**signed, FLEET_HTTP_SIGNATURE_HEADER: b64encode(resigned).decode()}
            assert send(forged) == 401
            assert send(signed) == 200
            # fedcore's bundled routes ask the app Flower's requests with the caller's
            # headers: each attack is refused there too, before anything is pulled or stored
            for path in (flower.BUNDLED_PULL, flower.BUNDLED_PUSH):
                assert send({}, path=path) == 401, path
                rekeyed = {**signed, FLEET_HTTP_PUBLIC_KEY_HEADER: other_public}
                assert send(rekeyed, path=path) == 401, path
                assert send(signed, other_id, path=path) == 401, path
                assert send({**signed, FLEET_HTTP_SIGNATURE_HEADER: altered}, path=path) == 401
                assert send(forged, path=path) == 401, path
            assert send(signed, path=flower.BUNDLED_PULL) == 200
            # the ServerApp's bundled Runtime routes: refused on the public listener, and on
            # the local one without the task's token (Flower's token check, first part)
            from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PushAppMessagesRequest

            pull_app = PullAppMessagesRequest(message_ids=["0" * 64]).SerializeToString()
            app_head = PushAppMessagesRequest().SerializeToString()
            push_app = flower.pack_frames([app_head, PushObjectRequest().SerializeToString()])
            for path, body in (
                (flower.BUNDLED_RUNTIME_PULL, pull_app),
                (flower.BUNDLED_RUNTIME_PUSH, push_app),
            ):
                for port, headers, refusal in (
                    (public, {}, 403),
                    (sl["local"], {}, 401),
                    (sl["local"], {"flwr-task-token": "f" * 64}, 401),
                ):
                    status = httpx.post(
                        f"https://127.0.0.1:{port}{path}",
                        content=body,
                        headers={"content-type": "application/octet-stream", **headers},
                        verify=ca,
                        timeout=10,
                    ).status_code
                    assert status == refusal, (path, port, headers, status)
        finally:
            for session in sessions:
                session.close()
