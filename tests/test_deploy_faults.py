"""Deployment under faults, with real processes over loopback TLS.

One federation: 4 clients, 8 rounds, secure aggregation on (the default).

- client-4 dies (SIGKILL, a crash point inside its training, i.e. after it sent
  its secret shares) in the middle of round 2: the secure round completes with
  the other three (client-4's masks are removed with its key rebuilt from its
  neighbours' shares), the dead client's missing reply is logged with its id and
  stage, and client-4 restarted with the same kit takes part again in later rounds;
- the server is SIGKILLed after round 5 and restarted with ``--resume``: the
  clients (still running) re-join the restarted server on their own, and the run
  completes all 8 rounds from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedcore.core.config import to_toml
from fedcore.deploy.local import carve
from fedcore.deploy.provision import provision
from fedcore.engines.processes import free_port
from fedcore.serverside.checkpoint import load_checkpoint
from tests.procs import stop
from tests.test_deployment import CLI, _config, _metrics_rows, _wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc"),
]

ROUNDS = 24  # ~1 s a round; the restarted client-4 may wait 20 s for its old session to end


def test_killed_client_and_killed_server_recover(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", clients=["client-1", "client-2", "client-3", "client-4"])
    cfg = _config(ROUNDS, clients=4, min_clients=3).replace(
        round={"timeout": 12.0, "min-train-replies": 3},
        secagg={"stage-timeout": 12.0},
    )
    assert cfg.secagg.enabled
    data = carve(cfg, tmp_path / "data")
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    port, local_port = free_port(), free_port()
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    marker = f"fedcore-faults-{os.getpid()}-{port}"
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        with open(logs / f"{name}.log", "ab") as f:
            procs[name] = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "FEDCORE_TEST_MARKER": marker, **(env or {})},
            )
        return procs[name]

    def server(*extra: str) -> Any:
        return start(
            "server",
            [
                *CLI,
                "server",
                "--kit",
                str(fed.server_kit),
                "--address",
                f"127.0.0.1:{port}",
                "--local-port",
                str(local_port),
                *extra,
            ],
        )

    def client(i: int, env: dict[str, str] | None = None) -> Any:
        return start(
            f"client-{i}",
            [
                *CLI,
                "client",
                "--kit",
                str(fed.client_kit(f"client-{i}")),
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(data[i - 1]),
                "--config",
                str(cfg_path),
                "--connect-timeout",
                "120",
            ],
            env,
        )

    def rows() -> list[dict[str, Any]]:
        return _metrics_rows(run_dir)

    try:
        server("--out", str(run_dir), str(cfg_path))
        client(1)
        client(2)
        client(3)
        victim = client(4, {"FEDCORE_CRASH_AT": "client-train:2"})
        live = lambda: [p for n, p in procs.items() if n != "client-4"]  # noqa: E731

        # -- a client dies mid-round (after sending its shares) -----------------------
        _wait_for(lambda: victim.poll() is not None, 240, "client-4 to die in round 2", live())
        assert victim.returncode == -signal.SIGKILL
        _wait_for(lambda: len(rows()) >= 3, 240, "rounds 2 and 3 without client-4", live())
        assert rows()[0]["clients"] == 4
        assert rows()[1]["clients"] == 3 and rows()[1]["dropped"] >= 1
        assert rows()[1]["test_loss"] != rows()[0]["test_loss"]  # round 2 did aggregate
        client(4)  # restarted, same kit
        _wait_for(
            lambda: any(r["clients"] == 4 for r in rows()[3:]),
            240,
            "a round with the restarted client-4",
            list(procs.values()),
        )

        # -- the server dies; it resumes and the clients come back ------------------
        _wait_for(lambda: len(rows()) >= 5, 240, "round 5", list(procs.values()))
        os.killpg(procs["server"].pid, signal.SIGKILL)
        procs["server"].wait(timeout=30)
        done = load_checkpoint(run_dir).round
        assert 5 <= done < ROUNDS
        server("--resume", str(run_dir))
        _wait_for(
            lambda: procs["server"].poll() is not None,
            400,
            "the resumed run to end",
            [p for n, p in procs.items() if n != "server"],
        )
        assert procs["server"].returncode == 0, (logs / "server.log").read_text()[-3000:]
        final = rows()
        assert [r["round"] for r in final] == list(range(1, ROUNDS + 1))
        assert all(r["clients"] >= 3 for r in final[done:])
        assert load_checkpoint(run_dir).round == ROUNDS
        assert (run_dir / "model.safetensors").is_file()
        for i in (1, 2, 3, 4):
            text = (logs / f"client-{i}.log").read_text()
            assert "re-joined as node" in text, text[-2000:]
        server_log = (logs / "server.log").read_text()
        assert f"resuming {run_dir.resolve()} after round {done} of {ROUNDS}" in server_log
    finally:
        stop(list(procs.values()), marker)
