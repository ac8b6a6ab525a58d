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

**Held pulls** (long polling; issue 11). Flower answers a pull at once, empty or
not, and its clients then sleep: a SuperNode 3 s, Flower's object pull 1 s (then 2,
4, ... s) when a message's objects are not all uploaded yet, which happens whenever
a node pulls a message in the few milliseconds between the sender's
``push-messages`` and its last ``push-object``. The guard therefore holds

- an empty ``/v1/fleet/pull-messages`` (a node asking for work) for up to
  :data:`HOLD_FLEET_PULL_S`, answering as soon as the ServerApp has pushed
  messages (it asks the app again whenever a Runtime ``push-messages`` succeeds,
  and every :data:`RECHECK_S` in any case);
- an empty ``/v1/runtime/pull-messages`` (the ServerApp asking for replies) for
  up to :data:`HOLD_RUNTIME_PULL_S`, woken by a Fleet ``push-messages``;
- a ``pull-object`` (either API) whose object is announced but not uploaded yet,
  for up to :data:`HOLD_OBJECT_S`, woken by the ``push-object`` of that object id
  (by any push when either request cannot be read);
- an empty ``/v1/runtime/acquire-task`` (SuperExec asking, every 0.1 s, whether
  to start a ServerApp) for up to :data:`HOLD_TASK_S`, woken by a Control
  ``start-run``: ten requests a second become one, on a SuperLink that serves
  every round's requests on the same cores.

Each retry replays the same request (same body, same signed headers) to the
app, so authentication and every other check run again; the answer the client
gets is the app's own. A peer that disconnects stops its hold.

**Bundled transfers** (issue 11). Flower moves a message in 2 + one request per
object (its object tree: the message, its record dict, each record), each through
the whole app (TLS, uvicorn, twelve middleware layers). fedcore's client and
ServerApp grid use four routes of this guard instead, each one request:

- ``/fedcore/v1/fleet/pull-messages`` (public listener): a node's held pull, and
  the objects of the message it got;
- ``/fedcore/v1/fleet/push-messages`` (public): a node's reply and its objects
  (frames: the ``push-messages`` request, then ``push-object`` requests);
- ``/fedcore/v1/runtime/pull-messages`` and ``.../push-messages`` (local listener
  only): the ServerApp's held pull for replies with their objects, and a stage's
  messages with theirs.

The first part goes through the whole app with the caller's headers (node
authentication, the task token), exactly as Flower's own request; the object parts
are that answer's objects (pull) or those it asked for in its session (push, stored
as the authenticated node's), served by Flower's object handlers on the SuperLink's
own state (:class:`~fedcore.flower_adapter.FleetObjects`,
:class:`~fedcore.flower_adapter.RuntimeObjects`). A pushed stage (or reply) wakes the
pulls held for it only once its objects are stored. A refusal of the first part is
the bundle's answer; a malformed bundle gets 400.

**Request statistics** (``stats``; ``fedcore server`` passes one when its
environment has ``FEDCORE_GUARD_STATS=FILE``): each request served is reported as
``(path, "request", seconds)`` and, for the held routes, each time the app is asked
(a held request asks it again when woken) as ``(path, "ask", seconds)``;
``benchmarks/deployment_latency.py --requests`` counts them per round.

The decision uses the addresses of the accepted TCP connection (the ASGI
``server`` and ``client`` of the scope, filled in by uvicorn from the socket,
with proxy headers off), not anything the peer sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

