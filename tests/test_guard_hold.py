"""The guard's held pulls (long polling) and the client's torch threads (issue 11)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest
from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=E0611
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
)

from fedcore.core.errors import DeploymentError
from fedcore.deploy import guard as guard_module
from fedcore.deploy.guard import ListenerGuard, fleet_routes
from fedcore.deploy.node import cmd_client, register
from tests.asgi import post

LOCAL = 9093


class FakeLink:
    """Answers pulls from what was pushed; counts how often each path was asked."""

    def __init__(self) -> None:
        self.messages = 0
        self.uploaded = False
        self.asked: dict[str, int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        self.asked[path] = self.asked.get(path, 0) + 1
        body = (await receive())["body"]
        assert body == b"signed request", "a held request is replayed unchanged"
        status, out = 200, b""
        if path == "/v1/runtime/push-messages":
            self.messages += 1
        elif path == "/v1/runtime/push-object":
            self.uploaded = True
        elif path == "/v1/fleet/pull-messages":
            res = PullMessagesResponse()
            if self.messages:
                self.messages -= 1
                res.messages_list.add().metadata.message_id = "m1"
                res.message_object_trees.add().object_id = "m1"
            out = res.SerializeToString()
        elif path == "/v1/fleet/pull-object":
            out = PullObjectResponse(
                object_found=True, object_available=self.uploaded, object_content=b"x"
            ).SerializeToString()
        elif path == "/v1/fleet/get-run":
            status = 409
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": out})


def _request(guard: ListenerGuard, path: str, body: bytes = b"signed request") -> Any:
    """``path`` with ``body`` over the local listener, as a coroutine returning (status, body)."""
    return post(guard, path, body, server=("127.0.0.1", LOCAL), client=("127.0.0.1", 50000))


def _guard(link: FakeLink) -> ListenerGuard:
    return ListenerGuard(link, local_port=LOCAL, public_paths=fleet_routes())  # type: ignore[arg-type]


def test_an_empty_pull_is_held_until_the_serverapp_pushes_and_then_answers(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(guard_module, "RECHECK_S", 30.0)  # only a push can wake it in time
    link = FakeLink()
    guard = _guard(link)

    async def scenario() -> tuple[int, bytes]:
        pull = asyncio.ensure_future(_request(guard, "/v1/fleet/pull-messages"))
        await asyncio.sleep(0.05)
        assert not pull.done(), "an empty pull is held, not answered"
        assert (await _request(guard, "/v1/runtime/push-messages"))[0] == 200
        return await asyncio.wait_for(pull, timeout=10)

    status, body = asyncio.run(scenario())
    res = PullMessagesResponse()
    res.ParseFromString(body)
    assert status == 200 and [t.object_id for t in res.message_object_trees] == ["m1"]
    assert link.asked["/v1/fleet/pull-messages"] == 2  # once held, once woken by the push


def test_an_object_not_uploaded_yet_is_held_until_its_push(monkeypatch: Any) -> None:
    monkeypatch.setattr(guard_module, "RECHECK_S", 30.0)
    link = FakeLink()
    guard = _guard(link)

    async def scenario() -> tuple[int, bytes]:
        pull = asyncio.ensure_future(_request(guard, "/v1/fleet/pull-object"))
        await asyncio.sleep(0.05)
        assert not pull.done()
        await _request(guard, "/v1/runtime/push-object")
        return await asyncio.wait_for(pull, timeout=10)

    status, body = asyncio.run(scenario())
    res = PullObjectResponse()
    res.ParseFromString(body)
    assert status == 200 and res.object_available and res.object_content == b"x"


def test_a_hold_ends_at_its_limit_with_the_apps_empty_answer(monkeypatch: Any) -> None:
    monkeypatch.setattr(guard_module, "RECHECK_S", 0.01)
    monkeypatch.setattr(guard_module, "RECHECK_WOKEN_S", 0.01)
    link = FakeLink()
    guard = _guard(link)
    path = "/v1/fleet/pull-messages"
    guard._holds[path] = (0.05, *guard._holds[path][1:])
    status, body = asyncio.run(_request(guard, path))
    assert status == 200 and not PullMessagesResponse.FromString(body).message_object_trees
    assert link.asked[path] >= 2  # asked again while held
    # an error answer (or a path that is not a pull) goes back at once, asked once
    assert asyncio.run(_request(guard, "/v1/fleet/get-run"))[0] == 409
    assert link.asked["/v1/fleet/get-run"] == 1


class ObjectLink:
    """A SuperLink's object store: ``pull-object`` answers once that id was pushed."""

    def __init__(self) -> None:
        self.uploaded: set[str] = set()
        self.asked: dict[str, int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        if scope["path"].endswith("push-object"):
            self.uploaded.add(PushObjectRequest.FromString(body).object_id)
            out = b""
        else:
            oid = PullObjectRequest.FromString(body).object_id
            self.asked[oid] = self.asked.get(oid, 0) + 1
            out = PullObjectResponse(
                object_found=True, object_available=oid in self.uploaded, object_content=b"x"
            ).SerializeToString()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": out})


def test_a_held_object_pull_is_asked_again_only_when_its_own_object_is_pushed(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(guard_module, "RECHECK_S", 30.0)  # only a push can wake it in time
    link = ObjectLink()
    guard = ListenerGuard(link, local_port=LOCAL, public_paths=fleet_routes())  # type: ignore[arg-type]
    pull = PullObjectRequest(object_id="a").SerializeToString()

    async def scenario() -> None:
        held = asyncio.ensure_future(_request(guard, "/v1/fleet/pull-object", pull))
        await asyncio.sleep(0.05)
        for other in ("b", "c", "d"):  # the other objects of the message
            push = PushObjectRequest(object_id=other, object_content=b"x").SerializeToString()
            assert (await _request(guard, "/v1/runtime/push-object", push))[0] == 200
        await asyncio.sleep(0.05)
        assert not held.done()
        push = PushObjectRequest(object_id="a", object_content=b"x").SerializeToString()
        await _request(guard, "/v1/runtime/push-object", push)
        assert (await asyncio.wait_for(held, timeout=10))[0] == 200

    asyncio.run(scenario())
    assert link.asked["a"] == 2  # once held, once woken by its own push (not by b, c, d)
    assert guard._object_waits == {}  # nothing left behind


def test_client_torch_threads_must_be_positive() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["client", "--server", "127.0.0.1:1", "--data", "x.npz", "--torch-threads", "0"]
    )
    with pytest.raises(DeploymentError, match="--torch-threads must be >= 1, got 0"):
        cmd_client(args)
    assert parser.parse_args(["client", "--server", "h:1", "--data", "x"]).torch_threads == 1


def test_the_guard_reports_each_request_and_each_ask_of_the_app(monkeypatch: Any) -> None:
    monkeypatch.setattr(guard_module, "RECHECK_S", 30.0)
    seen: list[tuple[str, str]] = []
    link = FakeLink()
    guard = ListenerGuard(
        link,  # type: ignore[arg-type]
        local_port=LOCAL,
        public_paths=fleet_routes(),
        stats=lambda path, kind, seconds: seen.append((path, kind)) if seconds >= 0 else None,
    )

    async def scenario() -> None:
        pull = asyncio.ensure_future(_request(guard, "/v1/fleet/pull-messages"))
        await asyncio.sleep(0.05)
        await _request(guard, "/v1/runtime/push-messages")
        await asyncio.wait_for(pull, timeout=10)

    asyncio.run(scenario())
    held = [k for p, k in seen if p == "/v1/fleet/pull-messages"]
    assert held == ["ask", "ask", "request"]  # held once, woken once: two asks, one request
    assert ("/v1/runtime/push-messages", "request") in seen
