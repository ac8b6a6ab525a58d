"""``fedcore client``: a SuperNode that joins with its provisioned identity and runs the ClientApp.

::

    fedcore client --kit fed/clients/client-1 --server HOST:9092 --data local.npz

It speaks Flower's Fleet API with Flower's own client classes: HTTPS verified
against the kit's CA (``ca.pem``), every request signed with the kit's identity
key (Flower's node authentication, ``NodeAuthHttpInterceptor``), heartbeats, and
Flower's object transfer for messages. Where it differs from
``flower-supernode`` (both work against ``fedcore server``):

- **no process per message**: the ClientApp (``clients.app:app`` by default)
  runs in this process, so the model and data are loaded once, not once per
  message (``flower-supernode`` starts SuperExec, which starts a
  ``flwr-clientapp`` process for every message);
- **short polling**: it asks for work every ``--poll-min`` s right after a
  message and backs off to ``--poll-max`` s when idle (``flower-supernode``
  sleeps 3 s whenever the queue is empty, and SuperExec polls every second);
- **no code from the server**: the ClientApp comes from this machine's
  installed fedcore; the server's app bundle is read only for its run config.
  The server cannot make a client run anything else;
- **no local port**: no Runtime API is opened on the client host.

The node config the ClientApp sees holds ``data-path`` (``--data``) and
``identity-key`` (the kit's key file, for secure aggregation to sign with).
A refusal by the server (wrong CA, identity not admitted or revoked, plaintext
against TLS) ends the process with a message saying which.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.core.errors import DeploymentError
from fedcore.deploy.files import check_kit_dir
from fedcore.deploy.processes import install_signal_handlers
from fedcore.storage.keys import IDENTITY_KEY, load_identity_key

__all__ = [
    "ClientKit",
    "FleetSession",
    "Refused",
    "explain",
    "load_client_kit",
    "register",
    "run_node",
    "transient",
]

log = logging.getLogger("fedcore.client")

INSECURE_WARNING = (
    "\n"
    "  WARNING: --insecure: no TLS. The model and its updates cross the network in\n"
    "  plaintext and the server is not authenticated. Debugging on a trusted network only.\n"
)


@dataclass(frozen=True)
class ClientKit:
    """A client kit from ``fedcore provision``: CA certificate and identity key."""

    path: Path
    name: str
    ca_pem: bytes
    key_path: Path


def load_client_kit(path: str | Path) -> ClientKit:
    """Read and check a client kit (files present, identity key not readable by others)."""
    import json

    p = Path(path)
    check_kit_dir(p, ("ca.pem", "identity.key"), "identity.key", "a client kit (DIR/clients/NAME)")
    load_identity_key(p / "identity.key")  # fails early on a damaged key
    meta = p / "client.json"
    name = json.loads(meta.read_text()).get("name", p.name) if meta.is_file() else p.name
    return ClientKit(p, str(name), (p / "ca.pem").read_bytes(), p / "identity.key")


#: Seconds between heartbeats the server expects: Flower's minimum, so the server
#: counts a killed client as gone after 2 x 10 s instead of Flower's default 2 x 30 s
#: (its HeartbeatSender has a fixed 30 s schedule; :class:`_Heartbeat` sends every 5 s).
HEARTBEAT_INTERVAL = 10.0


class _Heartbeat:
    """Calls ``send`` every ``period`` seconds on a daemon thread until stopped."""

    def __init__(self, send: Callable[[], bool], period: float) -> None:
        self._send = send
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedcore-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._send()
            except Exception:  # noqa: BLE001 - a missed beat is retried next period
                log.debug("heartbeat failed", exc_info=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()


def still_online(exc: BaseException) -> bool:
    """Whether activation failed only because an earlier session is still counted online."""
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and "could not be activated" in exc.response.text


class Refused(DeploymentError):
    """The server refused this node; retrying will not help."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a network problem worth retrying (connection, 502/503/504)."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (502, 503, 504)
    return isinstance(exc, httpx.TransportError)


