"""``fedcore server``: Flower's SuperLink with TLS and node authentication, then one fedcore run.

::

    fedcore server --kit fed/server [--address 0.0.0.0:9092] [CONFIG] [--out RUN_DIR]

1. starts the SuperLink (:mod:`fedcore.deploy.superlink`): TLS with the kit's
   certificate, node authentication on, runtime dependency installation off,
   the Fleet API on ``--address``, Control and Runtime APIs only on
   ``127.0.0.1:--local-port`` (see :mod:`fedcore.deploy.guard`), request bodies
   capped at ``--max-request-mb``;
2. registers the kit's admitted client keys through the local Control API, and
   keeps them in step with ``admitted.json`` while it runs (``fedcore provision
   --add-client/--revoke`` take effect within seconds), then opens the public
   listener with a secret drawn here for this SuperLink only; the ServerApp finds
   the kit's signed ``admitted.json`` in its node config ``admitted-list`` and
   relays it to clients;
3. starts the run: a FAB holding the fedcore ServerApp/ClientApp entry points
   and the resolved config, the run directory in ``deploy.run-dir``;
4. prints each finished round, and when the run ends stops every process it
   started (also on Ctrl-C, SIGTERM or an error) and exits 0 if the run completed.

The ServerApp is ``server/app.py``, unchanged, run by Flower's SuperExec.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcore import flower_adapter as flower
from fedcore.core.config import Config, to_flower_tables
from fedcore.core.errors import DeploymentError
from fedcore.deploy.files import check_kit_dir
from fedcore.deploy.guard import DEFAULT_MAX_REQUEST_BYTES, OPEN_TOKEN_ENV
from fedcore.engines.processes import ProcessTree, install_signal_handlers

__all__ = ["Admission", "build_fab", "check_kit", "register", "run_server"]

DEFAULT_ADDRESS = "0.0.0.0:9092"
DEFAULT_MAX_REQUEST_MB = DEFAULT_MAX_REQUEST_BYTES / (1024 * 1024)
INSECURE_WARNING = (
    "\n"
    "  WARNING: --insecure: no TLS and no node authentication. Everything on the\n"
    "  wire is plaintext and ANY machine that reaches the port can join as a client.\n"
    "  Use this only on a network you fully trust, for debugging.\n"
)


def check_kit(kit: Path) -> None:
    """Raise :class:`DeploymentError` unless ``kit`` is a usable server kit."""
    check_kit_dir(
        kit,
        ("ca.pem", "server.pem", "server.key", "admitted.json"),
        "server.key",
        "the server kit (the 'server' directory)",
    )


#: The Flower apps the bundle names (``[tool.flwr.app.components]``), found by module path.
APP_MODULES = ("server.app", "clients.app")


def _app_files() -> dict[str, bytes]:
    """The apps' sources as they are installed here, located without importing them."""
    files: dict[str, bytes] = {}
    for name in APP_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise DeploymentError(
                f"cannot find the Flower app module {name!r}: install fedcore with its apps "
                "(pip install -e . in the repository)"
            )
        path = Path(spec.origin)
        pkg = path.parent.name
        files[f"{pkg}/app.py"] = path.read_bytes()
        init = path.parent / "__init__.py"
        files[f"{pkg}/__init__.py"] = init.read_bytes() if init.is_file() else b""
    return files


def build_fab(cfg: Config, *, client_app: str | None = None) -> bytes:
    """A Flower App Bundle: the fedcore app entry points and ``cfg`` as the run config.

    The fedcore library itself is not in the bundle: the server and every
    client use the fedcore installed on their machine. ``client_app``
    (``"module:attr"``, ``fedcore server --client-app``) replaces fedcore's ClientApp:
    its sources travel in the bundle and stock ``flower-supernode``s run it
    (``fedcore client`` always runs its own); it reads the arrays as Flower sends
    them, so ``deploy.pack-arrays`` is turned off.
    """
    from fedcore.runtime.configfile import client_app_sources

    user_files = client_app_sources(client_app, flag="--client-app") if client_app else {}
    if client_app:
        cfg = cfg.replace(deploy={"pack-arrays": False})
    clash = sorted(set(user_files) & set(_app_files()))
    if clash:
        raise DeploymentError(
            f"--client-app {client_app!r}: its files {clash} would replace fedcore's own apps "
            "in the bundle; rename its package (not 'server' or 'clients')"
        )
    import tomli_w

    from fedcore import __version__

    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedcore",
            "version": __version__,
            "description": "fedcore ServerApp and ClientApp",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedcore",
                    "components": {
                        "serverapp": "server.app:app",
                        "clientapp": client_app or "clients.app:app",
                    },
                    "config": to_flower_tables(cfg),
                }
            }
        },
    }
    files = {"pyproject.toml": tomli_w.dumps(pyproject).encode(), **_app_files(), **user_files}
    return flower.build_fab(files)


