"""The listener guard in front of Flower's SuperLink: Fleet API public, the rest loopback-only.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime HTTP APIs from one
FastAPI app on one port, and the Control API has no authentication: whoever
reaches it can start a run (code executed on the server and on every node) or
register a node key; the Runtime API's ``acquire-task`` hands out the
ServerApp's task token. ``fedcore server`` therefore serves the one app on two
sockets and wraps it in :class:`ListenerGuard`:

- the **public** listener (``--address``) answers only ``POST`` to the exact
  Fleet API routes (what a SuperNode calls, each request signed with its
  provisioned identity); everything else gets 403, whoever the peer is;
- the **local** listener is bound to ``127.0.0.1`` and additionally refuses any
  peer that is not a loopback address; Control (``fedcore server`` itself
  registers the admitted keys and starts the run there) and Runtime (the
  ServerApp process, SuperExec) use it.

The public listener starts closed (503, which SuperNodes retry) and opens when
``fedcore server`` has registered the admitted keys (``POST /fedcore/open``
on the local listener), so no client is turned away for arriving early.

The decision uses the addresses of the accepted TCP connection (the ASGI
``server`` and ``client`` of the scope, filled in by uvicorn from the socket,
with proxy headers off), not anything the peer sends.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from fedcore.flower_adapter import fleet_routes

__all__ = ["OPEN_PATH", "ListenerGuard", "fleet_routes", "is_loopback"]

#: Local-listener path that opens the public listener.
OPEN_PATH = "/fedcore/open"

log = logging.getLogger("fedcore.guard")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: object) -> bool:
    """Whether ``host`` is a loopback IP address (IPv4-mapped IPv6 included)."""
    if not isinstance(host, str):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class ListenerGuard:
    """ASGI middleware: which requests each of the SuperLink's two listeners may serve.

    Parameters
    ----------
    app : ASGI application
        Flower's SuperLink FastAPI app.
    local_port : int
        Port of the loopback listener (Control, Runtime and Fleet APIs).
    public_paths : iterable of str
        Exact paths the public listener serves (``POST`` only): the Fleet API.
    start_open : bool (default: True)
        Whether the public listener serves from the start; if not, it answers
        503 until ``POST /fedcore/open`` arrives on the local listener.

    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        local_port: int,
        public_paths: Iterable[str],
        start_open: bool = True,
    ) -> None:
        self.app = app
        self.local_port = local_port
        self.public_paths = frozenset(public_paths)
        self.open = start_open

    def allows(self, scope: Scope) -> tuple[bool, str]:
        """Whether the request in ``scope`` may reach the app, and why not."""
        server = scope.get("server") or (None, None)
        client = scope.get("client") or (None, None)
        on_local = server[1] == self.local_port and is_loopback(server[0])
        if on_local:
            if is_loopback(client[0]):
                return True, ""
            return False, "the local listener serves loopback peers only"
        if (
            scope.get("type") == "http"
            and scope.get("method") == "POST"
            and scope.get("path") in self.public_paths
        ):
            return True, ""
        return False, "the public listener serves the Fleet API only"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse what the listener may not serve; pass everything else through."""
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ok, reason = self.allows(scope)
        server = scope.get("server") or (None, None)
        on_local = server[1] == self.local_port
        if ok and on_local and scope.get("path") == OPEN_PATH:
            self.open = True
            await _respond(send, 200, {"detail": "public listener open"})
            return
        if ok and not on_local and not self.open:
            await _respond(send, 503, {"detail": "starting: admitted keys not registered yet"})
            return
        if ok:
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", "?")
        log.warning(
            "refused %s %s from %s:%s (%s)",
            scope.get("method", "WS"),
            scope.get("path"),
            client[0],
            client[1],
            reason,
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _respond(send, 403, {"detail": f"forbidden: {reason}"})


async def _respond(send: Send, status: int, obj: object) -> None:
    body = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
