"""Flower's SuperLink behind the listener guard (what ``fedcore server`` runs).

``python -m fedcore.deploy.superlink --public HOST:PORT --local-port N --kit DIR``
does what ``flower-superlink`` does (same FastAPI app, same lifespan: Control,
Fleet and Runtime APIs, node authentication, a SuperExec that starts the
ServerApp) with these differences:

1. the app is served on two sockets, the public one and ``127.0.0.1:N``, and
   wrapped in the guard (Fleet API only on the public socket; everything on the
   loopback one, for loopback peers only); the public socket answers 503 until
   ``fedcore server`` opens it (after registering the admitted keys) with the
   secret it put in this process's environment (``FEDCORE_OPEN_TOKEN``, removed
   from the environment first thing, so SuperExec and the ServerApp never see it);
2. request bodies are capped (``--max-request-bytes``; 413 above it);
3. the SuperLink's own Runtime API address (what SuperExec and the ServerApp
   connect to) is the loopback socket;
4. uvicorn trusts no proxy headers, so the peer address is the socket's;
5. the ServerApp's node config (empty under Flower's deployment engine) holds
   ``admitted-list``: the server kit's signed ``admitted.json``, which the
   ServerApp relays to clients;
6. with ``FEDCORE_GUARD_STATS=FILE`` in its environment, the guard appends one line
   per request served and per ask of the app to ``FILE``: ``UNIX_TIME PATH
   request|ask SECONDS`` (``benchmarks/deployment_latency.py --requests``).

It relies on two private helpers of ``flwr.superlink.cli.flower_superlink``
(``_parse_superlink_lifespan_config`` and ``SuperLinkLifespan``), reached through
:func:`fedcore.flower_adapter.superlink_app`, which is why ``pyproject.toml`` pins
``flwr<1.43``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["GUARD_STATS_ENV", "main", "superlink_argv"]

#: Seconds a stopping SuperLink lets running requests finish before it cancels them.
SHUTDOWN_GRACE_S = 1.0
#: Environment variable naming the file the guard's request statistics go to.
GUARD_STATS_ENV = "FEDCORE_GUARD_STATS"


def superlink_argv(
    *, local_port: int, kit: Path | None, insecure: bool, database: str = ":flwr-in-memory:"
) -> list[str]:
    """The ``flower-superlink`` arguments fedcore runs the SuperLink with."""
    argv = [
        "--host",
        "127.0.0.1",
        "--port",
        str(local_port),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--database",
        database,
    ]
    if insecure:
        return [*argv, "--insecure"]
    assert kit is not None
    return [
        *argv,
        "--ssl-ca-certfile",
        str(kit / "ca.pem"),
        "--ssl-certfile",
        str(kit / "server.pem"),
        "--ssl-keyfile",
        str(kit / "server.key"),
        "--enable-supernode-auth",
    ]


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
    sock.bind((host, port))
    return sock


def _stats_file(path: str) -> Callable[[str, str, float], None] | None:
    """A writer of the guard's statistics to ``path`` (appended, a line each); None if empty."""
    if not path:
        return None
    out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open while serving

    def write(route: str, kind: str, seconds: float) -> None:
        out.write(f"{time.time():.4f} {route} {kind} {seconds:.5f}\n")

    return write


def _open_token() -> bytes:
    """The opening secret from this process's environment, removed from it (children)."""
    from fedcore.deploy.guard import OPEN_TOKEN_ENV

    raw = os.environ.pop(OPEN_TOKEN_ENV, "")
    try:
        token = bytes.fromhex(raw)
    except ValueError:
        token = b""
    if len(token) < 16:
        sys.exit(
            f"{OPEN_TOKEN_ENV} is missing or too short: this process is started by "
            "`fedcore server`, which draws it"
        )
    return token


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point (``python -m fedcore.deploy.superlink``)."""
    token = _open_token()  # before anything can start a child
    from fedcore.deploy.guard import DEFAULT_MAX_REQUEST_BYTES

    p = argparse.ArgumentParser(prog="python -m fedcore.deploy.superlink")
    p.add_argument("--public", required=True, help="HOST:PORT of the public (Fleet API) listener")
    p.add_argument("--local-port", type=int, required=True, help="port of the 127.0.0.1 listener")
    p.add_argument("--kit", type=Path, help="server kit (ca.pem, server.pem, server.key)")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--database", default=":flwr-in-memory:")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body served (413 above it)",
    )
    args = p.parse_args(argv)

    import uvicorn

    from fedcore import flower_adapter as flower
    from fedcore.deploy.guard import ListenerGuard, fleet_routes
    from fedcore.storage.keys import ADMITTED_LIST

    parsed = flower.parse_address(args.public)
    if not parsed:
        sys.exit(f"--public {args.public!r} is not HOST:PORT")
    host, port, _ = parsed
    if port == args.local_port:
        sys.exit("the public and local listeners need different ports")
    if args.max_request_bytes < 1:
        sys.exit(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    app, config = flower.superlink_app(
        superlink_argv(
            local_port=args.local_port, kit=args.kit, insecure=args.insecure, database=args.database
        )
    )
    if args.kit is not None:
        flower.set_serverapp_node_config(
            {ADMITTED_LIST: str((args.kit / "admitted.json").resolve())}
        )
    guarded = ListenerGuard(
        app,
        local_port=args.local_port,
        public_paths=fleet_routes(),
        start_open=False,
        open_token=token,
        max_request_bytes=args.max_request_bytes,
        stats=_stats_file(os.environ.get(GUARD_STATS_ENV, "")),
    )
    sockets = [_listen(str(host), int(port)), _listen("127.0.0.1", args.local_port)]
    server = uvicorn.Server(
        uvicorn.Config(
            app=guarded,
            reload=False,
            workers=1,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            log_config=flower.uvicorn_log_config(),
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            # On SIGINT/SIGTERM, requests still running after this long are cancelled: a
            # held pull (up to 3 s, fedcore.deploy.guard) or a node that keeps polling on
            # its kept-alive connection otherwise held the shutdown until fedcore server's
            # SIGKILL 5 s later (7.5 s from Ctrl-C to exit, measured)
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
    )
    server.run(sockets=sockets)


if __name__ == "__main__":  # pragma: no cover
    main()
