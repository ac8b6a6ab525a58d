"""The embedded simulation engine: an in-process ``flwr.serverapp.Grid``.

The unchanged ServerApp runs in this process against :class:`EmbeddedGrid`; the
unchanged ClientApp runs on ``workers`` executors (one per core by default).
Executor 0 is a thread of this process, the others are worker processes, so
two cores cost one extra process, not two: each process that imports torch
costs 250-450 MB, and starting one costs seconds of CPU. Virtual client ``i``
always lives on executor ``i % workers``, which keeps its own ``Context`` (node
config ``partition-id``/``num-partitions``, persistent ``state``) and loads only
its clients' partitions. No Ray, no SuperLink, no sockets.

Each client's own config: a client takes its model, loops and data settings from
its *local* config (:func:`fedcore.clientside.policy.local_config`), never from the
server's run config. In a simulation one user owns both sides and one TOML file
describes both, so the engine hands that file to every virtual client as its local
config: ``client_config`` (``fedcore simulate`` passes the resolved config it wrote
to ``<run-dir>/config.toml``, CLI overrides included) becomes node config
``client-config``. Without one (a config built in code, Flower's Ray engine) a
client falls back to the run config, which in simulation is the same user's.

Clients on executor 0 share the server's process: an exception is an error
reply as everywhere, but a client that ends its process (``os._exit``, a
segfault) ends the run; a crashed worker process is reported and replaced.
While the grid is open, torch runs on one intra-op thread in this process,
as in every worker (the clients then compute the same numbers on any executor).

Worker processes die with the server's process, even when it is SIGKILLed (Linux
``PR_SET_PDEATHSIG``; elsewhere their pipe reaches EOF), and ignore Ctrl-C: the
server stops them, killing those still busy 1 s after an interrupt (5 s otherwise).
A client whose train/evaluate function fails replies with
:data:`~fedcore.flower_adapter.USER_CODE_ERROR` and the user's traceback.

Messages cross the process boundary as Flower's own protobuf bytes
(:func:`fedcore.flower_adapter.message_to_bytes`), never pickled; executor 0, in
this process, is handed the message objects themselves. Replies come
back to the ServerApp in the order the messages were pushed (streamed: each one
is yielded as soon as every earlier one has arrived), which keeps aggregation
order, and therefore the model, deterministic.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict

from fedcore.clientside.policy import CLIENT_CONFIG
from fedcore.core.errors import UserCodeError
from fedcore.core.registry import import_object
from fedcore.engines.processes import FreedMemory, die_with_parent, one_malloc_arena
from fedcore.flower_adapter import (
    SUPERLINK_NODE_ID,
    GridBase,
    MessageEncoder,
    empty_run,
    error_reply,
    message_from_bytes,
    message_to_bytes,
    set_message_id,
    set_task_identity,
)

__all__ = ["EmbeddedGrid", "node_id_for", "run_embedded"]

log = logging.getLogger("fedcore")

_NODE_ID_BASE = 1_000


def node_id_for(partition_id: int) -> int:
    """Node id of virtual client ``partition_id`` (stable across runs)."""
    return _NODE_ID_BASE + partition_id


def _worker_main(
    conn: Connection,
    app_path: str,
    run_config: dict[str, Any],
    partitions: list[int],
    num_partitions: int,
    run_id: int,
    torch_threads: int,
    state_root: str = "",
    client_config: str = "",
    parent_pid: int = 0,
    in_process: bool = False,
    hand: _Hand | None = None,
) -> None:
    """Worker loop: receive a message, run the ClientApp for its node, send the reply.

    ``in_process``: the loop runs in a thread of the server's process, whose
    process-wide settings (torch threads, ``TaskIdentity``) the grid owns.
    ``state_root``: each client's persistent state goes to ``<state_root>/<partition-id>``
    (node config ``state-dir``); empty: it stays in the node's ``Context.state``.
    ``client_config``: the TOML file every client reads as its own config (node
    config ``client-config``); empty: the clients use the run config.
    ``parent_pid``: the server's process; a worker process dies with it (even when it
    is SIGKILLed) and ignores Ctrl-C (the server stops it).
    ``hand``: executor 0's messages and replies, passed as objects (its pipe then
    carries only a one-byte notice per reply).
    """
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if parent_pid:
            die_with_parent(parent_pid)
        for end in _PARENT_ENDS:  # (copies a fork inherited: the server's ends only)
            end.close()  # so that this pipe reaches EOF when the server is gone
        _PARENT_ENDS.clear()
        try:
            import torch

            torch.set_num_threads(torch_threads)
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        set_task_identity(run_id=run_id, task_id=1)
    app = import_object(app_path, key="client_app")
    contexts = {
        node_id_for(p): Context(
            run_id=run_id,
            node_id=node_id_for(p),
            node_config={
                "partition-id": p,
                "num-partitions": num_partitions,
                **({"state-dir": str(Path(state_root) / str(p))} if state_root else {}),
                **({CLIENT_CONFIG: client_config} if client_config else {}),
            },
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for p in partitions
    }
    freed = FreedMemory()
    conn.send_bytes(b"ready")
    while True:
        if hand is not None:
            if (msg := hand.inbox.get()) is None:
                return
        else:
            try:
                data = conn.recv_bytes()
            except EOFError:
                return
            if not data:
                return
            msg = message_from_bytes(data)
        context = contexts[msg.metadata.dst_node_id]
        if not in_process:  # (replies take their identity from the message they answer)
            set_task_identity(node_id=context.node_id)
        started = time.perf_counter()
        try:
            reply = app(msg, context)
        except UserCodeError as exc:  # the user's loop: its own message and frames
            reply = error_reply(msg, str(exc), user_code=True)
        except Exception as exc:  # noqa: BLE001 - a failing client is data, not a crash
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
            reply = error_reply(msg, reason)
        try:
            if hand is not None:
                hand.replies.append(reply)
                conn.send_bytes(_REPLIED)
            else:
                conn.send_bytes(message_to_bytes(reply))
        except OSError:  # the grid was closed while this client ran
            return
        freed.after(time.perf_counter() - started)  # (what the client freed leaves the peak)


#: Executor 0's notice on its pipe: its next reply is in ``_Hand.replies``.
_REPLIED = b"m"


class _Hand:
    """Executor 0's queues: it shares the server's process, so messages need no bytes.

    Measured on the 1,000-client round (py-spy): encoding and decoding executor 0's
    messages and replies took ~15% of the server process's time, which is the
    bottleneck (the server loop and executor 0 share one interpreter lock). A
    client reads the message it is handed and builds a new reply, as everywhere.
    """

    def __init__(self) -> None:
        self.inbox: queue.Queue[Message | None] = queue.Queue()
        self.replies: collections.deque[Message] = collections.deque()


#: The server's ends of the worker pipes. A forked worker closes its copies, or a
#: server that dies would leave every pipe open (held by the workers themselves).
_PARENT_ENDS: list[Connection] = []


def _thread_main(conn: Connection, hand: _Hand, *args: Any) -> None:
    """Executor 0's loop; its pipe closes when it ends, so the grid sees it end."""
    try:
        _worker_main(conn, *args, in_process=True, hand=hand)
    finally:
        conn.close()


