"""Flower's internals stay behind fedcore.flower_adapter, which checks the Flower version."""

from __future__ import annotations

import ast
import datetime
from pathlib import Path

import flwr
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedcore import flower_adapter
from fedcore.core.errors import EngineError
from fedcore.flower_adapter import FlowerVersionError, check_flower_version

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "fedcore" / "flower_adapter.py"
#: Flower's public API: what every module may import.
PUBLIC = {
    "flwr.app",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.clientapp",
    "flwr.clientapp.mod",
}


def _flwr_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every Flower module a module imports: import statements and import_module("...")."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "flwr":  # from flwr import serverapp -> flwr.serverapp
                found += [(node.lineno, f"flwr.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (
                    isinstance(node.func, ast.Name)
                    and node.func.id in ("import_module", "__import__")
                )
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, m) for line, m in found if m == "flwr" or m.startswith("flwr.")]


def _dict_writes(tree: ast.AST) -> list[int]:
    """Lines that write ``<x>.__dict__[...]`` (how Flower's private fields get set)."""
    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for t in targets:
            if (
                isinstance(t, ast.Subscript)
                and isinstance(t.value, ast.Attribute)
                and t.value.attr == "__dict__"
            ):
                lines.append(t.lineno)
    return lines


def _sources() -> list[Path]:
    files = [p for d in ("fedcore", "server", "clients") for p in sorted((ROOT / d).rglob("*.py"))]
    assert ADAPTER in files
    return files


def test_only_the_adapter_imports_private_flower_modules() -> None:
    offenders = []
    for path in _sources():
        if path == ADAPTER:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(ROOT)
        offenders += [f"{rel}:{line}: {m}" for line, m in _flwr_modules(tree) if m not in PUBLIC]
        offenders += [f"{rel}:{line}: writes __dict__" for line in _dict_writes(tree)]
    assert offenders == [], (
        "Flower's private modules and private attributes are for fedcore/flower_adapter.py "
        "only; add what you need there:\n" + "\n".join(offenders)
    )


def test_the_scan_sees_every_kind_of_import() -> None:
    code = (
        "import flwr.proto.fleet_pb2\n"
        "from flwr.supercore.run import Run\n"
        "from flwr import simulation\n"
        "import importlib\n"
        "m = importlib.import_module('flwr.superlink.main')\n"
        "from flwr.app import Message\n"
        "msg.metadata.__dict__['_message_id'] = 'x'\n"
    )
    tree = ast.parse(code)
    mods = [m for _, m in _flwr_modules(tree) if m not in PUBLIC]
    assert mods == [
        "flwr.proto.fleet_pb2",
        "flwr.supercore.run",
        "flwr.simulation",
        "flwr.superlink.main",
    ]
    assert _dict_writes(tree) == [7]


def test_the_adapter_accepts_the_installed_flower() -> None:
    check_flower_version(flwr.__version__)
    check_flower_version(f"{flower_adapter.SUPPORTED_FLOWER}.7")


@pytest.mark.parametrize("version", ["1.43.0", "1.41.2", "2.42.0", "1.4", "nightly"])
def test_the_adapter_refuses_another_flower(version: str) -> None:
    with pytest.raises(FlowerVersionError) as info:
        check_flower_version(version)
    message = str(info.value)
    assert version in message and f"Flower {flower_adapter.SUPPORTED_FLOWER}.x" in message
    # the CLI reports it like any fedcore error; `except ImportError` sees it too
    assert isinstance(info.value, EngineError) and isinstance(info.value, ImportError)


def test_message_round_trip_and_ids() -> None:
    msg = Message(RecordDict({"c": ConfigRecord({"i": 3})}), 1001, "train")
    flower_adapter.set_message_id(msg, "abc")
    again = flower_adapter.message_from_bytes(flower_adapter.message_to_bytes(msg))
    assert again.metadata.message_id == "abc"
    assert again.content.config_records["c"]["i"] == 3
    err = flower_adapter.error_reply(again, "boom", crashed=True)
    assert err.has_error() and err.error.reason == "boom"
    assert err.metadata.reply_to_message_id == "abc"


