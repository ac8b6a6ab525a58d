"""The SuperLink listener guard (by peer and listener address) and the fast-polling grid."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedcore.deploy.guard import ListenerGuard, fleet_routes, is_loopback
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
    scope = {"type": kind, "method": method, "path": path, "server": server, "client": client}
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


def test_public_listener_opens_only_when_told_from_loopback() -> None:
    from fedcore.deploy.guard import OPEN_PATH

    g = ListenerGuard(None, local_port=LOCAL, public_paths=fleet_routes(), start_open=False)  # type: ignore[arg-type]
    fleet = "/v1/fleet/activate-node"
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=fleet) == (503, [])
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=OPEN_PATH)[0] == 403
    assert _call(g, server=("127.0.0.1", LOCAL), client=("10.0.0.2", 1), path=OPEN_PATH)[0] == 403
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=fleet) == (503, [])
    assert _call(g, server=("127.0.0.1", LOCAL), client=("127.0.0.1", 1), path=OPEN_PATH) == (
        200,
        [],
    )
    assert _call(g, server=PUBLIC, client=("10.0.0.2", 1), path=fleet) == (200, [fleet])
