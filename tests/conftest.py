"""Shared fixtures: quiet Flower, a Message-ready process, small configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
if str(ROOT) not in sys.path:  # tests.apps.* must import in engine workers too
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Flower's Message() reads the process's task identity; set one like a ServerApp has."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1


@pytest.fixture
def small_config():
    """A config that trains in a second or two: synthetic data, an MLP, 4 clients."""
    from fedcore.core.config import config_from_dict

    return config_from_dict(
        {
            "run": {"seed": 7, "rounds": 3, "clients": 4, "centralized-baseline": False},
            "data": {
                "source": "synthetic",
                "synthetic-examples": 600,
                "synthetic-classes": 3,
                "partition": "iid",
            },
            "model": {"factory": "mlp", "kwargs": {"hidden": 32}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            "engine": {"workers": 2},
        }
    )
