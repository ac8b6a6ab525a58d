"""Secure aggregation on Flower's Ray simulation engine (the same ClientApp, Flower's Grid)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_secure_rounds_on_the_ray_engine():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "apps" / "ray_secagg.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RAYCHECK ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    rounds = json.loads(lines[-1].removeprefix("RAYCHECK "))
    for rnd in ("1", "2"):
        assert rounds[rnd]["ok"] and rounds[rnd]["clients"] == 4 and rounds[rnd]["rejected"] == []
    assert rounds["1"]["examples"] == rounds["2"]["examples"] > 0
    assert rounds["2"]["loss"]["train_loss"] < rounds["1"]["loss"]["train_loss"]
