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
- **no local port**: no Runtime API is opened on the client host;
- **one torch thread** by default (``--torch-threads``): torch's default (one
  thread per core) makes each step of a small model spin-wait for the other
  threads, and on a host where anything else runs a round of the default CNN
  then takes 10-20 s instead of 0.5 s (``docs/benchmarks.md``, issue 11).

The node config the ClientApp sees holds ``data-path`` (``--data``),
``identity-key`` (the kit's key file, for secure aggregation to sign with),
``client-config`` (``--config``: the client's own fedcore TOML; its model, loops,
data settings, ``[train]`` bounds and ``[secagg]`` minimums; without it the
library defaults, never the server's run config), ``allow-plain`` (``--allow-plain``:
answer plain, unmasked rounds), ``state-dir`` (``--state``, default
``<kit>/state``: the client's persistent state), ``federation-ca`` and
``admitted-list`` (the kit's ``ca.pem`` and CA-signed ``admitted.json``: whose
secure-aggregation keys to accept) and, with ``--trust-on-first-use``,
``trust-on-first-use`` (a kit without an admitted list pins peers on first use).
The config and the data file are checked against each other (data loaded, model
built) before the node connects, and each model the server sends against the model
built for the data (:func:`fedcore.clientside.preflight.check_message`): a model that
does not fit is answered with the reason and ends the process (exit code 2).
A refusal by the server (wrong CA, identity not admitted or revoked, plaintext
against TLS) ends the process with a message saying which.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore import flower_adapter as flower
from fedcore.clientside.policy import ALLOW_PLAIN, CLIENT_CONFIG, client_config_file
from fedcore.clientside.state import STATE_DIR
from fedcore.core.errors import ConfigError, DataError, DeploymentError, UserCodeError
from fedcore.core.packing import PackingError, pack_content, unpack_content
from fedcore.core.registry import import_object
from fedcore.deploy.files import check_kit_dir
from fedcore.engines.processes import install_signal_handlers
from fedcore.storage.keys import (
    ADMITTED_LIST,
    FEDERATION_CA,
    IDENTITY_KEY,
    TRUST_ON_FIRST_USE,
    load_identity_key,
)

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
DEFAULT_APP = "clients.app:app"
#: Node-config flag: check each received model against this client's data first.
PREFLIGHT = "preflight"
TOFU_WARNING = (
    "WARNING: --trust-on-first-use: without the kit's admitted list, peers' keys are pinned "
    "when first seen; an active server can introduce keys of its own"
)
NO_LIST_WARNING = (
    "WARNING: {kit} has no admitted.json (provisioned by an older fedcore): this client "
    "refuses secure rounds until the server relays a list its CA signed. Re-provision, or "
    "pass --trust-on-first-use"
)
ALLOW_PLAIN_WARNING = (
    "WARNING: --allow-plain: this client answers plain (not securely aggregated) rounds, "
    "which reveal its model update to the server"
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
#: At most this long, a leaving node waits for its receipts still being confirmed.
CONFIRM_DRAIN_S = 2.0


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


def last_active(exc: BaseException) -> float | None:
    """Seconds since this identity's last successful request, from a refused activation.

    ``fedcore server``'s guard adds it (:data:`fedcore.deploy.guard.LAST_ACTIVE_HEADER`)
    when the identity has had a session; ``None`` otherwise (never seen, or not a
    fedcore server).
    """
    import httpx

    from fedcore.deploy.guard import LAST_ACTIVE_HEADER

    if not isinstance(exc, httpx.HTTPStatusError):
        return None
    try:
        return float(exc.response.headers[LAST_ACTIVE_HEADER])
    except (KeyError, ValueError):
        return None


def already_connected(address: str, age: float) -> Refused:
    """The refusal for a kit whose identity another process is using right now."""
    return Refused(
        f"{address}: this kit's identity is already connected from another process (its last "
        f"request was {age:.1f} s ago). A kit joins once at a time: stop the other "
        "`fedcore client` started with this kit, or give this process its own kit "
        "(`fedcore provision --add-client NAME`)."
    )


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a network problem worth retrying (connection, 502/503/504)."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (502, 503, 504)
    return isinstance(exc, httpx.TransportError)


def explain(exc: BaseException, address: str) -> DeploymentError | None:
    """A :class:`Refused` when the server refuses this node (identity, TLS), else ``None``."""
    import httpx

    text = str(exc).lower()
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        if flower.activation_refused(exc.response.text):
            return Refused(
                f"{address} does not admit this node's identity (never admitted, or revoked; "
                "or, against a server other than `fedcore server`, already connected from "
                "another process). Ask the federation operator to admit it: "
                "`fedcore provision --add-client`."
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
        self.address = address
        self.insecure = insecure
        if key_path is not None:
            private = load_identity_key(key_path)
            self._self_register = False
        else:
            private = flower.new_node_key()
            self._self_register = True
        self._private = private
        self.client = flower.fleet_client(
            address, insecure=insecure, ca_pem=ca_pem, private_key=private
        )
        self.node_id: int | None = None
        self._heartbeat: Any = None
        #: receipts confirmed while the message is handled (flower_adapter.Behind)
        self._confirms = flower.Behind("fedcore-confirm-received")
        self.lost = threading.Event()  # set when the server stops recognising us

    # -- connection -----------------------------------------------------------
    def connect(self, *, wait: float) -> int:
        """Activate this node (retrying transient errors for ``wait`` s); its node id.

        An identity whose earlier session (a client process that was killed) the
        server still counts as online cannot be activated until that session's
        heartbeat expires (at most ``2 * HEARTBEAT_INTERVAL`` s): that is retried too.
        An identity that another live process is using (the server saw it succeed
        after this one was first refused) raises :class:`Refused` "already connected".
        """
        deadline = time.monotonic() + wait
        delay = 0.25
        last: BaseException | None = None
        first_refusal: tuple[float, float] | None = None  # (our clock, its age then)
        while True:
            try:
                if self._self_register:
                    flower.register_self(self.client, self._private)
                    self._self_register = False
                node_id = flower.activate_node(
                    self.client, self._private, heartbeat_interval=HEARTBEAT_INTERVAL
                )
                break
            except Exception as exc:  # noqa: BLE001 - classified below
                age = last_active(exc)
                if age is not None:
                    # The identity had a session. A killed one only ages; a live one (another
                    # process with this kit) keeps succeeding, so its age falls behind ours.
                    now = time.monotonic()
                    if first_refusal is None:
                        first_refusal = (now, age)
                    elif age < first_refusal[1] + (now - first_refusal[0]) - 1.0:
                        raise already_connected(self.address, age) from exc
                    if now + delay > deadline:
                        raise already_connected(self.address, age) from exc
                elif not still_online(exc):
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
        self.node_id = node_id
        self._heartbeat = _Heartbeat(self._send_heartbeat, HEARTBEAT_INTERVAL / 2)
        self._heartbeat.start()
        return node_id

    def reconnect(self, *, wait: float) -> int:
        """Activate again (after a server restart the node id may change); its node id.

        Raises :class:`Refused` if the server no longer admits this identity.
        """
        if self._heartbeat is not None and self._heartbeat.is_running:
            self._heartbeat.stop()
        self._heartbeat = None
        self.node_id = None
        self.lost.clear()
        return self.connect(wait=wait)

    def _node(self) -> int:
        if self.node_id is None:
            raise DeploymentError("not connected: call connect() first")
        return self.node_id

    def _send_heartbeat(self) -> bool:
        import httpx

        try:
            return flower.send_heartbeat(self.client, self._node(), interval=HEARTBEAT_INTERVAL)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 401:
                self.lost.set()
                return True  # nothing to retry: the main loop ends the session
            return False
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Deactivate the node and close the connection (best effort)."""
        if self._heartbeat is not None and self._heartbeat.is_running:
            self._heartbeat.stop()
        self._confirms.drain(CONFIRM_DRAIN_S)
        if self.node_id is not None:
            try:
                flower.deactivate_node(self.client, self.node_id)
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
        self.client.close()

    # -- messages -------------------------------------------------------------
    def pull(self) -> Any:
        """The next message for this node as ``(metadata-only Message, ObjectTree)``, or None."""
        return flower.pull_message(self.client, self._node())

    def receive(self, tree: Any, run_id: int) -> Any:
        """Pull the message's objects, confirm receipt and return the full Message."""
        return flower.receive_message(
            self.client, self._node(), run_id, tree, behind=self._confirms
        )

    def send(self, reply: Any, runtime: float) -> None:
        """Push a reply and its objects (Flower's two-step object transfer)."""
        flower.push_reply(self.client, self._node(), reply, runtime=runtime)

    def run_config(self, run_id: int) -> tuple[Any, dict[str, Any]]:
        """The run and its config (the server's app bundle is read, never executed)."""
        return flower.fetch_run_config(self.client, self._node(), run_id)

    def run_finished(self, run_id: int) -> bool:
        """Whether run ``run_id`` is over (the server no longer serves it)."""
        import httpx

        try:
            flower.get_run(self.client, self._node(), run_id)
        except httpx.HTTPStatusError as exc:
            return flower.run_not_served(exc.response.text)
        return False


def load_app(path: str) -> Callable[..., Any]:
    """The ClientApp object at ``module:attribute``."""
    try:
        return import_object(path, key="--app")  # type: ignore[no-any-return]
    except ConfigError as exc:
        raise DeploymentError(f"--app {path!r}: {exc.allowed} (e.g. clients.app:app)") from exc


def _handle(app: Callable[..., Any], message: Any, context: Any) -> Any:
    try:
        return app(message, context)
    except UserCodeError as exc:  # the user's loop: its own message and frames, not retried
        log.error("%s", exc)
        return flower.error_reply(message, str(exc), user_code=True)
    except Exception as exc:  # noqa: BLE001 - a failing client is data, not a crash
        log.exception("the ClientApp raised")
        return flower.error_reply(message, f"{type(exc).__name__}: {exc}")


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
        #: fedcore's own ClientApp: its data is checked against each model received
        self.checked = bool(node_config.get(PREFLIGHT, False))
        #: when the last reply was pushed (``--verbose`` logs the wait for the next message)
        self.replied_at: float | None = None

    def step(self, node_id: int) -> bool:
        """Pull one message and answer it; whether there was one."""
        from flwr.app import Context, RecordDict

        got = self.session.pull()
        if got is None:
            return False
        t_pulled = time.perf_counter()
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
        flower.set_task_identity(run_id=run_id, node_id=node_id, task_id=1)
        # fedcore's server packs a message's arrays into one object (fedcore.core.packing);
        # the ClientApp gets them unpacked, whatever app it is, and the reply goes back packed
        packed = False
        if message.has_content():
            try:
                content, packed = unpack_content(message.content)
            except PackingError as exc:
                log.error("the server's message cannot be read: %s", exc)
                self.session.send(flower.error_reply(message, f"malformed message: {exc}"), 0.0)
                self.replied_at = time.perf_counter()
                return True
            if packed:
                message.content = content
        if self.checked:
            from fedcore.clientside.preflight import ModelMismatch, check_message

            try:  # the server's model against this client's data, before the ClientApp
                check_message(message, self.contexts[run_id])
            except ModelMismatch as exc:  # the reason goes back; this client stops (exit 2)
                self.session.send(flower.error_reply(message, str(exc)), 0.0)
                time.sleep(2.0)  # let the server pull it: a node that left is "unavailable"
                raise
        t0 = time.perf_counter()
        reply = _handle(self.app, message, self.contexts[run_id])
        if packed and reply.has_content():
            reply.content = pack_content(reply.content)
        t1 = time.perf_counter()
        self.session.send(reply, t1 - t0)
        t2 = time.perf_counter()
        log.debug(
            "%s: waited %.3f s, receive %.3f s, app %.3f s, send %.3f s",
            message.metadata.message_type,
            -1.0 if self.replied_at is None else t_pulled - self.replied_at,
            t0 - t_recv,
            t1 - t0,
            t2 - t1,
        )
        self.replied_at = t2
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
                if isinstance(exc, DataError):  # this client's data does not fit the model
                    raise
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
    if args.torch_threads < 1:
        raise DeploymentError(
            f"--torch-threads must be >= 1, got {args.torch_threads} (1 suits small models)"
        )
    install_signal_handlers()
    import torch

    torch.set_num_threads(args.torch_threads)
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
        log.setLevel(logging.DEBUG)
    data = Path(args.data).resolve()
    if not data.is_file():
        raise DeploymentError(f"--data {data} is not a file (a .npz with arrays x, y, or a .csv)")
    node_config: dict[str, Any] = {"data-path": str(data)}
    if args.config:
        node_config[CLIENT_CONFIG] = str(_client_config(args.config))
    if args.allow_plain:
        node_config[ALLOW_PLAIN] = True
        print(ALLOW_PLAIN_WARNING, file=sys.stderr, flush=True)
    kit = None
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    else:
        if not args.kit:
            raise DeploymentError("--kit is required (a client kit from `fedcore provision`)")
        kit = load_client_kit(args.kit)
        node_config[IDENTITY_KEY] = str(kit.key_path.resolve())
        node_config[FEDERATION_CA] = str((kit.path / "ca.pem").resolve())
        if (kit.path / "admitted.json").is_file():
            node_config[ADMITTED_LIST] = str((kit.path / "admitted.json").resolve())
        if args.trust_on_first_use:
            node_config[TRUST_ON_FIRST_USE] = True
            print(TOFU_WARNING, file=sys.stderr, flush=True)
        elif ADMITTED_LIST not in node_config:
            print(NO_LIST_WARNING.format(kit=kit.path), file=sys.stderr, flush=True)
    state_dir = Path(args.state) if args.state else (kit.path / "state" if kit else None)
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        node_config[STATE_DIR] = str(state_dir.resolve())
    if args.app == DEFAULT_APP:  # (another ClientApp reads its data its own way)
        check_local_setup(node_config)
        node_config[PREFLIGHT] = True
    if kit is None:
        session = FleetSession(args.server, ca_pem=None, key_path=None, insecure=True)
        name = "insecure"
    else:
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


def _client_config(path: str) -> Path:
    """``--config``'s file, absolute, validated (ConfigError otherwise: exit 2)."""
    from fedcore.runtime.configfile import importable

    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ConfigError("--config", path, "is not a file: pass this client's fedcore TOML")
    importable(p)  # a model factory or loop beside the config file is found
    client_config_file(p)
    return p


def check_local_setup(node_config: Mapping[str, Any]) -> None:
    """Load the client's data with its own config and build its model, or raise why not."""
    from flwr.app import Context, RecordDict

    from fedcore.clientside.handlers import prepare

    prepare(
        Context(
            run_id=0, node_id=0, node_config=dict(node_config), state=RecordDict(), run_config={}
        )
    )


#: ``fedcore client --help``'s examples.
EPILOG = """\
examples:
  fedcore client --kit client-1 --server fl.example.org:9092 --data site1.npz
  fedcore client --kit client-1 --server fl.example.org:9092 --data site1.csv --config client.toml
  fedcore client --kit client-1 --server 127.0.0.1:9092 --data site1.npz --once
"""


def register(subparsers: Any) -> None:
    """Add the ``client`` sub-command."""
    p = subparsers.add_parser(
        "client",
        help="join a federation with a client kit; train on a local data file",
        description="Connect to `fedcore server` over TLS with this kit's identity and run the "
        "fedcore ClientApp on --data (only that file is read).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument(
        "--config",
        metavar="FILE",
        help="this client's own fedcore TOML (model, loops, data settings, [train] bounds, "
        "[secagg] minimums); default: the built-in defaults, never the server's config",
    )
    p.add_argument(
        "--allow-plain",
        action="store_true",
        help="answer plain (not securely aggregated) rounds: they reveal this client's update "
        "to the server (default: only if the client's config sets secagg.enabled = false)",
    )
    p.add_argument(
        "--state",
        metavar="DIR",
        help="this client's persistent state directory (default: <kit>/state, mode 0700)",
    )
    p.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="a kit without admitted.json: accept secure-aggregation peers' keys on first "
        "sight (otherwise such a client refuses secure rounds until a signed list arrives)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads for training (default 1: fastest for small models, and no "
        "spin-waiting against other processes; raise it for a large model on an idle host)",
    )
    p.add_argument("--app", default=DEFAULT_APP, help="ClientApp import path")
    p.add_argument("--verbose", action="store_true", help="log each message's timings")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="NO TLS, NO node authentication (only against `fedcore server --insecure`)",
    )
    p.set_defaults(func=cmd_client)