class Admission:
    """Keeps the SuperLink's registered node keys equal to ``admitted.json``.

    Parameters
    ----------
    control : flwr ``ControlHttpClient``
        Client of the local Control API.
    admitted : Path
        The server kit's ``admitted.json``.

    """

    def __init__(self, control: Any, admitted: Path) -> None:
        self.control = control
        self.admitted = admitted
        self.registered: dict[bytes, tuple[str, int]] = {}  # PEM -> (name, node id)
        self.retired: set[bytes] = set()  # revoked in this run: Flower keeps the key taken
        self.refused: set[bytes] = set()
        self._mtime: float | None = None

    def sync(self) -> list[str]:
        """Register newly admitted keys, unregister revoked ones; return what changed."""
        from fedcore.storage.keys import load_admitted_keys, public_key_pem

        wanted = {public_key_pem(k): name for name, k in load_admitted_keys(self.admitted).items()}
        changes = []
        for pem, (name, node_id) in list(self.registered.items()):
            if pem not in wanted:
                try:
                    flower.unregister_node(self.control, node_id)
                except Exception as exc:  # noqa: BLE001 - report, keep serving
                    changes.append(f"could not revoke {name}: {exc}")
                    continue
                del self.registered[pem]
                self.retired.add(pem)
                changes.append(f"revoked {name}")
        for pem, name in wanted.items():
            if pem in self.registered:
                continue
            if pem in self.retired:
                changes.append(
                    f"not re-admitting {name}: its key was revoked during this run; "
                    f"issue a new one (`fedcore provision --add-client {name} --force`)"
                )
                self.retired.discard(pem)  # say it once
                self.refused.add(pem)
                continue
            if pem in self.refused:
                continue
            try:
                node_id = flower.register_node(self.control, pem, name)
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                changes.append(f"could not admit {name}: {exc}")
                self.refused.add(pem)
                continue
            self.registered[pem] = (name, node_id)
            changes.append(f"admitted {name}")
        return changes

    def sync_if_changed(self) -> list[str]:
        """:meth:`sync` when ``admitted.json`` changed since the last call."""
        try:
            mtime = self.admitted.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if mtime == self._mtime:
            return []
        self._mtime = mtime
        return self.sync()


