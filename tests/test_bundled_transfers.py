"""Bundled transfers: a fedcore client's message, or reply, with its objects in one request
(issue 11).

The guard (``fedcore.deploy.guard``) answers ``/fedcore/v1/fleet/pull-messages`` and
``/fedcore/v1/fleet/push-messages`` by asking the SuperLink app Flower's own requests in
turn, with the caller's signed headers. These tests drive the guard against a small
Flower-like app that records every request it is asked; the real SuperLink's node
authentication on the bundled routes is attacked in
``tests/test_guard_polling.py::test_node_authentication_holds_on_the_superlinks_lean_middleware_path``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
    PushMessagesResponse,
)
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import get_object_id

from fedcore import flower_adapter as flower
from fedcore.deploy import guard as guard_module
from fedcore.deploy.guard import ListenerGuard, fleet_routes
from tests.asgi import post

PUBLIC = ("203.0.113.9", 9092)
PEER = ("198.51.100.7", 40000)
SIGNED = [(b"flwr-public-key", b"k1"), (b"flwr-signature", b"s1"), (b"flwr-timestamp", b"t1")]
NODE = 7
RUN = 3


def _content(text: bytes) -> tuple[str, bytes]:
    return get_object_id(text), text


#: a message whose tree is message -> record dict -> two records (ids are content hashes)
REC_A = _content(b"record a")
REC_B = _content(b"record b")
RDICT = _content(b"record dict")
MSG = _content(b"message")


def _tree() -> Any:
    res = PullMessagesResponse()
    res.messages_list.add().metadata.run_id = RUN
    tree = res.message_object_trees.add()
    tree.object_id = MSG[0]
    rd = tree.children.add()
    rd.object_id = RDICT[0]
    rd.children.add().object_id = REC_A[0]
    rd.children.add().object_id = REC_B[0]
    return res


class Link:
    """Answers Fleet requests like Flower's SuperLink; records each request it is asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        self.objects = {k: v for k, v in (REC_A, REC_B, RDICT, MSG)}
        self.uploaded = set(self.objects)
        self.messages = 1
        self.refuse: set[str] = set()  # paths answered 401
        self.stored: dict[str, tuple[bytes, str]] = {}
        self.wanted = [REC_A[0], RDICT[0]]
        self.nodes: list[int] = []  # the node each push-object request names

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        body = (await receive())["body"]
        headers = {bytes(n): bytes(v) for n, v in scope["headers"]}
        self.asked.append((path, body, headers))
        status, out = 200, b""
        if path in self.refuse:
            status, out = 401, b'{"detail": "unauthenticated"}'
        elif path == "/v1/fleet/pull-messages":
            if self.messages:
                self.messages -= 1
                out = _tree().SerializeToString()
            else:
                out = PullMessagesResponse().SerializeToString()
        elif path == "/v1/fleet/pull-object":
            req = PullObjectRequest.FromString(body)
            oid = req.object_id
            out = PullObjectResponse(
                object_found=oid in self.objects,
                object_available=oid in self.uploaded,
                object_content=self.objects.get(oid, b"") if oid in self.uploaded else b"",
            ).SerializeToString()
        elif path == "/v1/fleet/push-messages":
            out = PushMessagesResponse(
                objects_to_push=self.wanted, session_id="sess-1"
            ).SerializeToString()
        elif path == "/v1/fleet/push-object":
            req = PushObjectRequest.FromString(body)
            self.stored[req.object_id] = (req.object_content, req.session_id)
            self.nodes.append(req.node.node_id)
            out = PushObjectResponse(stored=True).SerializeToString()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": out})

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.asked]


def _guard(link: Link) -> ListenerGuard:
    return ListenerGuard(link, local_port=9093, public_paths=fleet_routes())  # type: ignore[arg-type]


def _post(guard: ListenerGuard, path: str, body: bytes) -> tuple[int, bytes]:
    return asyncio.run(post(guard, path, body, server=PUBLIC, client=PEER, headers=SIGNED))


PULL = PullMessagesRequest(node=Node(node_id=NODE)).SerializeToString()
HEAD = PushMessagesRequest(node=Node(node_id=NODE)).SerializeToString()


