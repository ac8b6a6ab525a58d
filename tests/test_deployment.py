"""Real deployment on loopback: `fedcore server` + `fedcore client` processes over TLS.

One federation (module fixture) serves every check, to keep the suite short:

- 3 clients train 8 rounds over TLS with node authentication; the model improves;
  every process exits at the end;
- while it trains, each of these is refused and the server keeps serving the
  others: a plaintext client, a client of another federation (other CA), an
  identity never admitted, a revoked identity (before start), an identity
  revoked while the server runs; a client added while it runs joins;
- the Control and Runtime APIs answer 403 on the public listener, from
  loopback and (when this machine lets us make a network namespace) from a
  real non-loopback address, where registering a node through the Fleet API
  is refused too;
- client-1 talks through a TCP relay the test controls: the relayed bytes never
  contain the model's distinctive float pattern.

A second, small federation runs ``--insecure`` on both sides through the same
kind of relay: there the pattern *is* on the wire (so the check above can fail),
and both sides print their warning. A third has stock ``flower-supernode``
clients (with their kits) train against ``fedcore server``: the apps run
unchanged on Flower's own deployment engine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcore.core.config import config_from_dict, to_toml
from fedcore.core.errors import DeploymentError
from fedcore.deploy.local import carve
from fedcore.deploy.node import FleetSession, Refused
from fedcore.deploy.provision import add_client, provision, revoke
from fedcore.engines.processes import free_port
from tests.apps.pattern import needle
from tests.procs import procs_mentioning as _procs_mentioning
from tests.procs import stop

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc"),
]

ROUNDS = 30  # ~1 s a round: the intruders (~15-20 s) must all come while the federation trains
CLI = [sys.executable, "-m", "fedcore.cli"]


# ----------------------------------------------------------------- helpers
class Relay:
    """A TCP relay 127.0.0.1:port -> target that records every byte in both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.data = bytearray()
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target)
            except OSError:
                a.close()
                continue
            self.connections += 1
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self.lock:
                    self.data += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class NetNS:
    """A network namespace joined to this host by a veth pair: a real non-loopback peer."""

    def __init__(self) -> None:
        s = secrets.token_hex(3)
        self.name, self.host_if, self.ns_if = f"fc{s}", f"fch{s}", f"fcn{s}"
        third, fourth = secrets.randbelow(250) + 1, 4 * secrets.randbelow(60) + 4
        self.host_ip = f"10.231.{third}.{fourth + 1}"
        self.ns_ip = f"10.231.{third}.{fourth + 2}"

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and shutil.which("ip") is not None

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)

    def up(self) -> None:
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip(
            "netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if
        )
        self._ip("netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
        self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)


PROBE = r"""
import json, sys, httpx
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import RegisterNodeRequest, StartRunRequest
from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import FlowerError
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

host, port, local_port, ca_path, fab_path = sys.argv[1:]
ca = open(ca_path, "rb").read()
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = {"status": 200}
    except httpx.HTTPStatusError as e:
        err = FlowerError.from_json(e.response.text)
        out[name] = {"status": e.response.status_code, "body": e.response.text[:300],
                     "code": getattr(err, "code", None)}
    except httpx.HTTPError as e:
        out[name] = {"error": type(e).__name__}
priv, pub = generate_key_pairs()
control = ControlHttpClient.from_server_address(f"{host}:{port}", False, ca, interceptors=[])
from flwr.proto.fab_pb2 import Fab
fab = open(fab_path, "rb").read()
import hashlib
pk = public_key_to_bytes(pub)
fab_msg = Fab(hash_str=hashlib.sha256(fab).hexdigest(), content=fab)
attempt("start-run", lambda: control.StartRun(StartRunRequest(fab=fab_msg)))
attempt("register-node", lambda: control.RegisterNode(RegisterNodeRequest(public_key=pk)))
url = f"https://{host}:{port}/v1/runtime/acquire-task"
headers = {"content-type": "application/protobuf"}
attempt("acquire-task",
        lambda: httpx.post(url, verify=ca_path, content=b"", headers=headers).raise_for_status())
fleet = FleetHttpClient.from_server_address(f"{host}:{port}", False, ca,
                                            interceptors=[NodeAuthHttpInterceptor(priv, pub)])
attempt("fleet-register-node", lambda: fleet.RegisterNode(RegisterNodeFleetRequest(public_key=pk)))
local = f"https://{host}:{local_port}/health"
attempt("local-port", lambda: httpx.get(local, verify=False, timeout=3))
print(json.dumps(out))
"""


