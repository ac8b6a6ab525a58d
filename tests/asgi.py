"""One request through an ASGI app, as uvicorn hands it over (for the guard's tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def post(
    app: Any,
    path: str,
    body: bytes,
    *,
    server: tuple[str, int],
    client: tuple[str, int],
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> tuple[int, bytes]:
    """``POST path`` with ``body``: the answer's status and body.

    The request's body comes in one message; a second ``receive`` waits until the app
    has answered and then reports the disconnect, as a client that waits for its reply.
    """
    sent: list[dict[str, Any]] = []
    done = asyncio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "server": server,
        "client": client,
        "headers": list(headers),
    }
    await app(scope, receive, send)
    done.set()
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])