def explain(exc: BaseException, address: str) -> DeploymentError | None:
    """A :class:`Refused` when the server refuses this node (identity, TLS), else ``None``."""
    import httpx
    from flwr.supercore.error import ApiErrorCode, FlowerError

    text = str(exc).lower()
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        err = FlowerError.from_json(exc.response.text)
        code = getattr(err, "code", None)
        if code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:
            return Refused(
                f"{address} does not admit this node's identity (never admitted, or revoked). "
                "Ask the federation operator to admit it: `fedcore provision --add-client`."
            )
        if status == 401:
            return Refused(
                f"{address} rejected this node's identity (HTTP 401): it is not (or no longer) "
                "admitted, or the signature is invalid."
            )
        if status == 403 and "forbidden:" in exc.response.text:
            return Refused(f"{address} refused the request (HTTP 403): {exc.response.text[:200]}")
        return None
    if "certificate" in text:
        return Refused(
            f"TLS with {address} failed ({exc}). The server's certificate must be signed by this "
            "kit's CA (same federation) and name the address you connect to."
        )
    if "wrong version number" in text or "record layer failure" in text or "http_request" in text:
        return Refused(
            f"TLS with {address} failed ({exc}): the server does not speak TLS. A server started "
            "with --insecure can only be reached by a client started with --insecure."
        )
    return None