def _metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((run_dir / "metrics.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return []


def _wait_for(pred: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            if p.poll() not in (None, 0):
                raise AssertionError(
                    f"{p.args} exited with {p.returncode} while waiting for {what}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _config(rounds: int, clients: int, min_clients: int, *, secagg: bool = True) -> Any:
    return config_from_dict(
        {
            "run": {"seed": 3, "rounds": rounds, "clients": clients, "centralized-baseline": False},
            "data": {
                "source": "synthetic",
                "synthetic-examples": 600,
                "partition": "iid",
                "num-classes": 10,
            },
            "model": {"factory": "tests.apps.pattern:model"},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            "strategy": {
                "min-train-clients": min_clients,
                "min-evaluate-clients": min_clients,
            },
            "round": {"min-available-clients": min_clients, "timeout": 120.0},
            "secagg": {"enabled": secagg},
        }
    )


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# ----------------------------------------------------------------- the federation
@pytest.fixture(scope="module")
def tls_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("tls")
    ns = NetNS() if NetNS.available() else None
    if ns is not None:
        try:
            ns.up()
        except (subprocess.CalledProcessError, OSError):
            ns.down()
            ns = None
    fed = provision(
        base / "fed",
        clients=["client-1", "client-2", "client-3", "client-4", "eve"],
        server_ips=[ns.host_ip] if ns else [],
    )
    revoke(fed.root, "client-4")  # revoked before the server starts
    other = provision(base / "other-fed", clients=1)
    # an identity never admitted: this federation's CA, a fresh key
    stranger = provision(base / "stranger-src", clients=["stranger"]).client_kit("stranger")
    shutil.copy(fed.server_kit / "ca.pem", stranger / "ca.pem")

    cfg = _config(ROUNDS, clients=4, min_clients=3)
    data = carve(cfg.replace(run={"clients": 3}), base / "data")
    cfg_path = base / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    port, local_port = free_port(), free_port()
    run_dir = base / "run"
    logs = base / "logs"
    logs.mkdir()
    relay = Relay(("127.0.0.1", port))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    results: dict[str, Any] = {
        "base": base,
        "run_dir": run_dir,
        "relay": relay,
        "ns": ns,
        "fed": fed,
    }

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as f:
            procs[name] = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        return procs[name]

    def client(name: str, data_path: Path, via: int = port) -> subprocess.Popen[bytes]:
        return start(
            name,
            [
                *CLI,
                "client",
                "--kit",
                str(fed.client_kit(name)),
                "--server",
                f"127.0.0.1:{via}",
                "--data",
                str(data_path),
                "--config",  # the client's own config (here the federation's)
                str(cfg_path),
                "--once",
                "--connect-timeout",
                "90",
            ],
        )

    try:
        server = start(
            "server",
            [
                *CLI,
                "server",
                "--kit",
                str(fed.server_kit),
                "--address",
                f"0.0.0.0:{port}",
                "--local-port",
                str(local_port),
                "--state-dir",
                str(base / "state"),
                "--out",
                str(run_dir),
                str(cfg_path),
            ],
        )
        client("client-1", data[0], via=relay.port)
        client("client-2", data[1])
        client("client-3", data[2])
        everyone = list(procs.values())
        _wait_for(lambda: len(_metrics_rows(run_dir)) >= 1, 240, "round 1", everyone)
        results["rows_before_attacks"] = len(_metrics_rows(run_dir))

        # -- intruders, while the federation trains ------------------------------
        address = f"127.0.0.1:{port}"
        attempts: dict[str, Any] = {}

        def attempt(name: str, ca: bytes | None, key: Path | None, insecure: bool = False) -> None:
            session = FleetSession(address, ca_pem=ca, key_path=key, insecure=insecure)
            try:
                session.connect(wait=4)
                attempts[name] = "ACCEPTED"
            except Refused as exc:
                attempts[name] = f"refused: {exc}"
            except DeploymentError as exc:
                attempts[name] = f"unreachable: {exc}"
            finally:
                session.close()

        kit = fed.client_kit
        # a client added while the server runs joins; one revoked while it runs is refused
        add_client(fed.root, "frank")
        revoke(fed.root, "eve")
        t_admin = time.monotonic()
        threads = [
            threading.Thread(target=attempt, args=("plaintext", None, None, True)),
            threading.Thread(
                target=attempt,
                args=(
                    "other-ca",
                    (other.client_kit("client-1") / "ca.pem").read_bytes(),
                    other.client_kit("client-1") / "identity.key",
                ),
            ),
            threading.Thread(
                target=attempt,
                args=(
                    "never-admitted",
                    (stranger / "ca.pem").read_bytes(),
                    stranger / "identity.key",
                ),
            ),
            threading.Thread(
                target=attempt,
                args=(
                    "revoked",
                    (kit("client-4") / "ca.pem").read_bytes(),
                    kit("client-4") / "identity.key",
                ),
            ),
        ]
        for t in threads:
            t.start()
        # the Control API from loopback, but on the public listener
        from flwr.proto.control_pb2 import ListRunsRequest
        from flwr.supercore.control import ControlHttpClient

        ca_pem = (fed.server_kit / "ca.pem").read_bytes()
        public_control = ControlHttpClient.from_server_address(
            address, False, ca_pem, interceptors=[]
        )
        try:
            public_control.ListRuns(ListRunsRequest())
            results["public-control-from-loopback"] = 200
        except Exception as exc:  # noqa: BLE001
            results["public-control-from-loopback"] = getattr(
                getattr(exc, "response", None), "status_code", repr(exc)
            )
        time.sleep(max(0.0, 3.0 - (time.monotonic() - t_admin)))  # > the 2 s admission sync
        client("frank", data[2])
        attempt("revoked-live", (kit("eve") / "ca.pem").read_bytes(), kit("eve") / "identity.key")
        # the same refusal through the command line: exit code 3 and a reason
        cli = subprocess.run(
            [
                *CLI,
                "client",
                "--kit",
                str(other.client_kit("client-1")),
                "--server",
                address,
                "--data",
                str(data[0]),
                "--config",
                str(cfg_path),
                "--connect-timeout",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        results["cli-other-ca"] = (cli.returncode, cli.stderr)
        if ns is not None:
            from fedcore.deploy.server import build_fab

            fab_path = base / "attack.fab"
            fab_path.write_bytes(build_fab(cfg))
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns.name,
                    sys.executable,
                    "-c",
                    PROBE,
                    ns.host_ip,
                    str(port),
                    str(local_port),
                    str(fed.server_kit / "ca.pem"),
                    str(fab_path),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            results["netns"] = (
                json.loads(probe.stdout.strip().splitlines()[-1])
                if probe.returncode == 0
                else probe.stderr
            )
        for t in threads:
            t.join(timeout=60)
        results["attempts"] = attempts
        results["rows_after_attacks"] = len(_metrics_rows(run_dir))
        results["alive_after_attacks"] = {n: p.poll() is None for n, p in procs.items()}

        # -- the end of the run ------------------------------------------------
        results["server_rc"] = server.wait(timeout=600)
        results["client_rc"] = {n: p.wait(timeout=60) for n, p in procs.items() if n != "server"}
        time.sleep(1)
        results["leftovers"] = _procs_mentioning(str(base))
        results["superlink_log"] = _log(base / "state" / "superlink.log")
        results["logs"] = {p.stem: _log(p) for p in logs.iterdir()}
        yield results
    finally:
        stop(list(procs.values()), str(base))
        relay.close()
        if ns is not None:
            ns.down()


def _explain(r: dict[str, Any]) -> str:
    return "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in r.get("logs", {}).items())


def test_training_completes_with_tls_and_node_auth_and_improves(tls_run: dict[str, Any]) -> None:
    assert tls_run["server_rc"] == 0, _explain(tls_run)
    rows = _metrics_rows(tls_run["run_dir"])
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
    assert all(r["clients"] >= 3 and r["dropped"] == 0 for r in rows), rows
    for f in ("config.toml", "metrics.csv", "model.safetensors", "summary.json", "plot.png"):
        assert (tls_run["run_dir"] / f).is_file(), f


def test_every_process_exits(tls_run: dict[str, Any]) -> None:
    assert tls_run["client_rc"] == {"client-1": 0, "client-2": 0, "client-3": 0, "frank": 0}, (
        _explain(tls_run)
    )
    assert tls_run["leftovers"] == []


def test_intruders_refused_while_the_others_train(tls_run: dict[str, Any]) -> None:
    a = tls_run["attempts"]
    assert a["plaintext"].startswith("unreachable"), (
        a
    )  # TLS-only port: a plaintext client never gets in
    assert a["other-ca"].startswith("refused: TLS"), a
    assert "does not admit this node" in a["never-admitted"], a
    assert "does not admit this node" in a["revoked"], a
    # the run was in progress during the attempts and kept all its clients
    assert tls_run["rows_before_attacks"] < ROUNDS, "the run ended before the attempts: not a test"
    assert all(tls_run["alive_after_attacks"].values()), tls_run["alive_after_attacks"]
    code, err = tls_run["cli-other-ca"]
    assert code == 3 and "refused" in err and "CA" in err, err


def test_admitted_keys_follow_the_file_while_serving(tls_run: dict[str, Any]) -> None:
    assert "does not admit this node" in tls_run["attempts"]["revoked-live"]
    out = tls_run["logs"]["server"]
    assert "admitted frank" in out and "revoked eve" in out, out
    rows = _metrics_rows(tls_run["run_dir"])
    assert max(r["clients"] for r in rows) == 4  # frank, added at run time, trained


def test_control_api_not_served_on_the_public_listener(tls_run: dict[str, Any]) -> None:
    assert tls_run["public-control-from-loopback"] == 403


def test_control_and_registration_refused_from_another_host(tls_run: dict[str, Any]) -> None:
    ns = tls_run["ns"]
    if ns is None:
        pytest.skip(
            "cannot create a network namespace here (needs root and iproute2); "
            "the guard's peer checks are covered in test_guard_polling.py"
        )
    r = tls_run["netns"]
    assert isinstance(r, dict), r
    for name in ("start-run", "register-node", "acquire-task"):
        assert r[name]["status"] == 403 and "forbidden" in r[name]["body"], (name, r)
    from flwr.supercore.error import ApiErrorCode

    assert r["fleet-register-node"]["code"] == ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED, r
    assert r["local-port"] == {"error": "ConnectError"}, r  # bound to 127.0.0.1 only
    assert f"from {ns.ns_ip}" in tls_run["superlink_log"]  # the guard saw the real peer address


def test_no_plaintext_model_on_the_wire(tls_run: dict[str, Any]) -> None:
    relay = tls_run["relay"]
    assert relay.connections > 0 and len(relay.data) > 20_000  # client-1's whole session
    assert needle() not in bytes(relay.data)
    assert b"\x16\x03" in bytes(relay.data[:16])  # it starts with a TLS handshake record


def test_insecure_needs_the_flag_on_both_sides_and_is_plaintext(tmp_path: Path) -> None:
    # one client: the plain exchange (secure aggregation needs >= 3 clients)
    cfg = _config(1, clients=1, min_clients=1, secagg=False)
    data = carve(cfg, tmp_path / "data")
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    port, local_port = free_port(), free_port()
    relay = Relay(("127.0.0.1", port))
    server = subprocess.Popen(
        [
            *CLI,
            "server",
            "--insecure",
            "--address",
            f"127.0.0.1:{port}",
            "--local-port",
            str(local_port),
            "--out",
            str(tmp_path / "run"),
            str(cfg_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        fed = provision(tmp_path / "fed", clients=1)
        # a TLS client cannot talk to a plaintext server
        tls = subprocess.run(
            [
                *CLI,
                "client",
                "--kit",
                str(fed.client_kit("client-1")),
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(data[0]),
                "--config",
                str(cfg_path),
                "--connect-timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tls.returncode == 3 and "TLS" in tls.stderr, tls.stderr
        client = subprocess.run(
            [
                *CLI,
                "client",
                "--insecure",
                "--server",
                f"127.0.0.1:{relay.port}",
                "--data",
                str(data[0]),
                "--config",
                str(cfg_path),
                "--once",
                "--connect-timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = server.communicate(timeout=120)[0].decode()
    finally:
        stop([server], str(tmp_path))
        relay.close()
    assert server.returncode == 0 and client.returncode == 0, (out, client.stdout, client.stderr)
    assert "WARNING: --insecure" in out and "WARNING: --insecure" in client.stderr
    assert needle() in bytes(relay.data)  # without TLS the model is readable on the wire


def test_stock_flower_supernodes_join_a_fedcore_server(tmp_path: Path) -> None:
    """Flower's deployment engine unchanged on the client side: flower-supernode + its kit."""
    # stock Flower SuperNodes run fedcore's ClientApp; 2 clients: the plain exchange
    cfg = _config(1, clients=2, min_clients=2, secagg=False)
    fed = provision(tmp_path / "fed", clients=2)
    data = carve(cfg, tmp_path / "data")
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    port, local_port = free_port(), free_port()
    bindir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    procs = [
        subprocess.Popen(
            [
                *CLI,
                "server",
                "--kit",
                str(fed.server_kit),
                "--address",
                f"127.0.0.1:{port}",
                "--local-port",
                str(local_port),
                "--out",
                str(tmp_path / "run"),
                str(cfg_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]
    try:
        for i in (1, 2):
            kit = fed.client_kit(f"client-{i}")
            procs.append(
                subprocess.Popen(
                    [
                        str(bindir / "flower-supernode"),
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--root-certificates",
                        str(kit / "ca.pem"),
                        "--auth-supernode-private-key",
                        str(kit / "identity.key"),
                        "--node-config",
                        f"data-path='{data[i - 1]}' client-config='{cfg_path}'",
                        "--port",
                        str(free_port()),
                    ],
                    env={**env, "FLWR_HOME": str(tmp_path / f"home-{i}")},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        out = procs[0].communicate(timeout=400)[0].decode()
    finally:
        stop(procs, str(tmp_path))
    assert procs[0].returncode == 0, out
    rows = _metrics_rows(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["clients"] == 2 and rows[0]["dropped"] == 0, rows