from fedcore.flower_adapter import (
    BUNDLE_MAX_FRAMES,
    BUNDLED_PULL,
    BUNDLED_PUSH,
    BUNDLED_RUNTIME_PULL,
    BUNDLED_RUNTIME_PUSH,
    FleetObjects,
    RuntimeObjects,
    bundled_object_pushes,
    bundled_object_requests,
    fleet_routes,
    no_app_messages,
    no_messages,
    no_task,
    object_not_uploaded,
    object_pulled,
    object_stored,
    pack_frames,
    pushed_object_id,
    requested_object_id,
    unpack_frames,
)

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "HOLD_FLEET_PULL_S",
    "HOLD_OBJECT_S",
    "HOLD_RUNTIME_PULL_S",
    "HOLD_TASK_S",
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
#: Longest hold of an empty Fleet ``pull-messages`` (a SuperNode's request times out at 30 s).
HOLD_FLEET_PULL_S = 3.0
#: Longest hold of an empty Runtime ``pull-messages`` (the ServerApp's poll for replies).
HOLD_RUNTIME_PULL_S = 0.5
#: Longest hold of a ``pull-object`` whose object is not uploaded yet.
HOLD_OBJECT_S = 5.0
#: Longest hold of an empty ``acquire-task`` (SuperExec's poll for a ServerApp to start).
HOLD_TASK_S = 1.0
#: A held request asks the app again at least this often, woken or not.
RECHECK_S = 0.25
#: ... except a node's pull for messages and SuperExec's ``acquire-task``: only a
#: push through this guard answers them, and it always wakes them, so the app is
#: asked again only this often (each ask costs the SuperLink ~5-10 ms of CPU, and
#: at 0.25 s three idle nodes and SuperExec made ~16 asks a second: docs/benchmarks.md).
RECHECK_WOKEN_S = 1.0
_FLEET_PULL = "/v1/fleet/pull-messages"
_RUNTIME_PULL = "/v1/runtime/pull-messages"
_PULL_OBJECTS = ("/v1/fleet/pull-object", "/v1/runtime/pull-object")
_PUSH_OBJECTS = ("/v1/fleet/push-object", "/v1/runtime/push-object")
#: fedcore's bundled Fleet routes (a fedcore client's message or reply with its objects)
BUNDLED_FLEET_PATHS = frozenset({BUNDLED_PULL, BUNDLED_PUSH})
#: ... and every bundled route: the Runtime ones (the ServerApp's) on the local listener
BUNDLED_PATHS = BUNDLED_FLEET_PATHS | {BUNDLED_RUNTIME_PULL, BUNDLED_RUNTIME_PUSH}
#: bundled route -> (the messages part's path, the object parts' path, Runtime API)
_BUNDLES = {
    BUNDLED_PULL: (_FLEET_PULL, "/v1/fleet/pull-object", False),
    BUNDLED_PUSH: ("/v1/fleet/push-messages", "/v1/fleet/push-object", False),
    BUNDLED_RUNTIME_PULL: (_RUNTIME_PULL, "/v1/runtime/pull-object", True),
    BUNDLED_RUNTIME_PUSH: ("/v1/runtime/push-messages", "/v1/runtime/push-object", True),
}

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
    stats : callable, optional
        ``stats(path, "request" | "ask", seconds)`` for each request served and each
        ask of the app (module docstring).

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
        stats: Callable[[str, str, float], None] | None = None,
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
        self.stats = stats
        self._last_active: dict[bytes, float] = {}  # public key header -> time.monotonic()
        #: what wakes held requests: path of a successful request -> the waiters it wakes
        self._wakes = {
            "/v1/runtime/push-messages": _Signal(),  # messages for nodes
            "/v1/fleet/push-messages": _Signal(),  # replies for the ServerApp
            "/v1/control/start-run": _Signal(),  # a ServerApp to start
            **dict.fromkeys(_PUSH_OBJECTS, _Signal()),  # (one signal for both)
        }
        #: object id -> (what wakes the pulls held for it, how many are held)
        self._object_waits: dict[str, tuple[_Signal, int]] = {}
        #: path -> (longest hold, what wakes it, "the answer is empty", seconds between asks)
        self._holds: dict[
            str, tuple[float, _Signal, Callable[[bytes], bool], Callable[[], float]]
        ] = {
            _FLEET_PULL: (
                HOLD_FLEET_PULL_S,
                self._wakes["/v1/runtime/push-messages"],
                no_messages,
                lambda: RECHECK_WOKEN_S,
            ),
            _RUNTIME_PULL: (
                HOLD_RUNTIME_PULL_S,
                self._wakes["/v1/fleet/push-messages"],
                no_app_messages,
                lambda: RECHECK_S,
            ),
            **dict.fromkeys(
                _PULL_OBJECTS,
                (
                    HOLD_OBJECT_S,
                    self._wakes[_PUSH_OBJECTS[0]],
                    object_not_uploaded,
                    lambda: RECHECK_S,
                ),
            ),
            "/v1/runtime/acquire-task": (
                HOLD_TASK_S,
                self._wakes["/v1/control/start-run"],
                no_task,
                lambda: RECHECK_WOKEN_S,
            ),
        }

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
            and (scope.get("path") in self.public_paths or scope.get("path") in BUNDLED_FLEET_PATHS)
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
            if self.stats is None:
                await self._limited(scope, receive, send)
                return
            t0 = time.perf_counter()
            await self._limited(scope, receive, send)
            self.stats(str(scope.get("path")), "request", time.perf_counter() - t0)
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
        path = scope.get("path", "")
        pushed: bytearray | None = bytearray() if path in _PUSH_OBJECTS else None

        async def capped_receive() -> MutableMapping[str, Any]:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if pushed is not None and received <= limit:
                    pushed.extend(message.get("body", b""))  # its object id wakes its pulls
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
                if 200 <= int(message.get("status", 0)) < 300:
                    if pushed is not None:
                        self._object_pushed(pushed_object_id(bytes(pushed)))
                    wake = self._wakes.get(path)
                    if wake is not None:
                        wake.fire()
            await send(message)

        if path in BUNDLED_PATHS and scope.get("method") == "POST":
            await self._bundled(scope, capped_receive, guarded_send)
            return
        hold = self._holds.get(scope.get("path", "")) if scope.get("method") == "POST" else None
        if hold is None:
            await self.app(scope, capped_receive, guarded_send)
            return
        await self._held(scope, capped_receive, guarded_send, hold)

    async def _held(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        hold: tuple[float, _Signal, Callable[[bytes], bool], Callable[[], float]],
    ) -> None:
        """Serve a pull, asking the app again while its answer is empty (module docstring)."""
        body = await _read_body(receive)
        if body is None:
            return  # the peer left (or the body was refused with 413)
        answer = await self._held_answer(scope, body, receive, hold)
        for message in answer or ():
            await send(message)

    async def _held_answer(
        self,
        scope: Scope,
        body: bytes,
        receive: Receive,
        hold: tuple[float, _Signal, Callable[[bytes], bool], Callable[[], float]],
    ) -> list[Any] | None:
        """The app's answer to the pull ``body``, held while empty; None if the peer left."""
        longest, wake, empty, recheck = hold
        oid = requested_object_id(body) if scope.get("path") in _PULL_OBJECTS else None
        if oid is None:
            return await self._hold(scope, body, receive, longest, wake, empty, recheck())
        with self._waiting_for(oid) as signal:  # woken only by that object's push
            return await self._hold(scope, body, receive, longest, signal, empty, recheck())

    @contextlib.contextmanager
    def _waiting_for(self, oid: str) -> Iterator[_Signal]:
        """The signal a push of object ``oid`` fires, while the caller waits for it."""
        signal, held = self._object_waits.get(oid, (_Signal(), 0))
        self._object_waits[oid] = (signal, held + 1)
        try:
            yield signal
        finally:
            signal, held = self._object_waits[oid]
            if held > 1:
                self._object_waits[oid] = (signal, held - 1)
            else:
                del self._object_waits[oid]

    async def _direct_pull(self, direct: FleetObjects, body: bytes) -> bytes | None:
        """Flower's ``pull-object`` handler's answer for ``body``; None if it refused.

        While the object is announced but not uploaded, the handler is asked again when
        the object's push wakes it (or every :data:`RECHECK_S`), for up to
        :data:`HOLD_OBJECT_S`.
        """
        content = direct.pull(body)
        oid = requested_object_id(body)
        if content is None or oid is None or not object_not_uploaded(content):
            return content
        never = asyncio.Event()
        deadline = time.monotonic() + HOLD_OBJECT_S
        with self._waiting_for(oid) as signal:
            while True:
                woken = signal.armed()
                content = direct.pull(body)
                left = deadline - time.monotonic()
                if content is None or not object_not_uploaded(content) or left <= 0:
                    return content
                await woken.wait_for(min(left, RECHECK_S), never)

    async def _bundled(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A bundled pull or push (:data:`BUNDLED_PATHS`): Flower's requests, in turn.

        The first part is asked of the whole app as the request Flower's own client
        would send (the caller's headers: the app authenticates it); an answer that is
        not a success is the bundle's answer.

        - pull: the held ``pull-messages``, then ``pull-object`` for every object of the
          message (held while one is not uploaded yet); the answer is the frames of
          those answers (objects it could not get are left out, and the node pulls
          them itself);
        - push: ``push-messages`` (the first frame), then ``push-object`` for each
          offered object the SuperLink asks for, with its session id and the
          authenticated node; the answer is the frames of those answers. The
          ServerApp's held pulls are woken once every object is stored, so a reply is
          never pulled before its objects.

        On the real SuperLink the object parts call Flower's handlers directly
        (:class:`~fedcore.flower_adapter.FleetObjects`): the first part authenticated
        the node, and they are that part's message's objects, or those its answer asked
        for in its session.
        """
        body = await _read_body(receive)
        if body is None:
            return
        messages_path, objects_path, runtime = _BUNDLES[scope["path"]]
        direct: FleetObjects | RuntimeObjects | None = None
        if scope["path"] in (BUNDLED_PULL, BUNDLED_RUNTIME_PULL):
            answer = await self._held_answer(
                _part(scope, messages_path, body), body, receive, self._holds[messages_path]
            )
            if answer is None:
                return
            if _status(answer) != 200:
                await _send_all(send, answer)
                return
            frames = [_content(answer)]
            hold = self._holds[objects_path]
            direct = self._direct(scope, runtime)
            for req in bundled_object_requests(body, frames[0], runtime=runtime):
                content = await self._direct_pull(direct, req) if direct is not None else None
                if content is None or not object_pulled(content):  # the app's own answer
                    got = await self._held_answer(
                        _part(scope, objects_path, req), req, receive, hold
                    )
                    if got is None:
                        return
                    if _status(got) != 200 or not object_pulled(_content(got)):
                        break  # the caller pulls the rest itself
                    content = _content(got)
                frames.append(content)
            await _respond_bytes(send, pack_frames(frames))
            return
        try:
            parts = unpack_frames(body, limit=BUNDLE_MAX_FRAMES)
            if not parts:
                raise ValueError("no push-messages request")
        except ValueError as exc:
            await _respond(send, 400, {"detail": f"malformed bundle: {exc}"})
            return
        never = asyncio.Event()
        answer = await self._ask(_part(scope, messages_path, parts[0]), parts[0], never)
        if _status(answer) != 200:
            await _send_all(send, answer)
            return
        frames = [_content(answer)]
        try:
            pushes = bundled_object_pushes(parts[0], frames[0], parts[1:], runtime=runtime)
        except ValueError as exc:
            await _respond(send, 400, {"detail": f"malformed bundle: {exc}"})
            return
        direct = self._direct(scope, runtime)
        try:
            for oid, req in pushes:
                content = direct.push(req) if direct is not None else None
                if content is None:  # (or refused: the app's own answer says why)
                    got = await self._ask(_part(scope, objects_path, req), req, never)
                    if _status(got) != 200:
                        await _send_all(send, got)
                        return
                    content = _content(got)
                frames.append(content)
                if object_stored(content):
                    self._object_pushed(oid)
        finally:
            # the messages (and what of their objects is stored): their pulls wake now,
            # so a message is never pulled before its objects
            self._wakes[messages_path].fire()
        await _respond_bytes(send, pack_frames(frames))

    def _direct(self, scope: Scope, runtime: bool) -> FleetObjects | RuntimeObjects | None:
        """Flower's object handlers for a bundle's object parts (None: ask the app)."""
        if runtime:
            return RuntimeObjects.of(self.app, scope.get("headers") or ())
        return FleetObjects.of(self.app)

    def _object_pushed(self, oid: str | None) -> None:
        """Wake the pulls held for ``oid`` (every held object pull if it is unknown)."""
        if oid is None:
            for signal, _ in self._object_waits.values():
                signal.fire()
        elif oid in self._object_waits:
            self._object_waits[oid][0].fire()

    async def _hold(
        self,
        scope: Scope,
        body: bytes,
        receive: Receive,
        longest: float,
        wake: _Signal,
        empty: Callable[[bytes], bool],
        recheck: float,
    ) -> list[Any] | None:
        """Ask the app until its answer is not empty or the hold ends; None if the peer left."""
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive()).get("type") != "http.disconnect":
                await asyncio.sleep(RECHECK_S)  # (a server sends nothing else after the body)
            gone.set()

        watcher = asyncio.ensure_future(watch())
        deadline = time.monotonic() + longest
        try:
            while True:
                woken = wake.armed()
                answer = await self._ask(scope, body, gone)
                left = deadline - time.monotonic()
                if left <= 0 or gone.is_set() or _status(answer) != 200:
                    break
                if not empty(_content(answer)):
                    break
                await woken.wait_for(min(left, recheck), gone)
            return None if gone.is_set() else answer
        finally:
            watcher.cancel()

    async def _ask(self, scope: Scope, body: bytes, gone: asyncio.Event) -> list[Any]:
        """The app's answer to the request ``body`` (its ASGI messages, not sent yet)."""
        answer: list[MutableMapping[str, Any]] = []
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if replayed:  # (the app waits for a disconnect)
                await gone.wait()
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def keep(message: MutableMapping[str, Any]) -> None:
            answer.append(message)

        t0 = time.perf_counter()
        await self.app(scope, replay, keep)
        if self.stats is not None:
            self.stats(str(scope.get("path")), "ask", time.perf_counter() - t0)
        return answer

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


class _Signal:
    """Wakes every held request that armed it before :meth:`fire` (asyncio, one loop)."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def armed(self) -> _Armed:
        """A waiter that :meth:`fire` from now on wakes."""
        if self._event is None:
            self._event = asyncio.Event()
        return _Armed(self._event)

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None


class _Armed:
    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    async def wait_for(self, timeout: float, gone: asyncio.Event) -> None:
        """Until fired, ``gone`` set, or ``timeout`` s."""
        waits = [asyncio.ensure_future(self._event.wait()), asyncio.ensure_future(gone.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


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


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the peer left (or the body was refused with 413)."""
    body = bytearray()
    while True:
        message = await receive()
        if message.get("type") != "http.request":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


def _part(scope: Scope, path: str, body: bytes) -> Scope:
    """``scope`` as Flower's request to ``path`` with ``body`` (a bundle's part)."""
    headers = [
        (n, v)
        for n, v in scope.get("headers") or ()
        if bytes(n).lower() not in (b"content-length", b"content-type")
    ]
    headers += [
        (b"content-type", b"application/protobuf"),
        (b"content-length", str(len(body)).encode()),
    ]
    return {**scope, "path": path, "raw_path": path.encode(), "headers": headers}


def _status(answer: list[Any] | None) -> int:
    return int(answer[0].get("status", 0)) if answer else 0


def _content(answer: list[Any]) -> bytes:
    return b"".join(m.get("body", b"") for m in answer[1:])


async def _send_all(send: Send, answer: list[Any]) -> None:
    for message in answer:
        await send(message)


async def _respond_bytes(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