def test_the_cli_names_both_versions_under_another_flower() -> None:
    import subprocess
    import sys

    code = (
        "import sys, flwr; flwr.__version__ = '1.43.0'\n"
        "from fedcore.cli import main; sys.exit(main(['provision', '--help']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 1, out.stderr
    assert "Flower 1.42.x" in out.stderr and "flwr 1.43.0" in out.stderr
    assert "Traceback" not in out.stderr


def test_superlink_app_is_flowers_app_with_our_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fedcore.deploy.superlink import superlink_argv

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # superlink_app sets it for Flower
    app, config = flower_adapter.superlink_app(
        superlink_argv(local_port=9999, kit=None, insecure=True)
    )
    assert type(app).__name__ == "FastAPI" and callable(app)  # served, not run, here
    assert config.ssl_keyfile is None and config.ssl_certfile is None


def _layered_app(tasks: dict[str, object]) -> object:
    """A Starlette app with two ``BaseHTTPMiddleware`` layers, as Flower's SuperLink stacks them."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    class ReadsBody(BaseHTTPMiddleware):  # like ProtobufTranslationMiddleware
        async def dispatch(self, request, call_next):  # type: ignore[no-untyped-def]
            request.state.parsed = (await request.body()).upper()
            if request.headers.get("x-key") == "good":  # (the refused request's is not kept)
                tasks[request.url.path] = asyncio.current_task()
            response = await call_next(request)
            response.headers["x-seen"] = "yes"
            return response

    async def refuse(request, call_next):  # type: ignore[no-untyped-def]  # like NodeAuth
        if request.headers.get("x-key") != "good":
            raise HTTPException(401, "bad key")
        return await call_next(request)

    async def translate(request, call_next):  # type: ignore[no-untyped-def]  # error layer
        try:
            return await call_next(request)
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    async def fleet(request):  # type: ignore[no-untyped-def]
        tasks["fleet endpoint"] = asyncio.current_task()
        return Response(request.state.parsed + await request.body(), status_code=201)

    async def stream(request):  # type: ignore[no-untyped-def]
        tasks["stream"] = asyncio.current_task()
        return StreamingResponse(iter([b"a", b"b", b"c"]))

    return Starlette(
        routes=[
            Route("/v1/fleet/x", fleet, methods=["POST"]),
            Route("/v1/control/logs", stream, methods=["POST"]),
        ],
        middleware=[
            Middleware(BaseHTTPMiddleware, dispatch=translate),
            Middleware(ReadsBody),
            Middleware(BaseHTTPMiddleware, dispatch=refuse),
        ],
    )


@pytest.mark.parametrize("lean", [False, True])
def test_the_lean_layers_answer_as_starlettes_and_in_the_requests_own_task(lean: bool) -> None:
    """``superlink_app``'s middleware rewrite: the same answers (body read by a layer and
    again by the handler, headers a layer adds, a layer's refusal turned into an error
    reply by an outer one, a stream on another path), and on Fleet paths the handler
    runs in the dispatching task (Starlette's layer starts a task per layer)."""
    from starlette.testclient import TestClient

    tasks: dict[str, object] = {}
    app = _layered_app(tasks)
    if lean:
        flower_adapter._lean_middleware(app)  # noqa: SLF001 - the rewrite under test
    with TestClient(app) as client:
        ok = client.post("/v1/fleet/x", content=b"abc", headers={"x-key": "good"})
        refused = client.post("/v1/fleet/x", content=b"abc", headers={"x-key": "bad"})
        streamed = client.post("/v1/control/logs", headers={"x-key": "good"})
    assert (ok.status_code, ok.content, ok.headers["x-seen"]) == (201, b"ABCabc", "yes")
    assert int(ok.headers["content-length"]) == 6
    assert (refused.status_code, refused.json()) == (401, {"detail": "bad key"})
    assert (streamed.status_code, streamed.content, streamed.headers["x-seen"]) == (
        200,
        b"abc",
        "yes",
    )
    assert (tasks["fleet endpoint"] is tasks["/v1/fleet/x"]) is lean
    assert tasks["stream"] is not tasks["/v1/control/logs"]  # Starlette's layers
    with pytest.raises(RuntimeError, match="already served"):
        flower_adapter._lean_middleware(app)  # noqa: SLF001


# -- node authentication: one signed timestamp per window, verified once (issue 11) --
def _signed_headers_verify(headers: dict[str, str], key: object) -> bool:
    """Whether ``headers`` carry ``key``'s public key and its valid signature of their timestamp."""
    from base64 import b64decode

    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        public_key_to_bytes,
        verify_signature,
    )

    public = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER])
    assert public == public_key_to_bytes(key.public_key())  # type: ignore[attr-defined]
    signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER])
    stamp = headers[TIMESTAMP_HEADER].encode("ascii")
    return bool(verify_signature(bytes_to_public_key(public), stamp, signature))