def _wait_healthy(proc: Any, local_port: int, ca_path: Path | None, log_path: Path) -> None:
    import httpx

    scheme = "http" if ca_path is None else "https"
    verify: Any = False if ca_path is None else str(ca_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(
                f"the SuperLink exited with code {proc.returncode} while starting:\n"
                + _tail(log_path)
            )
        try:
            r = httpx.get(f"{scheme}://127.0.0.1:{local_port}/health", verify=verify, timeout=2)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DeploymentError("the SuperLink did not become healthy within 120 s:\n" + _tail(log_path))


def _open_public_listener(local_port: int, ca_path: Path | None, token: bytes) -> None:
    import httpx

    from fedcore.deploy.guard import OPEN_PATH, OPEN_TOKEN_HEADER

    scheme = "http" if ca_path is None else "https"
    verify: Any = False if ca_path is None else str(ca_path)
    httpx.post(
        f"{scheme}://127.0.0.1:{local_port}{OPEN_PATH}",
        headers={OPEN_TOKEN_HEADER: token.hex()},
        verify=verify,
        timeout=10,
    ).raise_for_status()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _RoundPrinter:
    """Prints each new row of the run directory's ``metrics.json``."""

    def __init__(self, run_dir: Path, rounds: int, out: Callable[[str], None]) -> None:
        self.path = run_dir / "metrics.json"
        self.rounds = rounds
        self.out = out
        self.seen = 0
        self.drops_seen = 0
        self.rows_before = 0  # rows the previous poll saw

    def poll(self, *, final: bool = False) -> None:
        """Print new drops, then new rows; a row only once a later poll (or ``final``) sees it.

        The ServerApp writes a round's ``metrics.json`` row just before that round's
        drops, so a row is held back one poll for its drops to be printed above it.
        """
        from fedcore.runtime.diagnostics import format_drop, read_dropped
        from fedcore.serverside.rundir import format_round

        try:
            rows = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            rows = None
        drops = read_dropped(self.path.parent)  # why each client was dropped, as it happens
        for entry in drops[self.drops_seen :]:
            self.out(format_drop(entry))
        self.drops_seen = max(self.drops_seen, len(drops))
        if rows is None:
            return
        upto = len(rows) if final else min(len(rows), self.rows_before)
        for row in rows[self.seen : upto]:
            self.out(format_round(row, self.rounds))  # user metrics included
        self.seen = max(self.seen, upto)
        self.rows_before = len(rows)


def run_server(
    *,
    kit: Path | None,
    cfg: Config,
    address: str = DEFAULT_ADDRESS,
    local_port: int | None = None,
    insecure: bool = False,
    state_dir: Path | None = None,
    sync_interval: float = 2.0,
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
    out: Callable[[str], None] = print,
    quiet: bool = False,
    client_app: str | None = None,
) -> int:
    """Serve one fedcore run; return 0 if it completed (see the module docstring).

    ``quiet``: no line per round (the start, errors and the final lines only).
    """
    parsed = flower.parse_address(address)
    if not parsed:
        raise DeploymentError(f"--address {address!r} is not HOST:PORT (e.g. 0.0.0.0:9092)")
    if not max_request_mb > 0:
        raise DeploymentError(
            f"--max-request-mb {max_request_mb} must be > 0 (default {DEFAULT_MAX_REQUEST_MB:g})"
        )
    port = int(parsed[1])
    local_port = local_port or (port + 1)
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    else:
        if kit is None:
            raise DeploymentError("--kit is required (the server kit from `fedcore provision`)")
        check_kit(kit)
    run_dir = Path(cfg.deploy.run_dir).resolve() if cfg.deploy.run_dir else None
    if run_dir is None:
        from fedcore.serverside.rundir import default_run_dir

        run_dir = default_run_dir(cfg).resolve()
    from fedcore.serverside.checkpoint import has_checkpoint, load_checkpoint, never_trained

    if cfg.deploy.resume and not has_checkpoint(run_dir):
        out(
            f"fedcore server: {run_dir} has no checkpoint (it was stopped before round 1 "
            "completed): starting it from round 1"
        )
        cfg = cfg.replace(deploy={"resume": False})
    elif cfg.deploy.resume:
        state = load_checkpoint(run_dir, expect=cfg)  # refuse a bad checkpoint before starting
        out(f"fedcore server: resuming {run_dir} after round {state.round} of {cfg.run.rounds}")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not never_trained(run_dir):
            raise DeploymentError(
                f"run directory {run_dir} exists and is not empty; choose another --out "
                f"(or continue it: --resume {run_dir})"
            )
        out(
            f"fedcore server: reusing {run_dir}: it holds only what a start interrupted "
            "before round 1 wrote"
        )
    cfg = cfg.replace(deploy={"run-dir": str(run_dir)})
    from fedcore.clientside.data import holdout
    from fedcore.runtime.diagnostics import dropout_margin_warnings, server_data_line

    train_part, test = holdout(cfg.data, seed=cfg.run.seed)
    out(f"fedcore server: {server_data_line(cfg, len(train_part) + len(test), len(test))}")
    for warning in dropout_margin_warnings(cfg, cfg.run.clients):
        out(f"fedcore server: WARNING: {warning}")
    if cfg.data.num_classes == 0:  # a client's own file may lack a class: fix the count for all
        cfg = cfg.replace(data={"num-classes": test.num_classes})

    own_state = state_dir is None
    state = Path(tempfile.mkdtemp(prefix="fedcore-server-")) if state_dir is None else state_dir
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "superlink.log"
    ca = None if insecure else (kit / "ca.pem").read_bytes()  # type: ignore[operator]
    argv = [
        sys.executable,
        "-m",
        "fedcore.deploy.superlink",
        "--public",
        address,
        "--local-port",
        str(local_port),
        "--max-request-bytes",
        str(int(max_request_mb * 1024 * 1024)),
    ]
    argv += ["--insecure"] if insecure else ["--kit", str(kit)]
    # Opens the public listener; the SuperLink child alone gets it (its environment,
    # never argv or a log) and removes it from its environment before starting any child.
    open_token = secrets.token_bytes(32)
    env = {
        "FLWR_HOME": str(state / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
        "FLWR_INTERNAL_GRPC_CONTROL_API": "0",
        "FLWR_INTERNAL_GRPC_FLEET_API": "0",
        OPEN_TOKEN_ENV: open_token.hex(),
    }
    control = None
    status = "unknown"
    try:
        with ProcessTree() as tree, open(log_path, "ab") as log_file:
            proc = tree.start("superlink", argv, env=env, stdout=log_file)
            _wait_healthy(proc, local_port, None if insecure else kit / "ca.pem", log_path)  # type: ignore[operator]
            mode = "PLAINTEXT, no node authentication" if insecure else "TLS, node authentication"
            out(
                f"fedcore server: Fleet API on {address} ({mode}); "
                f"Control/Runtime APIs on 127.0.0.1:{local_port} only"
            )
            control = flower.control_client(f"127.0.0.1:{local_port}", ca_pem=ca)
            admission = None
            if not insecure:
                admission = Admission(control, kit / "admitted.json")  # type: ignore[operator]
                for change in admission.sync_if_changed():
                    out(f"  {change}")
            _open_public_listener(local_port, None if insecure else kit / "ca.pem", open_token)  # type: ignore[operator]
            run_id = flower.start_run(control, build_fab(cfg, client_app=client_app))
            out(
                f"run {run_id}: {cfg.run.rounds} rounds, waiting for "
                f"{cfg.round.min_available_clients} client(s); run directory {run_dir}"
            )
            try:
                status = _follow(
                    control,
                    run_id,
                    proc,
                    log_path,
                    admission,
                    run_dir,
                    cfg,
                    sync_interval,
                    out,
                    quiet=quiet,
                )
            except KeyboardInterrupt:
                out("fedcore server: interrupted; stopping the run and every process")
                try:
                    flower.stop_run(control, run_id)
                except Exception:  # noqa: BLE001 - best effort while shutting down
                    pass
                raise
    finally:
        if control is not None:
            control.close()
        if own_state and status == "completed":
            shutil.rmtree(state, ignore_errors=True)
    if status == "completed":
        summary = run_dir / "summary.json"
        acc = (
            json.loads(summary.read_text()).get("final_test_accuracy")
            if summary.is_file()
            else None
        )
        line = f"final test accuracy {acc:.4f}; " if isinstance(acc, float) else ""
        out(f"run completed: {line}run directory {run_dir}")
        return 0
    out(f"run ended: {status}; SuperLink log: {log_path}")
    return 1


def _follow(
    control: Any,
    run_id: int,
    proc: Any,
    log_path: Path,
    admission: Admission | None,
    run_dir: Path,
    cfg: Config,
    sync_interval: float,
    out: Callable[[str], None],
    *,
    quiet: bool = False,
) -> str:
    """Wait for the run to finish, printing rounds and syncing admissions; its sub-status.

    ``"completed"``, else the sub-status with Flower's details (the ServerApp's error).
    """
    printer = _RoundPrinter(run_dir, cfg.run.rounds, (lambda _line: None) if quiet else out)
    last_sync = time.monotonic()
    last_status = 0.0
    while True:
        if proc.poll() is not None:
            raise DeploymentError(
                f"the SuperLink exited with code {proc.returncode} during the run:\n"
                + _tail(log_path)
            )
        printer.poll()
        if admission is not None and time.monotonic() - last_sync >= sync_interval:
            last_sync = time.monotonic()
            try:
                for change in admission.sync_if_changed():
                    out(f"  {change}")
            except DeploymentError as exc:  # a bad file: keep the admitted keys we have
                out(f"  admitted keys not reloaded: {exc}")
        if time.monotonic() - last_status >= _STATUS_POLL_S:
            last_status = time.monotonic()
            status, sub_status, details = flower.run_status(control, run_id)
            if status == "finished":
                printer.poll(final=True)
                # e.g. "failed: ServerApp failed with exception: no round trained: ..."
                return sub_status if sub_status == "completed" else f"{sub_status}: {details}"
        time.sleep(0.3)


#: Seconds between two asks of the SuperLink whether the run is over. Each ask is a
#: request the SuperLink serves on the cores the round uses (every 0.3 s it was 3-13
#: of the 141-578 requests of a round: docs/benchmarks.md); the rounds are printed
#: from the run directory every 0.3 s all the same.
_STATUS_POLL_S = 1.0


def cmd_server(args: argparse.Namespace) -> int:
    """``fedcore server``."""
    from fedcore.core.overrides import apply_sets
    from fedcore.runtime.configfile import default_config_path, importable
    from fedcore.storage.configfile import load_config

    install_signal_handlers()
    resume = Path(args.resume).resolve() if args.resume else None
    if resume is not None and args.out:
        raise DeploymentError("--out cannot be combined with --resume RUN_DIR")
    if args.config:
        path: Path | None = Path(args.config)
    elif resume is not None:
        path = resume / "config.toml"
        if not path.is_file():
            raise DeploymentError(f"{resume} is not a fedcore run directory (no config.toml)")
    else:
        path = default_config_path()
    importable(path)  # the ServerApp finds modules beside the config, as simulate does
    if args.client_app:  # the ClientApp shipped to stock flower-supernodes: checked first
        from fedcore.runtime.configfile import load_client_app

        load_client_app(args.client_app, flag="--client-app", config_path=path)
    cfg = load_config(path)
    overrides: dict[str, Any] = {}
    if resume is not None:
        overrides["deploy"] = {"run-dir": str(resume), "resume": True}
    if args.rounds is not None:
        overrides["run"] = {"rounds": args.rounds}
    if args.min_clients is not None:
        overrides["round"] = {"min-available-clients": args.min_clients}
    if args.out:
        overrides["deploy"] = {"run-dir": str(Path(args.out).resolve())}
    cfg = apply_sets(cfg, args.set or [], overrides)  # --set, then the flags above
    return run_server(
        kit=Path(args.kit) if args.kit else None,
        cfg=cfg,
        address=args.address,
        local_port=args.local_port,
        insecure=args.insecure,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        max_request_mb=args.max_request_mb,
        out=lambda line: print(line, flush=True),
        quiet=args.quiet,
        client_app=args.client_app,
    )


#: ``fedcore server --help``'s examples.
SERVER_EPILOG = """\
examples:
  fedcore server --kit fed/server config.toml --out runs/exp1
  fedcore server --kit fed/server config.toml --address 0.0.0.0:9092 --set run.rounds=10
  fedcore server --kit fed/server --resume runs/exp1
"""


def register(subparsers: Any) -> None:
    """Add the ``server`` sub-command."""
    from fedcore.core.overrides import SET_HELP

    p = subparsers.add_parser(
        "server",
        help="serve one federated run: Flower SuperLink with TLS + node authentication",
        description="Start Flower's SuperLink with the server kit (TLS, node authentication, "
        "Control API on loopback only) and run the fedcore ServerApp with CONFIG.",
        epilog=SERVER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="TOML config (default: simulations/default.toml)")
    p.add_argument("--kit", help="server kit directory from `fedcore provision` (DIR/server)")
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"Fleet API listen address (default {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--local-port",
        type=int,
        help="loopback port for the Control/Runtime APIs (default: port+1)",
    )
    p.add_argument("--out", help="run directory to create (default: <run.out-dir>/<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its last checkpoint (RUN_DIR/config.toml unless CONFIG)",
    )
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--min-clients", type=int, help="override round.min-available-clients")
    p.add_argument(
        "--client-app",
        metavar="MODULE:ATTR",
        help="ship this Flower ClientApp (its package or directory) in the run's bundle for "
        "stock flower-supernode clients (fedcore client runs its own); see docs/engines.md",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--quiet", action="store_true", help="no line per round")
    p.add_argument(
        "--state-dir", help="keep the SuperLink's state and log here (default: a temp dir)"
    )
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_MB,
        help="refuse request bodies larger than this with 413 (default "
        f"{DEFAULT_MAX_REQUEST_MB:g}; Flower sends arrays in 5 MiB chunks)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="NO TLS, NO node authentication (debugging on a trusted network only)",
    )
    p.set_defaults(func=cmd_server)
