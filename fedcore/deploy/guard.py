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
on the local listener), so no client is turned away for arriving early. Opening
needs the secret ``fedcore server`` drew from the CSPRNG for this SuperLink
(header ``x-fedcore-open-token``; handed to the SuperLink process in its
environment, which it removes at start so that no child inherits it): any other
local caller gets 403, before or after the opening.

Every request body is capped (``max_request_bytes``, default 64 MiB; Flower sends
arrays in 5 MiB chunks, one object per request, so a real SuperNode stays far
below it): a larger one is answered 413 and logged, before the app reads it, or
as soon as a chunked body passes the cap.

A second process with the same identity (a kit started twice) is refused by the
SuperLink with the same answer as a key that was never admitted (HTTP 412, "Failed
to activate SuperNode"). The guard tells them apart for the client: it remembers
when each identity (the signed ``flwr-public-key`` header) last got a successful
answer, and adds ``x-fedcore-identity-last-active: SECONDS`` to a refused
activation of an identity it has seen (``fedcore client`` turns it into "already
connected from another process", see :func:`fedcore.deploy.node.explain`).

The decision uses the addresses of the accepted TCP connection (the ASGI
``server`` and ``client`` of the scope, filled in by uvicorn from the socket,
with proxy headers off), not anything the peer sends.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from fedcore.flower_adapter import fleet_routes

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "LAST_ACTIVE_HEADER",
    "OPEN_PATH",
    "OPEN_TOKEN_ENV",
    "OPEN_TOKEN_HEADER",
    "ListenerGuard",
    "fleet_routes",
    "is_loopback",
]

#: Local-listener path that opens the public listener.
OPEN_PATH = "/fedcore/open"
#: Header carrying the opening secret (hex), and the variable that hands it to the
#: SuperLink process (``fedcore server`` sets it for that child only).
OPEN_TOKEN_HEADER = "x-fedcore-open-token"
OPEN_TOKEN_ENV = "FEDCORE_OPEN_TOKEN"
#: Default cap on one request's body.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: Header on a refused activation: seconds since this identity's last successful request.
LAST_ACTIVE_HEADER = "x-fedcore-identity-last-active"
_PUBLIC_KEY_HEADER = b"flwr-public-key"
_ACTIVATE_PATH = "/v1/fleet/activate-node"
_DEACTIVATE_PATH = "/v1/fleet/deactivate-node"
_MAX_IDENTITIES = 100_000  # identities remembered (only authenticated, successful ones)

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
        503 until ``POST /fedcore/open`` with ``open_token`` arrives on the local
        listener.
    open_token : bytes, optional
        The secret that opens the public listener (``secrets.token_bytes``);
        without one the open endpoint refuses everyone.
    max_request_bytes : int (default: 64 MiB)
        Largest request body served; larger ones get 413.

    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        local_port: int,
        public_paths: Iterable[str],
        start_open: bool = True,
        open_token: bytes | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if open_token is not None and len(open_token) < 16:
            raise ValueError("open_token must be at least 16 random bytes")
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.app = app
        self.local_port = local_port
        self.public_paths = frozenset(public_paths)
        self.open = start_open
        self.open_token = open_token
        self.max_request_bytes = max_request_bytes
        self._last_active: dict[bytes, float] = {}  # public key header -> time.monotonic()

    def _track(self, scope: Scope, message: MutableMapping[str, Any]) -> None:
        """Note an identity's successful answer; mark a refused activation of a known one."""
        key = next(
            (
                bytes(v)
                for n, v in scope.get("headers") or ()
                if bytes(n).lower() == _PUBLIC_KEY_HEADER
            ),
            None,
        )
        if key is None:
            return
        status = int(message.get("status", 0))
        path = scope.get("path")
        if 200 <= status < 300:
            self._last_active.pop(key, None)
            if path != _DEACTIVATE_PATH:
                self._last_active[key] = time.monotonic()
                if len(self._last_active) > _MAX_IDENTITIES:
                    self._last_active.pop(next(iter(self._last_active)))
        elif path == _ACTIVATE_PATH and status == 412 and key in self._last_active:
            age = time.monotonic() - self._last_active[key]
            message["headers"] = [
                *(message.get("headers") or ()),
                (LAST_ACTIVE_HEADER.encode(), f"{age:.3f}".encode()),
            ]

    def _token_ok(self, scope: Scope) -> bool:
        if self.open_token is None:
            return False
        for name, value in scope.get("headers") or ():
            if bytes(name).lower() == OPEN_TOKEN_HEADER.encode():
                try:
                    given = bytes.fromhex(bytes(value).decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    return False
                return hmac.compare_digest(given, self.open_token)
        return False

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
            if scope.get("method") == "POST" and self._token_ok(scope):
                self.open = True
                await _respond(send, 200, {"detail": "public listener open"})
                return
            ok, reason = False, "opening the public listener needs fedcore server's token"
        if ok and not on_local and not self.open:
            await _respond(send, 503, {"detail": "starting: admitted keys not registered yet"})
            return
        if ok and scope["type"] == "http":
            await self._limited(scope, receive, send)
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

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve ``scope`` with its body capped at :attr:`max_request_bytes` (else 413)."""
        limit = self.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            self._log_too_large(scope, f"announces {declared} bytes")
            await _respond(send, 413, _too_large(limit))
            return
        received = 0
        refused = False
        started = False

        async def capped_receive() -> MutableMapping[str, Any]:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    self._log_too_large(scope, f"sent more than {limit} bytes")
                    if not started:
                        await _respond(send, 413, _too_large(limit))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; the app's late answer is dropped
            if message.get("type") == "http.response.start":
                started = True
                self._track(scope, message)
            await send(message)

        await self.app(scope, capped_receive, guarded_send)

    def _log_too_large(self, scope: Scope, what: str) -> None:
        client = scope.get("client") or ("?", "?")
        log.warning(
            "refused %s %s from %s:%s with 413: the body %s; the limit is %d bytes "
            "(fedcore server --max-request-mb)",
            scope.get("method"),
            scope.get("path"),
            client[0],
            client[1],
            what,
            self.max_request_bytes,
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if bytes(name).lower() == b"content-length":
            try:
                return int(bytes(value))
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> dict[str, str]:
    return {"detail": f"request body larger than {limit} bytes (fedcore server --max-request-mb)"}


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