def test_a_node_signs_one_timestamp_per_reuse_window_with_flowers_headers() -> None:
    """The client's interceptor sends Flower's three node-auth headers, valid for its key;
    the same ones until ``reuse_s`` has passed by the wall clock, fresh ones after that or
    when the clock goes back; and adds them to the request as Flower's does."""
    import httpx
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = flower_adapter.new_node_key()
    clock = [1000.0]
    signer = flower_adapter._NodeAuthInterceptor(key, reuse_s=10.0, clock=lambda: clock[0])
    first = signer.headers()
    assert _signed_headers_verify(first, key)
    clock[0] += 9.99
    assert signer.headers() == first
    clock[0] += 0.01
    second = signer.headers()
    assert second != first and _signed_headers_verify(second, key)
    assert second[TIMESTAMP_HEADER] >= first[TIMESTAMP_HEADER]
    clock[0] -= 1.0  # the clock went back: sign again rather than trust the window
    third = signer.headers()
    assert third != second and _signed_headers_verify(third, key)

    # the same headers Flower's own interceptor adds, on a real request
    def sent(interceptor: object) -> httpx.Headers:
        from flwr.proto.fleet_pb2 import PullMessagesRequest
        from flwr.supercore.protobuf.client import ProtobufRequestContext

        request = httpx.Request("POST", "https://127.0.0.1:1/v1/fleet/pull-messages")
        context = ProtobufRequestContext("PullMessages", PullMessagesRequest(), request)
        return interceptor.intercept(context, lambda c: c.request.headers)  # type: ignore[attr-defined]

    ours, flowers = sent(signer), sent(NodeAuthHttpInterceptor(key, key.public_key()))
    assert set(ours) == set(flowers)
    assert _signed_headers_verify(dict(ours), key)


def test_the_superlink_remembers_only_the_signatures_it_verified() -> None:
    """``_VerifiedSignatures`` verifies a (key, timestamp, signature) triple once and accepts
    that exact triple again; the same timestamp and signature under another key, another
    timestamp, an altered signature are verified (and refused); refusals are never
    remembered; at most ``size`` triples are kept, the oldest forgotten first."""
    from flwr.supercore.primitives.asymmetric import sign_message, verify_signature

    calls: list[bytes] = []

    def verify(public_key: object, message: bytes, signature: bytes) -> bool:
        calls.append(message)
        return bool(verify_signature(public_key, message, signature))  # type: ignore[arg-type]

    remembered = flower_adapter._VerifiedSignatures(verify, size=2)
    one, two = flower_adapter.new_node_key(), flower_adapter.new_node_key()
    stamp = b"2026-12-01T22:00:00.000001+00:00"
    signature = sign_message(one, stamp)
    assert remembered(one.public_key(), stamp, signature) and len(calls) == 1
    assert remembered(one.public_key(), stamp, signature) and len(calls) == 1
    assert not remembered(two.public_key(), stamp, signature) and len(calls) == 2
    assert not remembered(one.public_key(), stamp[:-7] + b"2+00:00", signature)
    altered = bytearray(signature)
    altered[-1] ^= 1
    for _ in range(2):  # a refusal is verified every time
        assert not remembered(one.public_key(), stamp, bytes(altered))
    assert len(calls) == 5
    # two more accepted triples push the first one out
    for key in (one, two):
        other = b"2026-12-01T22:00:01+00:00"
        assert remembered(key.public_key(), other, sign_message(key, other))
    assert len(calls) == 7
    assert remembered(one.public_key(), stamp, signature) and len(calls) == 8