def test_frames_round_trip_and_malformed_bundles_name_what_is_wrong() -> None:
    parts = [b"", b"a", b"x" * 70_000]
    assert flower.unpack_frames(flower.pack_frames(parts)) == parts
    assert flower.unpack_frames(b"") == []
    with pytest.raises(ValueError, match="truncated frame header"):
        flower.unpack_frames(b"\x00\x00")
    with pytest.raises(ValueError, match="runs past the end"):
        flower.unpack_frames(b"\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="more than 2 frames"):
        flower.unpack_frames(flower.pack_frames([b"a", b"b", b"c"]), limit=2)


def test_a_bundled_pull_answers_the_message_and_its_objects_asked_as_flower_would() -> None:
    link = Link()
    status, body = _post(_guard(link), flower.BUNDLED_PULL, PULL)
    assert status == 200
    frames = flower.unpack_frames(body)
    assert PullMessagesResponse.FromString(frames[0]) == _tree()
    # children first, as Flower's own pull orders them; each object's content, by its id
    order = [REC_A, REC_B, RDICT, MSG]
    assert [PullObjectResponse.FromString(f).object_content for f in frames[1:]] == [
        c for _, c in order
    ]
    assert link.paths() == ["/v1/fleet/pull-messages"] + ["/v1/fleet/pull-object"] * 4
    for path, req, headers in link.asked:
        # every part carries the caller's signed headers: the app authenticates each one
        assert all(headers[n] == v for n, v in SIGNED), (path, headers)
        assert headers[b"content-length"] == str(len(req)).encode()
        if path == "/v1/fleet/pull-object":
            r = PullObjectRequest.FromString(req)
            assert (r.node.node_id, r.run_id) == (NODE, RUN)
    assert [PullObjectRequest.FromString(r).object_id for p, r, _ in link.asked[1:]] == [
        oid for oid, _ in order
    ]


def test_a_refused_part_is_the_bundled_answer_and_nothing_more_is_asked() -> None:
    link = Link()
    link.refuse = {"/v1/fleet/pull-messages"}
    status, body = _post(_guard(link), flower.BUNDLED_PULL, PULL)
    assert status == 401 and b"unauthenticated" in body
    assert link.paths() == ["/v1/fleet/pull-messages"]
    assert link.messages == 1  # not taken

    link = Link()
    link.refuse = {"/v1/fleet/push-messages"}
    bundle = flower.pack_frames([HEAD, _push_object(REC_A)])
    assert _post(_guard(link), flower.BUNDLED_PUSH, bundle)[0] == 401
    assert link.paths() == ["/v1/fleet/push-messages"] and not link.stored


def test_objects_the_guard_cannot_get_are_left_to_the_node(monkeypatch: Any) -> None:
    monkeypatch.setattr(guard_module, "HOLD_OBJECT_S", 0.05)
    monkeypatch.setattr(guard_module, "RECHECK_S", 0.01)
    link = Link()
    link.uploaded.discard(RDICT[0])  # announced, never uploaded within the hold
    guard = _guard(link)
    status, body = _post(guard, flower.BUNDLED_PULL, PULL)
    frames = flower.unpack_frames(body)
    assert status == 200 and len(frames) == 3  # the tree, then the two records before it
    tree = PullMessagesResponse.FromString(frames[0]).message_object_trees[0]
    inlined = flower._inlined_objects(tree, frames[1:])
    assert inlined == {REC_A[0]: REC_A[1], REC_B[0]: REC_B[1]}
    # the node pulls the rest itself: served from the bundle first, then by Flower's pull
    pulled: list[str] = []

    def pull(oid: str) -> bytes:
        pulled.append(oid)
        return link.objects[oid]

    assert flower._pull_inlined(inlined, pull, REC_A[0]) == REC_A[1]
    assert flower._pull_inlined(inlined, pull, RDICT[0]) == RDICT[1]
    assert pulled == [RDICT[0]]


def test_a_bundled_object_whose_content_is_not_its_id_is_refused_by_the_node() -> None:
    tree = _tree().message_object_trees[0]
    wrong = PullObjectResponse(object_found=True, object_available=True, object_content=b"evil")
    with pytest.raises(ValueError, match="does not match its id"):
        flower._inlined_objects(tree, [wrong.SerializeToString()])


def _push_object(obj: tuple[str, bytes], node: int = NODE) -> bytes:
    return PushObjectRequest(
        node=Node(node_id=node), run_id=RUN, object_id=obj[0], object_content=obj[1]
    ).SerializeToString()


def test_a_bundled_push_stores_what_the_superlink_asks_for_with_its_session() -> None:
    link = Link()
    head = PushMessagesRequest(node=Node(node_id=NODE)).SerializeToString()
    # (one names another node: the objects are stored as the authenticated node's)
    offered = [_push_object(REC_A, node=99), _push_object(REC_B), _push_object(RDICT)]
    status, body = _post(_guard(link), flower.BUNDLED_PUSH, flower.pack_frames([head, *offered]))
    assert status == 200
    frames = flower.unpack_frames(body)
    assert PushMessagesResponse.FromString(frames[0]).session_id == "sess-1"
    assert [PushObjectResponse.FromString(f).stored for f in frames[1:]] == [True, True]
    # only the objects asked for (REC_B is not), each with the session id the answer gave
    assert link.stored == {REC_A[0]: (REC_A[1], "sess-1"), RDICT[0]: (RDICT[1], "sess-1")}
    assert link.paths() == ["/v1/fleet/push-messages"] + ["/v1/fleet/push-object"] * 2
    assert link.nodes == [NODE, NODE]
    assert link.asked[0][1] == head  # the push-messages request, unchanged


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(None, id="truncated"),
        pytest.param([], id="empty"),
        pytest.param([HEAD, b"\x08\x01not a push-object"], id="not-a-push-object"),
    ],
)
def test_a_malformed_push_bundle_gets_400_and_stores_nothing(frames: list[bytes] | None) -> None:
    link = Link()
    body = b"\x00\x00\x01\x00abc" if frames is None else flower.pack_frames(frames)
    status, answer = _post(_guard(link), flower.BUNDLED_PUSH, body)
    assert status == 400 and b"malformed bundle" in answer, answer
    assert not link.stored


