"""docs/strategies.md is runnable: its user strategy trains under secure aggregation."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tomllib

import pytest

from fedcore.serverside.strategies import STRATEGIES

from .conftest import ROOT
from .docs_runner import blocks, run_page

DOC = ROOT / "docs" / "strategies.md"


def _blocks():
    return blocks(DOC)


def test_the_example_strategy_is_under_40_lines():
    files = {n: b for k, n, b in _blocks() if k == "file"}
    assert len(files["clipping.py"].strip().splitlines()) < 40


def test_the_table_lists_every_builtin_strategy():
    text = DOC.read_text()
    table = text[text.index("<!-- strategies:begin -->") : text.index("<!-- strategies:end -->")]
    names = re.findall(r"^\| `([a-z]+)` \|", table, re.M)
    assert sorted(names) == sorted(STRATEGIES)
    for name in names:
        row = next(r for r in table.splitlines() if r.startswith(f"| `{name}` |"))
        secure = "| yes |" in row
        assert secure == STRATEGIES.get(name).linear, row
        # the options column lists exactly the strategy's options, with their defaults
        options = row.rstrip(" |").rsplit("|", 1)[1]
        documented = dict(re.findall(r"`([a-z0-9-]+)` \(([^) ]+)", options))
        declared = {
            f.name.replace("_", "-"): str(f.default)
            for f in dataclasses.fields(STRATEGIES.get(name).Options)
        }
        assert documented == declared, name


@pytest.mark.slow
def test_user_strategy_example_runs_exactly_as_documented(tmp_path):
    printed = run_page(DOC, tmp_path)
    assert printed == ["[0.6, 0.8]"]
    run = tmp_path / "my-run"
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["strategy"]["name"] == "clipping:ClippedFedAvg"
    assert saved["secagg"]["enabled"] is True  # it trained under secure aggregation
    rows = json.loads((run / "metrics.json").read_text())
    assert len(rows) == 10 and all(r["clients"] == 10 for r in rows)
    assert rows[-1]["test_accuracy"] > 0.85  # measured: 0.9387 (plain FedAvg's steps, capped)


def test_a_bad_option_of_the_example_is_refused_naming_the_key(tmp_path):
    files = {n: b for k, n, b in _blocks() if k == "file"}
    (tmp_path / "clipping.py").write_text(files["clipping.py"])
    (tmp_path / "bad.toml").write_text(
        files["experiment.toml"].replace("max-norm = 1.0", "max-norm = -1.0")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", "bad.toml", "--out", "r"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'strategy.options.max-norm'" in proc.stderr and "must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
