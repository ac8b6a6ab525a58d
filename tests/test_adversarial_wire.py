"""Attacks on this stop's wire changes that must fail: targeted wakes and packed arrays.

- An unauthenticated peer on the guard's public listener pulls and pushes objects
  under ids of its choosing: every request reaches Flower's app (which refuses it),
  none is held, no state is left in the guard, and its "push" of the object a
  legitimate node waits for does not wake that node's held pull.
- A malicious server sends ``fedcore client`` a message whose packed arrays are
  hostile: the client's real worker (``fedcore.deploy.node._Worker``) answers with an
  error and never runs the ClientApp on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
)
from flwr.supercore.task_identity import TaskIdentity

from fedcore.core.packing import PACKED_KEY, PACKED_STYPE
from fedcore.deploy import guard as guard_module
from fedcore.deploy.guard import ListenerGuard, fleet_routes
from fedcore.deploy.node import _Worker
from tests.asgi import post

LOCAL, PUBLIC = 9093, 9092
SIGNED = b"x-node-signature"


class AuthLink:
    """Flower's app in small: refuses a request without the signed header (401)."""

    def __init__(self) -> None:
        self.uploaded: set[str] = set()
        self.asked: dict[str, int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        path = scope["path"]
        signed = any(bytes(k) == SIGNED for k, _ in scope.get("headers") or ())
        self.asked[path] = self.asked.get(path, 0) + 1
        status, out = 200, b""
        if not signed:
            status = 401
        elif path.endswith("push-object"):
            self.uploaded.add(PushObjectRequest.FromString(body).object_id)
        else:
            oid = PullObjectRequest.FromString(body).object_id
            out = PullObjectResponse(
                object_found=True, object_available=oid in self.uploaded, object_content=b"x"
            ).SerializeToString()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": out})


async def _call(guard: ListenerGuard, path: str, body: bytes, *, signed: bool) -> int:
    fleet = path.startswith("/v1/fleet")
    status, _ = await post(
        guard,
        path,
        body,
        server=("127.0.0.1", PUBLIC if fleet else LOCAL),
        client=("203.0.113.7" if fleet else "127.0.0.1", 50000),
        headers=[(SIGNED, b"sig")] if signed else [],
    )
    return status


def test_an_unauthenticated_peer_cannot_hold_wake_or_leave_state_in_the_guard(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(guard_module, "RECHECK_S", 30.0)  # only a push could wake the pull
    link = AuthLink()
    guard = ListenerGuard(link, local_port=LOCAL, public_paths=fleet_routes())  # type: ignore[arg-type]
    pull = PullObjectRequest(object_id="model").SerializeToString()
    push = PushObjectRequest(object_id="model", object_content=b"evil").SerializeToString()

    async def attack() -> None:
        # a legitimate node waits for the model's object
        held = asyncio.ensure_future(_call(guard, "/v1/fleet/pull-object", pull, signed=True))
        await asyncio.sleep(0.05)
        # the attacker floods pulls of made-up ids: each refused at once, none held
        for i in range(50):
            bogus = PullObjectRequest(object_id=f"id-{i}").SerializeToString()
            status = await asyncio.wait_for(
                _call(guard, "/v1/fleet/pull-object", bogus, signed=False), timeout=2
            )
            assert status == 401
        # ... and "pushes" the very object the node waits for: refused, wakes nobody
        assert await _call(guard, "/v1/fleet/push-object", push, signed=False) == 401
        await asyncio.sleep(0.05)
        assert not held.done(), "a refused push woke a held pull"
        assert set(guard._object_waits) == {"model"}  # only the legitimate node's wait
        # the real upload (the ServerApp, loopback, signed) answers the node
        real = PushObjectRequest(object_id="model", object_content=b"x").SerializeToString()
        assert await _call(guard, "/v1/runtime/push-object", real, signed=True) == 200
        assert await asyncio.wait_for(held, timeout=10) == 200

    asyncio.run(attack())
    assert guard._object_waits == {}
    # the node's pull was asked twice (held, then woken by the real push); the 50 bogus
    # pulls once each: refused answers are never retried
    assert link.asked["/v1/fleet/pull-object"] == 52


class _Session:
    """What ``_Worker`` needs of a Fleet session, with the server's message chosen here."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.sent: list[Message] = []

    def pull(self) -> Any:
        return self.message, None

    def run_config(self, run_id: int) -> tuple[None, dict[str, Any]]:
        return None, {}

    def receive(self, tree: Any, run_id: int) -> Message:
        return self.message

    def send(self, reply: Message, runtime: float) -> None:
        self.sent.append(reply)


def _hostile(blob: bytes) -> RecordDict:
    arr = Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)
    return RecordDict({"arrays": ArrayRecord({PACKED_KEY: arr}), "config": ConfigRecord({})})


def test_a_malicious_servers_hostile_packed_arrays_never_reach_the_clientapp() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    good = Array(np.ones(3, np.float32)).data
    for blob in (
        b"\xff" * 8 + b"{}",  # a header length past the end
        b"garbage",
        b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"w": {"dtype": "F32"}}',  # no offsets
        good,  # an .npy payload where a safetensors blob belongs
    ):
        ran: list[Message] = []
        message = Message(_hostile(blob), dst_node_id=7, message_type="train")
        session = _Session(message)
        worker = _Worker(
            session,  # type: ignore[arg-type]
            lambda msg, ctx, ran=ran: ran.append(msg) or msg,
            {},
            lambda line: None,
        )
        assert worker.step(node_id=7) is True
        assert ran == [], "the ClientApp ran on hostile packed arrays"
        (reply,) = session.sent
        assert reply.has_error() and "malformed message" in reply.error.reason, reply