def test_a_push_bundle_of_too_many_frames_gets_400(monkeypatch: Any) -> None:
    link = Link()
    body = flower.pack_frames([b""] * (flower.BUNDLE_MAX_FRAMES + 1))
    status, answer = _post(_guard(link), flower.BUNDLED_PUSH, body)
    assert status == 400 and b"more than 4096 frames" in answer
    assert link.asked == []


def test_a_bundled_push_wakes_the_serverapps_held_pull_only_once_the_objects_are_stored(
    monkeypatch: Any,
) -> None:
    """The ServerApp's held pull for replies is answered after the reply's objects are
    stored, so it never asks for an object of the reply that is not there yet."""
    monkeypatch.setattr(guard_module, "RECHECK_S", 30.0)  # only a wake answers in time
    order: list[str] = []

    class Recording(Link):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            order.append(scope["path"])
            if scope["path"] == "/v1/runtime/pull-messages":
                body = (await receive())["body"]
                del body
                from flwr.proto.runtime_pb2 import PullAppMessagesResponse

                res = PullAppMessagesResponse()
                if any(p == "/v1/fleet/push-object" for p in order[:-1]):
                    res.messages_list.add()
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": res.SerializeToString()})
                return
            await super().__call__(scope, receive, send)

    link = Recording()
    guard = _guard(link)
    head = PushMessagesRequest(node=Node(node_id=NODE)).SerializeToString()
    bundle = flower.pack_frames([head, _push_object(REC_A), _push_object(RDICT)])

    async def scenario() -> tuple[int, bytes]:
        held = asyncio.ensure_future(
            post(
                guard,
                "/v1/runtime/pull-messages",
                b"",
                server=("127.0.0.1", 9093),
                client=("127.0.0.1", 5000),
            )
        )
        await asyncio.sleep(0.05)
        assert not held.done()
        assert (await post(guard, flower.BUNDLED_PUSH, bundle, server=PUBLIC, client=PEER))[
            0
        ] == 200
        return await asyncio.wait_for(held, timeout=5)

    status, _ = asyncio.run(scenario())
    assert status == 200
    asks = [i for i, p in enumerate(order) if p == "/v1/runtime/pull-messages"]
    pushes = [i for i, p in enumerate(order) if p == "/v1/fleet/push-object"]
    assert len(asks) == 2 and len(pushes) == 2  # held, then woken once
    assert asks[1] > pushes[-1], order  # woken after both objects were stored


def test_the_public_listener_serves_the_bundled_routes_by_post_only() -> None:
    guard = _guard(Link())
    for path in (flower.BUNDLED_PULL, flower.BUNDLED_PUSH):
        ok, _ = guard.allows(
            {"type": "http", "method": "POST", "path": path, "server": PUBLIC, "client": PEER}
        )
        assert ok, path
        ok, _ = guard.allows(
            {"type": "http", "method": "GET", "path": path, "server": PUBLIC, "client": PEER}
        )
        assert not ok, path
    scope = {"type": "http", "method": "POST", "path": "/fedcore/open"}
    ok, _ = guard.allows({**scope, "server": PUBLIC, "client": PEER})
    assert not ok