class FleetSession:
    """One node's authenticated session with the SuperLink's Fleet API.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` of the server's public listener.
    ca_pem : bytes or None
        CA certificate to verify the server with; ``None`` with ``insecure``.
    key_path : Path or None
        The identity key; ``None`` with ``insecure`` (the node then registers a
        throwaway key itself, which only an insecure server accepts).
    insecure : bool (default: False)
        Plain HTTP.

    """

    def __init__(
        self,
        address: str,
        *,
        ca_pem: bytes | None,
        key_path: Path | None,
        insecure: bool = False,
    ) -> None:
        from flwr.supercore.interceptors.http.runtime_version import (
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.primitives.asymmetric import generate_key_pairs
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        self.address = address
        self.insecure = insecure
        if key_path is not None:
            private = load_identity_key(key_path)
            self._self_register = False
        else:
            private, _ = generate_key_pairs()
            self._self_register = True
        self._private = private
        self.client = FleetHttpClient.from_server_address(
            address,
            insecure,
            None if insecure else ca_pem,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                NodeAuthHttpInterceptor(private, private.public_key()),
            ],
        )
        self.node: Any = None
        self._heartbeat: Any = None
        self.lost = threading.Event()  # set when the server stops recognising us

    # -- connection -----------------------------------------------------------
    def connect(self, *, wait: float) -> int:
        """Activate this node (retrying transient errors for ``wait`` s); its node id.

        An identity whose earlier session (a client process that was killed) the
        server still counts as online cannot be activated until that session's
        heartbeat expires (at most ``2 * HEARTBEAT_INTERVAL`` s): that is retried too.
        """
        from flwr.proto.fleet_pb2 import ActivateNodeRequest, RegisterNodeFleetRequest
        from flwr.proto.node_pb2 import Node
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        pk = public_key_to_bytes(self._private.public_key())
        deadline = time.monotonic() + wait
        delay = 0.25
        last: BaseException | None = None
        while True:
            try:
                if self._self_register:
                    self.client.RegisterNode(RegisterNodeFleetRequest(public_key=pk))
                    self._self_register = False
                res = self.client.ActivateNode(
                    ActivateNodeRequest(public_key=pk, heartbeat_interval=HEARTBEAT_INTERVAL)
                )
                break
            except Exception as exc:  # noqa: BLE001 - classified below
                if not still_online(exc):
                    refused = explain(exc, self.address)
                    if refused is not None:
                        raise refused from exc
                    if not transient(exc):
                        raise DeploymentError(f"joining {self.address} failed: {exc}") from exc
                last = exc
            if time.monotonic() + delay > deadline:
                raise DeploymentError(
                    f"could not reach the server at {self.address} within {wait:.0f} s "
                    f"(last error: {type(last).__name__}: {last}). Is it running, and are both "
                    "sides using TLS (or both --insecure)?"
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        self.node = Node(node_id=res.node_id)
        self._heartbeat = _Heartbeat(self._send_heartbeat, HEARTBEAT_INTERVAL / 2)
        self._heartbeat.start()
        return int(res.node_id)

    def reconnect(self, *, wait: float) -> int:
        """Activate again (after a server restart the node id may change); its node id.

        Raises :class:`Refused` if the server no longer admits this identity.
        """
        if self._heartbeat is not None and self._heartbeat.is_running:
            self._heartbeat.stop()
        self._heartbeat = None
        self.node = None
        self.lost.clear()
        return self.connect(wait=wait)

    def _send_heartbeat(self) -> bool:
        import httpx
        from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest

        try:
            res = self.client.SendNodeHeartbeat(
                SendNodeHeartbeatRequest(node=self.node, heartbeat_interval=HEARTBEAT_INTERVAL)
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 401:
                self.lost.set()
                return True  # nothing to retry: the main loop ends the session
            return False
        except httpx.HTTPError:
            return False
        return bool(res.success)

    def close(self) -> None:
        """Deactivate the node and close the connection (best effort)."""
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest

        if self._heartbeat is not None and self._heartbeat.is_running:
            self._heartbeat.stop()
        if self.node is not None:
            try:
                self.client.DeactivateNode(DeactivateNodeRequest(node_id=self.node.node_id))
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
        self.client.close()

    # -- messages -------------------------------------------------------------
    def pull(self) -> Any:
        """The next message for this node as ``(metadata-only Message, ObjectTree)``, or None."""
        from flwr.common.serde import message_from_proto
        from flwr.proto.fleet_pb2 import PullMessagesRequest

        res = self.client.PullMessages(PullMessagesRequest(node=self.node))
        if not res.messages_list:
            return None
        return message_from_proto(res.messages_list[0]), res.message_object_trees[0]

    def receive(self, tree: Any, run_id: int) -> Any:
        """Pull the message's objects, confirm receipt and return the full Message."""
        from flwr.app import Message
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(self.client.PullObject, self.node, run_id),
            make_confirm_message_received_fn_protobuf(
                self.client.ConfirmMessageReceived, self.node, run_id
            ),
            return_type=Message,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id
        return message

    def send(self, reply: Any, runtime: float) -> None:
        """Push a reply and its objects (Flower's two-step object transfer)."""
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.proto.fleet_pb2 import PushMessagesRequest
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
            no_object_id_recompute,
        )
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_push_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import push_objects

        reply.metadata.__dict__["_message_id"] = reply.object_id
        with no_object_id_recompute():
            tree = get_object_tree(reply)
            res = self.client.PushMessages(
                PushMessagesRequest(
                    node=self.node,
                    messages_list=[message_to_proto(remove_content_from_message(reply))],
                    message_object_trees=[tree],
                    clientapp_runtime_list=[runtime],
                )
            )
            push_objects(
                get_all_nested_objects(reply),
                make_push_object_fn_protobuf(
                    self.client.PushObject, self.node, reply.metadata.run_id, res.session_id
                ),
                object_ids_to_push=set(res.objects_to_push),
            )

    def run_config(self, run_id: int) -> tuple[Any, dict[str, Any]]:
        """The run and its config (the server's app bundle is read, never executed)."""
        from flwr.common.config import get_fused_config_from_fab
        from flwr.common.serde import fab_from_proto, run_from_proto
        from flwr.proto.fab_pb2 import GetFabRequest
        from flwr.proto.run_pb2 import GetRunRequest

        run = run_from_proto(self.client.GetRun(GetRunRequest(node=self.node, run_id=run_id)).run)
        fab = fab_from_proto(
            self.client.GetFab(
                GetFabRequest(node=self.node, hash_str=run.fab_hash, run_id=run_id)
            ).fab
        )
        return run, dict(get_fused_config_from_fab(fab.content, run))

    def run_finished(self, run_id: int) -> bool:
        """Whether run ``run_id`` is over (the server no longer serves it)."""
        import httpx
        from flwr.proto.run_pb2 import GetRunRequest
        from flwr.supercore.error import ApiErrorCode, FlowerError

        try:
            self.client.GetRun(GetRunRequest(node=self.node, run_id=run_id))
        except httpx.HTTPStatusError as exc:
            err = FlowerError.from_json(exc.response.text)
            return getattr(err, "code", None) == ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED
        return False


def load_app(path: str) -> Callable[..., Any]:
    """The ClientApp object at ``module:attribute``."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise DeploymentError(f"--app {path!r} must be 'module:attribute', e.g. clients.app:app")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def _handle(app: Callable[..., Any], message: Any, context: Any) -> Any:
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    try:
        return app(message, context)
    except Exception as exc:  # noqa: BLE001 - a failing client is data, not a crash
        log.exception("the ClientApp raised")
        reason = f"{type(exc).__name__}: {exc}"
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)


class _Worker:
    """Handles one message at a time: run config per run, the ClientApp, the reply."""

    def __init__(
        self,
        session: FleetSession,
        app: Callable[..., Any],
        node_config: Mapping[str, Any],
        out: Callable[[str], None],
    ) -> None:
        self.session = session
        self.app = app
        self.node_config = dict(node_config)
        self.out = out
        self.contexts: dict[int, Any] = {}

    def step(self, node_id: int) -> bool:
        """Pull one message and answer it; whether there was one."""
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        got = self.session.pull()
        if got is None:
            return False
        header, tree = got
        run_id = int(header.metadata.run_id)
        if run_id not in self.contexts:
            _, run_config = self.session.run_config(run_id)
            self.contexts[run_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=dict(self.node_config),
                state=RecordDict(),
                run_config=run_config,
            )
            self.out(f"joined run {run_id}")
        t_recv = time.perf_counter()
        message = self.session.receive(tree, run_id)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = node_id
        TaskIdentity.task_id = 1
        t0 = time.perf_counter()
        reply = _handle(self.app, message, self.contexts[run_id])
        t1 = time.perf_counter()
        self.session.send(reply, t1 - t0)
        log.debug(
            "%s: receive %.3f s, app %.3f s, send %.3f s",
            message.metadata.message_type,
            t0 - t_recv,
            t1 - t0,
            time.perf_counter() - t1,
        )
        return True

    def runs_finished(self) -> bool:
        """Whether every run this node joined is over."""
        return bool(self.contexts) and all(self.session.run_finished(r) for r in self.contexts)


def run_node(
    session: FleetSession,
    *,
    app: Callable[..., Any],
    node_config: Mapping[str, Any],
    connect_wait: float = 60.0,
    poll_min: float = 0.02,
    poll_max: float = 0.25,
    once: bool = False,
    stop: threading.Event | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Serve messages until stopped (or, with ``once``, until the first run ends); exit code.

    Network trouble is retried for ``connect_wait`` seconds (with ``once``, a
    server gone for 3 s after this node's run counts as the run's end); a
    refusal raises :class:`Refused`; a message that cannot be handled for any
    other reason is logged and skipped.
    """
    stop = stop or threading.Event()
    worker = _Worker(session, app, node_config, out)
    delay = poll_min
    failing_since: float | None = None
    last_check = 0.0
    try:
        node_id = session.connect(wait=connect_wait)
        out(f"connected to {session.address} as node {node_id}")

        rejoins: list[float] = []

        def rejoin(why: str) -> int:
            # A restarted server forgets this node; one that revoked it refuses to
            # activate it again (Refused propagates). Refused requests right after
            # re-joining mean something else is wrong: give up after 3 in a minute.
            now = time.monotonic()
            rejoins[:] = [t for t in rejoins if now - t < 60] + [now]
            if len(rejoins) > 3:
                raise Refused(f"{why}, even after re-joining 3 times in a minute")
            out(f"{why}; re-joining {session.address}")
            new_id = session.reconnect(wait=connect_wait)
            out(f"re-joined as node {new_id}")
            return new_id

        while not stop.is_set():
            if session.lost.is_set():
                node_id = rejoin("the server no longer recognises this node")
                continue
            try:
                busy = worker.step(node_id)
                if not busy and once and time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    if worker.runs_finished():
                        out(f"run {', '.join(map(str, worker.contexts))} finished; exiting")
                        return 0
                failing_since = None
            except Exception as exc:  # noqa: BLE001 - classified below
                refused = explain(exc, session.address)
                if refused is not None:
                    node_id = rejoin(f"the server refused a request ({refused})")
                    failing_since = None
                    continue
                if not transient(exc):
                    log.warning("a message could not be handled: %s: %s", type(exc).__name__, exc)
                    stop.wait(poll_max)
                    continue
                failing_since = failing_since or time.monotonic()
                gone_for = time.monotonic() - failing_since
                if once and worker.contexts and gone_for > 3:
                    out("the server is gone after this node's run; exiting")
                    return 0
                if gone_for > connect_wait:
                    raise DeploymentError(
                        f"lost the server at {session.address} for {gone_for:.0f} s ({exc})"
                    ) from exc
                stop.wait(min(2.0, max(delay, 0.25)))
                continue
            if busy:
                delay = poll_min
            else:
                stop.wait(delay)
                delay = min(delay * 2, poll_max)
    finally:
        session.close()
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """``fedcore client``."""
    install_signal_handlers()
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
        log.setLevel(logging.DEBUG)
    data = Path(args.data).resolve()
    if not data.is_file():
        raise DeploymentError(f"--data {data} is not a file (a .npz with arrays x, y, or a .csv)")
    node_config: dict[str, Any] = {"data-path": str(data)}
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        session = FleetSession(args.server, ca_pem=None, key_path=None, insecure=True)
        name = "insecure"
    else:
        if not args.kit:
            raise DeploymentError("--kit is required (a client kit from `fedcore provision`)")
        kit = load_client_kit(args.kit)
        node_config[IDENTITY_KEY] = str(kit.key_path.resolve())
        session = FleetSession(args.server, ca_pem=kit.ca_pem, key_path=kit.key_path)
        name = kit.name
    app = load_app(args.app)
    try:
        return run_node(
            session,
            app=app,
            node_config=node_config,
            connect_wait=args.connect_timeout,
            poll_min=args.poll_min,
            poll_max=args.poll_max,
            once=args.once,
            out=lambda line: print(f"fedcore client {name}: {line}", flush=True),
        )
    except Refused as exc:
        print(f"fedcore client {name}: refused: {exc}", file=sys.stderr, flush=True)
        return 3


def register(subparsers: Any) -> None:
    """Add the ``client`` sub-command."""
    p = subparsers.add_parser(
        "client",
        help="join a federation with a client kit; train on a local data file",
        description="Connect to `fedcore server` over TLS with this kit's identity and run the "
        "fedcore ClientApp on --data (only that file is read).",
    )
    p.add_argument("--kit", help="client kit directory from `fedcore provision` (DIR/clients/NAME)")
    p.add_argument("--server", required=True, help="HOST:PORT of the server (its --address)")
    p.add_argument(
        "--data", required=True, help="this client's data file (.npz with x, y; or .csv)"
    )
    p.add_argument(
        "--once", action="store_true", help="exit when the first run this node joined ends"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="give up after this many seconds without reaching the server (default 300)",
    )
    p.add_argument("--poll-min", type=float, default=0.02, help="seconds between polls while busy")
    p.add_argument("--poll-max", type=float, default=0.25, help="seconds between polls when idle")
    p.add_argument("--app", default="clients.app:app", help="ClientApp import path")
    p.add_argument("--verbose", action="store_true", help="log each message's timings")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="NO TLS, NO node authentication (only against `fedcore server --insecure`)",
    )
    p.set_defaults(func=cmd_client)