@contextlib.contextmanager
def _sigint_ignored(active: bool) -> Iterator[None]:
    """SIGINT ignored meanwhile (in the main thread): a worker starts with it ignored.

    A forked child inherits the disposition, and a spawned interpreter that starts
    with SIGINT ignored installs no ``KeyboardInterrupt`` handler, so a Ctrl-C
    delivered to the whole process group (a terminal) while it imports prints nothing.
    """
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class _Thread:
    """The process-like handle of executor 0, a thread of the server's process."""

    def __init__(self, target: Any, args: tuple[Any, ...], name: str) -> None:
        self._thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self.exitcode: int | str | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.exitcode = "thread ended"

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        """Do nothing: a thread cannot be killed; closing its pipe ends its loop."""


class _Worker:
    """One executor: a worker process, or a thread for ``in_process``.

    A sender thread makes sure pushes to a process never block on a full pipe;
    executor 0 takes messages from its :class:`_Hand`.
    """

    def __init__(self, ctx: Any, index: int, args: tuple[Any, ...], in_process: bool) -> None:
        self.index = index
        self.conn, child = ctx.Pipe(duplex=True)
        self.process: Any
        self.hand = _Hand() if in_process else None
        if in_process:
            self.process = _Thread(
                _thread_main, (child, self.hand, *args), name=f"fedcore-executor-{index}"
            )
        else:
            _PARENT_ENDS.append(self.conn)
            self.process = ctx.Process(
                target=_worker_main,
                args=(child, *args),
                name=f"fedcore-worker-{index}",
                daemon=True,
            )
        with _sigint_ignored(not in_process):  # (a spawned child starts up ignoring it)
            self.process.start()
        if not in_process:  # (the thread closes its end itself)
            child.close()
        self.outbox: queue.Queue[bytes | None] = queue.Queue()
        if not in_process:
            threading.Thread(target=self._send_loop, daemon=True).start()
        self.pending: list[str] = []  # message ids sent, in order, not yet answered
        self.ready = False

    def _send_loop(self) -> None:
        while (item := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(item)
            except (OSError, ValueError):
                return

    def send(self, msg: Message, encode: Callable[[Message], bytes] = message_to_bytes) -> None:
        """Hand ``msg`` to this executor (as bytes to a process, as it is to executor 0)."""
        if self.hand is not None:
            self.hand.inbox.put(msg)
        else:
            self.outbox.put(encode(msg))

    def receive(self, data: bytes) -> Message:
        """The reply that ``data``, read from this executor's pipe, brings or announces."""
        if self.hand is not None and data == _REPLIED:
            return self.hand.replies.popleft()
        return message_from_bytes(data)

    def ask_stop(self) -> None:
        """Ask the executor to end after the messages it already has."""
        if self.hand is not None:
            self.hand.inbox.put(None)
        else:
            self.outbox.put(b"")

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the executor to end; kill a worker process still alive after ``timeout`` s."""
        self.ask_stop()
        self.outbox.put(None)
        self.process.join(timeout=timeout)
        if self.process.is_alive() and not isinstance(self.process, _Thread):
            self.process.kill()  # (a thread cannot be: closing its pipe ends its loop)
            self.process.join(timeout=5)
        if self.conn in _PARENT_ENDS:
            _PARENT_ENDS.remove(self.conn)
        self.conn.close()


class EmbeddedGrid(GridBase):
    """A Grid whose nodes are virtual clients in local worker processes.

    Its ``send_and_receive`` streams replies as they arrive
    (:attr:`streams_replies`), so the ServerApp does not wrap it in a
    :class:`~fedcore.engines.polling.PollingGrid`.

    Parameters
    ----------
    client_app : str
        Import path of the ClientApp, e.g. ``"clients.app:app"``.
    run_config : Mapping[str, Any]
        Flower run config (flat) every client's ``Context`` receives.
    num_clients : int
        Number of virtual clients (partitions).
    workers : int (default: 0)
        Executors: a thread of this process, then worker processes; 0 means one
        per CPU core (at most ``num_clients``).
    run_id : int (default: 1)
        Run id written into messages and contexts.
    client_state_dir : path, optional
        Where clients keep persistent state (SCAFFOLD's control variates...), one
        folder per partition; default: in memory, in each node's ``Context.state``.
    client_config : path, optional
        A fedcore TOML file every client reads as its own config (node config
        ``client-config``); default: the clients use the run config.

    """

    def __init__(
        self,
        *,
        client_app: str,
        run_config: Mapping[str, Any],
        num_clients: int,
        workers: int = 0,
        run_id: int = 1,
        client_state_dir: str | Path | None = None,
        client_config: str | Path | None = None,
    ) -> None:
        self._run = empty_run(run_id)
        own_config = str(Path(client_config).resolve()) if client_config is not None else ""
        n_workers = workers or (os.cpu_count() or 1)
        n_workers = max(1, min(n_workers, num_clients))
        self._ctx = mp.get_context("spawn")
        self._num_clients = num_clients
        self._args_for = lambda i: (
            client_app,
            dict(run_config),
            list(range(i, num_clients, n_workers)),
            num_clients,
            run_id,
            1,
            str(client_state_dir or ""),
            own_config,
            os.getpid(),
        )
        # One torch thread in this process too while clients run in it (restored on close).
        import torch

        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # Worker processes start by forking this process when that is safe (Linux,
        # no other thread yet): they inherit the imported modules instead of
        # importing torch, Flower and the app again (seconds of CPU each), and
        # share those pages with it. Otherwise, and for restarts, they are spawned.
        fork = sys.platform == "linux" and threading.active_count() == 1
        if fork:
            # The ClientApp's modules (handlers, secure aggregation, ...) imported here,
            # before the fork, are shared with the workers: imported by each worker after
            # it they took ~0.13 s of its start and private pages (10 clients x 3 rounds,
            # py-spy). A failing import is left to the executors, which report it as before.
            with contextlib.suppress(Exception):
                import_object(client_app, key="client_app")
            fork = threading.active_count() == 1  # (unless that import started a thread)
        start_ctx = mp.get_context("fork") if fork else self._ctx
        # Frozen objects are never visited by the cyclic GC, whose bookkeeping writes
        # to every object it scans: unfrozen, a worker's first collections copy the
        # pages it shares with this process (torch's and Flower's modules). Undone
        # in close().
        self._frozen = fork and n_workers > 1
        if self._frozen:
            gc.freeze()
        workers_ = {
            i: _Worker(start_ctx, i, self._args_for(i), in_process=False)
            for i in range(1, n_workers)
        }  # (processes first: executor 0 and the senders are threads)
        workers_[0] = _Worker(self._ctx, 0, self._args_for(0), in_process=True)
        self._workers = [workers_[i] for i in range(n_workers)]
        self._replies: dict[str, Message] = {}
        self._owner: dict[str, _Worker] = {}
        self._messages: dict[str, Message] = {}

    #: ``send_and_receive`` yields each reply as soon as it (and every earlier one) arrived.
    streams_replies = True

    # -- Grid API -------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        """Set the run (the embedded engine has exactly one)."""
        self._run = run

    @property
    def run(self) -> Any:
        """Run information."""
        return self._run

    def get_node_ids(self) -> list[int]:
        """Ids of all virtual clients."""
        return [node_id_for(p) for p in range(self._num_clients)]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Hand each message to the worker that owns its destination node."""
        ids: list[str] = []
        encode = MessageEncoder()  # the round's shared model encoded once, not per message
        for msg in messages:
            node = msg.metadata.dst_node_id
            partition = node - _NODE_ID_BASE
            if not 0 <= partition < self._num_clients:
                raise ValueError(f"unknown node id {node}")
            msg_id = uuid4().hex
            set_message_id(msg, msg_id)
            worker = self._workers[partition % len(self._workers)]
            worker.send(msg, encode)
            worker.pending.append(msg_id)
            self._owner[msg_id] = worker
            self._messages[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies that have arrived for ``message_ids`` (non-blocking)."""
        self._drain(timeout=0.0)
        out = []
        for mid in message_ids:
            if mid in self._replies:
                out.append(self._take(mid))
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Push, then yield replies in push order as they arrive, until ``timeout``."""
        ids = self.push_messages(messages)
        return self._ordered(ids, timeout)

    # -- internals ------------------------------------------------------------
    def _take(self, mid: str) -> Message:
        self._owner.pop(mid, None)
        self._messages.pop(mid, None)
        return self._replies.pop(mid)

    def _ordered(self, ids: list[str], timeout: float | None) -> Iterator[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, mid in enumerate(ids):
            while mid not in self._replies:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    # Deadline: the replies that did arrive in time still count (in push
                    # order); only the missing ones are late and abandoned.
                    self._drain(timeout=0.0)
                    on_time = [m for m in ids[i:] if m in self._replies]
                    self._abandon([m for m in ids[i:] if m not in self._replies])
                    for m in on_time:
                        yield self._take(m)
                    return
                self._drain(timeout=left if left is not None else 1.0)
            yield self._take(mid)

    def _abandon(self, ids: list[str]) -> None:
        """Forget messages whose replies missed the deadline (late replies are dropped)."""
        for mid in ids:
            self._replies.pop(mid, None)
            self._owner.pop(mid, None)
            self._messages.pop(mid, None)

    def _drain(self, timeout: float | None) -> None:
        """Read every reply available within ``timeout`` seconds."""
        conns = {w.conn: w for w in self._workers}
        for conn in wait(list(conns), timeout=timeout):
            worker = conns[conn]  # type: ignore[index]
            try:
                data = conn.recv_bytes()  # type: ignore[union-attr]
            except (EOFError, OSError):
                self._worker_died(worker)
                continue
            if data == b"ready":
                worker.ready = True
                continue
            reply = worker.receive(data)
            mid = reply.metadata.reply_to_message_id
            if mid in worker.pending:
                worker.pending.remove(mid)
            if mid in self._messages:  # else: a late reply to an abandoned message
                self._replies[mid] = reply

    def _worker_died(self, worker: _Worker) -> None:
        """Turn the dead worker's pending messages into error replies and restart it."""
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        log.warning("worker %d exited (code %s); restarting it", worker.index, code)
        for mid in worker.pending:
            msg = self._messages.get(mid)
            if msg is not None:
                self._replies[mid] = error_reply(
                    msg, f"client process exited with code {code}", crashed=True
                )
        worker.pending.clear()
        worker.stop()
        replacement = _Worker(
            self._ctx, worker.index, self._args_for(worker.index), in_process=worker.index == 0
        )
        self._workers[worker.index] = replacement

    def close(self, timeout: float = 5.0) -> None:
        """Stop every executor; restore this process's torch threads.

        A worker process still busy after ``timeout`` seconds (all together) is killed.
        """
        deadline = time.monotonic() + timeout
        for w in self._workers:
            w.ask_stop()  # every executor is asked first, then each is waited for
        for w in self._workers:
            w.stop(timeout=max(0.0, deadline - time.monotonic()))
        if self._workers:
            import torch

            torch.set_num_threads(self._torch_threads)
        self._workers = []
        if self._frozen:
            self._frozen = False
            gc.unfreeze()

    def __enter__(self) -> EmbeddedGrid:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Interrupted (Ctrl-C): the user wants the prompt back, not the current round.
        self.close(timeout=1.0 if exc_type is KeyboardInterrupt else 5.0)


def run_embedded(
    server_app: Any,
    *,
    client_app: str,
    run_config: Mapping[str, Any],
    num_clients: int,
    workers: int = 0,
    server_node_config: Mapping[str, Any] | None = None,
    run_id: int = 1,
    client_state_dir: str | Path | None = None,
    client_config: str | Path | None = None,
) -> None:
    """Run ``server_app`` (a ``ServerApp``) against ``num_clients`` virtual clients.

    ``client_config``: the TOML file each client reads as its own config (see the
    module docstring); default: the clients use ``run_config``.
    """
    set_task_identity(run_id=run_id, node_id=SUPERLINK_NODE_ID, task_id=1)
    one_malloc_arena()  # before the executors' threads and processes start
    with EmbeddedGrid(
        client_app=client_app,
        run_config=run_config,
        num_clients=num_clients,
        workers=workers,
        run_id=run_id,
        client_state_dir=client_state_dir,
        client_config=client_config,
    ) as grid:
        context = Context(
            run_id=run_id,
            node_id=SUPERLINK_NODE_ID,
            node_config=dict(server_node_config or {}),
            state=RecordDict(),
            run_config=dict(run_config),
        )
        server_app(grid, context)