def test_a_node_falls_back_to_flowers_routes_when_the_server_has_no_bundles() -> None:
    """Against a SuperLink that is not fedcore's (404) or an older fedcore server (403),
    the node pulls and pushes with Flower's own requests, and stops asking for bundles."""
    for refusal in (404, 403):
        seen: list[str] = []

        def handler(
            request: httpx.Request, refusal: int = refusal, seen: list[str] = seen
        ) -> httpx.Response:
            seen.append(request.url.path)
            if request.url.path.startswith("/fedcore/"):
                return httpx.Response(refusal, text="not here")
            return httpx.Response(200, content=PullMessagesResponse().SerializeToString())

        from flwr.supernode.fleet_http_client import FleetHttpClient

        client = FleetHttpClient("http://test")
        client._client = httpx.Client(transport=httpx.MockTransport(handler))
        assert flower.pull_message(client, NODE) is None
        assert flower.pull_message(client, NODE) is None
        assert seen == [flower.BUNDLED_PULL, "/v1/fleet/pull-messages", "/v1/fleet/pull-messages"]


# -- the ServerApp's Runtime API ------------------------------------------------------
LOCAL = ("127.0.0.1", 9093)
LOOPBACK_PEER = ("127.0.0.1", 50000)
TOKEN = [(b"flwr-task-token", b"the task's token")]


class RuntimeLink(Link):
    """Link's Runtime side: replies to pull, stage messages pushed."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/v1/runtime/pull-messages":
            from flwr.proto.runtime_pb2 import PullAppMessagesResponse

            await receive()
            self.asked.append((path, b"", {bytes(n): bytes(v) for n, v in scope["headers"]}))
            res = PullAppMessagesResponse()
            src = _tree()
            res.messages_list.extend(src.messages_list)
            res.message_object_trees.extend(src.message_object_trees)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": res.SerializeToString()})
            return
        if path == "/v1/runtime/push-messages":
            from flwr.proto.runtime_pb2 import PushAppMessagesResponse

            await receive()
            self.asked.append((path, b"", {}))
            res = PushAppMessagesResponse(
                message_ids=["m1"], objects_to_push=self.wanted, session_id="sess-2"
            )
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": res.SerializeToString()})
            return
        scope = {**scope, "path": path.replace("/v1/runtime/", "/v1/fleet/")}
        await super().__call__(scope, receive, send)


def _local(guard: ListenerGuard, path: str, body: bytes) -> tuple[int, bytes]:
    return asyncio.run(post(guard, path, body, server=LOCAL, client=LOOPBACK_PEER, headers=TOKEN))


def test_the_runtime_bundles_are_served_on_the_local_listener_only() -> None:
    guard = _guard(Link())
    for path in (flower.BUNDLED_RUNTIME_PULL, flower.BUNDLED_RUNTIME_PUSH):
        scope = {"type": "http", "method": "POST", "path": path}
        ok, why = guard.allows({**scope, "server": PUBLIC, "client": PEER})
        assert not ok and "Fleet API only" in why, path
        ok, _ = guard.allows({**scope, "server": PUBLIC, "client": LOOPBACK_PEER})
        assert not ok, path  # a loopback peer on the public listener neither
        ok, _ = guard.allows({**scope, "server": LOCAL, "client": LOOPBACK_PEER})
        assert ok, path
    status, _ = _post(guard, flower.BUNDLED_RUNTIME_PULL, b"")
    assert status == 403


def test_a_bundled_runtime_pull_names_the_superlinks_node_and_carries_the_token() -> None:
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullAppMessagesResponse

    link = RuntimeLink()
    body = PullAppMessagesRequest(message_ids=["m1"]).SerializeToString()
    status, answer = _local(_guard(link), flower.BUNDLED_RUNTIME_PULL, body)
    assert status == 200
    frames = flower.unpack_frames(answer)
    res = PullAppMessagesResponse.FromString(frames[0])
    ids = [oid for t in res.message_object_trees for oid in flower._tree_ids(t)]
    assert flower._checked_objects(ids, frames[1:]) == dict([REC_A, REC_B, RDICT, MSG])
    assert link.paths() == ["/v1/runtime/pull-messages"] + ["/v1/fleet/pull-object"] * 4
    for _, req, headers in link.asked[1:]:
        assert PullObjectRequest.FromString(req).node.node_id == flower.SUPERLINK_NODE_ID
        assert headers[b"flwr-task-token"] == b"the task's token"


def test_a_bundled_runtime_push_stores_objects_as_the_superlinks_and_wakes_the_nodes(
    monkeypatch: Any,
) -> None:
    """A stage's messages wake the nodes' held pulls once their objects are stored."""
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest

    monkeypatch.setattr(guard_module, "RECHECK_WOKEN_S", 30.0)
    link = RuntimeLink()
    link.messages = 0  # the node's pull is empty until the push
    guard = _guard(link)
    head = PushAppMessagesRequest().SerializeToString()
    bundle = flower.pack_frames([head, _push_object(REC_A, node=99), _push_object(RDICT)])

    async def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        held = asyncio.ensure_future(
            post(guard, "/v1/fleet/pull-messages", PULL, server=PUBLIC, client=PEER)
        )
        await asyncio.sleep(0.05)
        assert not held.done()
        link.messages = 1
        pushed = await post(
            guard, flower.BUNDLED_RUNTIME_PUSH, bundle, server=LOCAL, client=LOOPBACK_PEER
        )
        return pushed, await asyncio.wait_for(held, timeout=5)

    (status, answer), (pull_status, _) = asyncio.run(scenario())
    assert status == 200 and pull_status == 200
    assert link.stored == {REC_A[0]: (REC_A[1], "sess-2"), RDICT[0]: (RDICT[1], "sess-2")}
    assert link.nodes == [flower.SUPERLINK_NODE_ID] * 2
    order = link.paths()
    assert order.index("/v1/fleet/pull-messages", 1) > max(
        i for i, p in enumerate(order) if p == "/v1/fleet/push-object"
    ), order  # the node's held pull was asked again only after both objects were stored


def test_the_serverapps_grid_falls_back_to_flowers_requests_without_bundled_routes() -> None:
    """Flower's HttpGrid with fedcore's bundled transfers, against a SuperLink without
    the routes: its requests are Flower's own, from the first refusal on."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PushAppMessagesResponse
    from flwr.supercore.run import Run
    from flwr.superlink.grid.http_grid import HttpGrid

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path.startswith("/fedcore/"):
            return httpx.Response(404, text="not here")
        if request.url.path.endswith("/push-messages"):
            res = PushAppMessagesResponse(message_ids=["m"], session_id="s")
            return httpx.Response(200, content=res.SerializeToString())
        return httpx.Response(200, content=PullAppMessagesResponse().SerializeToString())

    grid = HttpGrid("127.0.0.1:1", insecure=True, token="t")
    grid._runtime_client._client = httpx.Client(transport=httpx.MockTransport(handler))
    grid.set_run(Run.create_empty(run_id=5))
    assert flower.bundle_runtime_transfers(grid) and flower.bundle_runtime_transfers(grid)
    msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=2, message_type="train")
    assert list(grid.push_messages([msg])) == ["m"]
    assert list(grid.pull_messages(["m"])) == []
    assert seen == [
        flower.BUNDLED_RUNTIME_PUSH,
        "/v1/runtime/push-messages",
        "/v1/runtime/pull-messages",
    ]