def test_a_remembered_signature_is_refused_once_its_timestamp_is_too_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker holding a node's signed headers (a triple the SuperLink remembers) is
    refused by Flower's node authentication once their timestamp is out of its window, and
    under another key: the age and key checks run before and after the remembered answer."""
    from base64 import b64encode

    from fastapi import HTTPException
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
    from flwr.superlink.routers.fleet import node_auth
    from starlette.requests import Request

    monkeypatch.setattr(node_auth, "verify_signature", node_auth.verify_signature)  # restored
    remembered = flower_adapter._remember_verified_signatures()
    assert node_auth.verify_signature is remembered
    assert flower_adapter._remember_verified_signatures() is remembered  # installed once

    key, other = flower_adapter.new_node_key(), flower_adapter.new_node_key()
    public = public_key_to_bytes(key.public_key())

    def authenticate(stamp: str, claimed: bytes = public) -> int:
        signature = sign_message(key, stamp.encode("ascii"))
        assert remembered(key.public_key(), stamp.encode("ascii"), signature)  # remembered now
        headers = {
            FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public).decode(),
            TIMESTAMP_HEADER: stamp,
            FLEET_HTTP_SIGNATURE_HEADER: b64encode(signature).decode(),
        }
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        request = Request({"type": "http", "headers": raw, "path": "/v1/fleet/activate-node"})
        request.state.protobuf_request = ActivateNodeRequest(public_key=claimed)
        try:
            node_auth.authenticate_node(request)
        except HTTPException as exc:
            return int(exc.status_code)
        return 200

    assert authenticate(now().isoformat()) == 200
    assert authenticate("2020-01-01T00:00:00+00:00") == 401
    old = (now() - datetime.timedelta(seconds=306)).isoformat()
    assert authenticate(old) == 401
    assert authenticate(now().isoformat(), public_key_to_bytes(other.public_key())) == 401


# -- receipts confirmed behind the caller (issue 11) --
def test_behind_runs_calls_in_order_off_the_callers_path_and_survives_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Behind.submit`` returns while the call is still blocked; calls run in order on
    one other thread; a failing call is logged and the next ones still run; ``drain``
    says whether everything submitted has run."""
    import logging
    import threading

    behind = flower_adapter.Behind("test-behind")
    gate, ran, threads = threading.Event(), [], set()

    def call(i: int) -> None:
        threads.add(threading.get_ident())
        if i == 0:
            assert gate.wait(10)
        if i == 2:
            raise RuntimeError("the SuperLink is gone")
        ran.append(i)

    for i in range(5):
        behind.submit(call, i)  # returns although call 0 blocks
    assert ran == []
    assert not behind.drain(0.05)  # still blocked
    gate.set()
    with caplog.at_level(logging.DEBUG, logger="fedcore.flower"):
        assert behind.drain(10)
    assert ran == [0, 1, 3, 4]
    assert threads and threading.get_ident() not in threads and len(threads) == 1
    assert "the SuperLink is gone" in caplog.text
    assert behind.drain(0)  # nothing pending


def test_a_received_message_is_confirmed_behind_after_its_objects_are_pulled() -> None:
    """``receive_message(..., behind=...)`` pulls the message's objects, returns the message,
    and confirms its receipt (the message's object id, run and node) from the thread."""
    import threading

    from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=5, message_type="train")
    flower_adapter.set_message_id(msg, msg.object_id)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    tree = get_object_tree(msg)
    confirmed: list[tuple[str, int, int, int]] = []
    gate = threading.Event()

    class Client:
        def PullObject(self, req: object) -> object:  # noqa: N802 - Flower's name
            return PullObjectResponse(
                object_found=True, object_available=True, object_content=contents[req.object_id]
            )

        def ConfirmMessageReceived(self, req: object) -> object:  # noqa: N802
            assert gate.wait(10)
            confirmed.append(
                (req.message_object_id, req.run_id, req.node.node_id, threading.get_ident())
            )
            return ConfirmMessageReceivedResponse()

    behind = flower_adapter.Behind("test-confirm")
    got = flower_adapter.receive_message(Client(), 5, 7, tree, behind=behind)
    assert got.metadata.message_id == msg.object_id
    assert got.content["c"]["x"] == 1
    assert confirmed == []  # the caller has the message before the receipt is confirmed
    gate.set()
    assert behind.drain(10)
    assert [c[:3] for c in confirmed] == [(msg.object_id, 7, 5)]
    assert confirmed[0][3] != threading.get_ident()


def test_flowers_deployment_grid_confirms_replies_behind_and_other_grids_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``confirm_replies_behind`` gives an ``HttpGrid``'s Runtime client a confirmation that
    answers at once and sends the real one from the thread (once, however often called);
    any other grid is not touched."""
    import threading

    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.superlink.grid.http_grid import HttpGrid

    grid = HttpGrid("127.0.0.1:1", insecure=True, token="t")  # connects lazily, sends nothing
    sent: list[tuple[str, int]] = []
    client = grid._runtime_client
    monkeypatch.setattr(
        client,
        "ConfirmMessageReceived",
        lambda req: sent.append((req.message_object_id, threading.get_ident())),
    )
    assert flower_adapter.confirm_replies_behind(grid)
    wrapped = client.ConfirmMessageReceived
    assert flower_adapter.confirm_replies_behind(grid)  # installed once
    assert client.ConfirmMessageReceived is wrapped
    res = wrapped(ConfirmMessageReceivedRequest(message_object_id="abc", run_id=1))
    assert type(res).__name__ == "ConfirmMessageReceivedResponse"
    assert wrapped.behind.drain(10)
    assert [s[0] for s in sent] == ["abc"] and sent[0][1] != threading.get_ident()
    assert not flower_adapter.confirm_replies_behind(object())  # type: ignore[arg-type]
