"""docs/custom-models.md is runnable: write its files, run its commands, check the run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

DOC = ROOT / "docs" / "custom-models.md"
BLOCK = re.compile(r"<!-- (file: (?P<name>\S+)|run|run-python) -->\n```\w*\n(?P<body>.*?)```", re.S)


def _blocks():
    for m in BLOCK.finditer(DOC.read_text()):
        kind = "file" if m["name"] else m.group(1)
        yield kind, m["name"], m["body"]


def test_doc_has_the_example_files_and_commands():
    kinds = [(k, n) for k, n, _ in _blocks()]
    assert ("file", "mynets.py") in kinds and ("file", "experiment.toml") in kinds
    assert any(k == "run" for k, _ in kinds) and any(k == "run-python" for k, _ in kinds)


def test_custom_model_example_runs_exactly_as_documented(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}  # only what the doc promises may be importable
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    for kind, name, body in _blocks():
        if kind == "file":
            (tmp_path / name).write_text(body)
        elif kind == "run":
            for line in body.strip().splitlines():
                argv = shlex.split(line)
                argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
                proc = subprocess.run(
                    argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
                )
                assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        else:
            proc = subprocess.run(
                [sys.executable, "-c", body],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr
            assert "loaded" in proc.stdout
    run = tmp_path / "my-run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_accuracy"] > 0.8  # three well-separated blobs
    rows = json.loads((run / "metrics.json").read_text())
    assert len(rows) == 5 and all(r["clients"] == 6 for r in rows)