def test_a_push_bundle_larger_than_the_server_takes_goes_flowers_way_that_once() -> None:
    """413 (the guard refuses a body over ``--max-request-mb`` before storing anything):
    the reply goes with Flower's requests, object by object, and the next one is
    bundled again."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supernode.fleet_http_client import FleetHttpClient

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == flower.BUNDLED_PUSH:
            return httpx.Response(413, text="too large")
        if request.url.path == "/v1/fleet/push-messages":
            req = PushMessagesRequest.FromString(request.content)
            ids = flower._tree_ids(req.message_object_trees[0])
            res = PushMessagesResponse(objects_to_push=ids, session_id="s")
            return httpx.Response(200, content=res.SerializeToString())
        return httpx.Response(200, content=PushObjectResponse(stored=True).SerializeToString())

    client = FleetHttpClient("http://test")
    client._client = httpx.Client(transport=httpx.MockTransport(handler))
    ins = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=NODE, message_type="train")
    flower.set_message_id(ins, ins.object_id)
    for _ in range(2):
        reply = Message(RecordDict({"r": ConfigRecord({"y": 2})}), reply_to=ins)
        flower.push_reply(client, NODE, reply, runtime=0.1)
    assert seen[0] == flower.BUNDLED_PUSH and seen[1] == "/v1/fleet/push-messages"
    second = seen.index(flower.BUNDLED_PUSH, 1)  # bundled again: no route was refused
    assert set(seen[2:second]) == {"/v1/fleet/push-object"} and len(seen[2:second]) == 3
