"""`fedcore server` pieces without processes: the app bundle, kit checks, admission sync."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest

from fedcore.core.config import config_from_dict, config_from_flat
from fedcore.core.errors import DeploymentError
from fedcore.deploy.provision import add_client, provision, revoke
from fedcore.deploy.server import Admission, build_fab, check_kit


def test_fab_carries_the_apps_and_the_whole_config() -> None:
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supercore.run import Run

    cfg = config_from_dict({"run": {"rounds": 4, "seed": 9}, "deploy": {"run-dir": "/tmp/x"}})
    fab = build_fab(cfg)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server/app.py", "clients/app.py", "pyproject.toml"} <= set(names)
    assert not any(n.startswith("fedcore/") for n in names)  # the library is not shipped
    run_config = get_fused_config_from_fab(fab, Run.create_empty(1))
    assert config_from_flat(run_config) == cfg


def test_check_kit_refuses_readable_keys_and_missing_files(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", clients=1)
    check_kit(fed.server_kit)
    os.chmod(fed.server_kit / "server.key", 0o644)
    with pytest.raises(DeploymentError, match="chmod 600"):
        check_kit(fed.server_kit)
    with pytest.raises(DeploymentError, match="server kit"):
        check_kit(fed.client_kit("client-1"))


class _Control:
    """Records Control API calls; refuses a key registered before, like Flower's LinkState."""

    def __init__(self) -> None:
        self.nodes: dict[int, bytes] = {}
        self.ever: set[bytes] = set()

    def RegisterNode(self, req: Any) -> Any:  # noqa: N802 - Flower's method name
        if req.public_key in self.ever:
            raise RuntimeError("public key already in use")
        self.ever.add(req.public_key)
        node_id = len(self.ever)
        self.nodes[node_id] = req.public_key
        return type("R", (), {"node_id": node_id})()

    def UnregisterNode(self, req: Any) -> None:  # noqa: N802
        del self.nodes[req.node_id]


def test_admission_follows_the_file(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", clients=2)
    control = _Control()
    adm = Admission(control, fed.admitted)
    assert sorted(adm.sync_if_changed()) == ["admitted client-1", "admitted client-2"]
    assert adm.sync_if_changed() == []  # unchanged file: no calls
    before = fed.admitted.read_text()
    add_client(fed.root, "c3")
    revoke(fed.root, "client-1")
    assert sorted(adm.sync()) == ["admitted c3", "revoked client-1"]
    assert len(control.nodes) == 2
    # Flower keeps a revoked key taken: restoring the old file cannot re-admit it
    fed.admitted.write_text(before)
    changes = adm.sync()
    assert "revoked c3" in changes and any("not re-admitting client-1" in c for c in changes)
    assert adm.sync() == []  # said once
    add_client(fed.root, "client-1", force=True)  # a rotated key is admitted
    assert "admitted client-1" in adm.sync()
