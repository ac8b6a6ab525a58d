"""docs/custom-models.md is runnable: write its files, run its commands, check the run."""

from __future__ import annotations

import json

from .conftest import ROOT
from .docs_runner import blocks, run_page

DOC = ROOT / "docs" / "custom-models.md"


def test_doc_has_the_example_files_and_commands():
    kinds = [(k, n) for k, n, _ in blocks(DOC)]
    assert ("file", "mynets.py") in kinds and ("file", "experiment.toml") in kinds
    assert any(k == "run" for k, _ in kinds) and any(k == "run-python" for k, _ in kinds)


def test_custom_model_example_runs_exactly_as_documented(tmp_path):
    printed = run_page(DOC, tmp_path)
    assert printed and all("loaded" in out for out in printed)
    run = tmp_path / "my-run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_accuracy"] > 0.8  # three well-separated blobs
    rows = json.loads((run / "metrics.json").read_text())
    assert len(rows) == 5 and all(r["clients"] == 6 for r in rows)
