"""Flower's internals stay behind fedcore.flower_adapter, which checks the Flower version."""

from __future__ import annotations

import ast
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
