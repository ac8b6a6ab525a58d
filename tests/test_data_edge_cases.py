"""Users' data files at the edges: labels not 0..C-1, empty classes, non-numeric CSV cells.

And the deployment server's own data: how many rows it evaluates on, as
docs/deployment.md says (its example is run here).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import numpy as np
import pytest

from fedcore.clientside.data import holdout, label_warnings, load_file
from fedcore.core.config import config_from_dict
from fedcore.core.errors import DataError
from fedcore.runtime.diagnostics import server_data_line

from .conftest import ROOT
from .docs_runner import blocks


def _npz(path, y, features=3):
    y = np.asarray(y)
    np.savez(path, x=np.zeros((len(y), features), np.float32), y=y)
    return path


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------- labels
def test_labels_starting_at_one_are_warned_about_with_the_fix(tmp_path, caplog):
    path = _npz(tmp_path / "d.npz", [1, 2, 2, 1, 1])
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        data = load_file(path)
    assert data.num_classes == 3  # what was silently assumed before; now it is said
    (w,) = _warnings(caplog)
    assert str(path) in w and "labels start at 1, not 0" in w and "class 0 has no examples" in w
    assert "3 classes are assumed" in w and "subtract 1" in w and "data.num-classes" in w


def test_an_empty_class_in_the_middle_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        load_file(_npz(tmp_path / "d.npz", [0, 3, 0, 3, 1]))
    (w,) = _warnings(caplog)
    assert "class(es) 2 of 0..3 have no examples" in w and "4 outputs" in w


def test_labels_0_to_c_minus_1_or_a_fixed_class_count_give_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        load_file(_npz(tmp_path / "a.npz", [0, 1, 2, 1]))
        # a client's file may lack classes when data.num-classes fixes the count
        assert load_file(_npz(tmp_path / "b.npz", [1, 2]), num_classes=5).num_classes == 5
    assert _warnings(caplog) == []


def test_label_warnings_lists_every_problem():
    assert label_warnings(np.array([0, 1]), 2, "f") == []
    starts, empty = label_warnings(np.array([2, 4, 4]), 5, "f")
    assert "classes 0..1 have no examples" in starts and "class(es) 3 of 0..4" in empty


def test_string_labels_get_the_hint_to_encode_them(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros((3, 2), np.float32), y=np.array(["cat", "dog", "cat"]))
    with pytest.raises(DataError) as err:
        load_file(path)
    msg = str(err.value)
    assert "labels must be integers 0..C-1" in msg and "'cat'" in msg
    assert "np.unique(labels, return_inverse=True)" in msg


def test_fractional_labels_are_named(tmp_path):
    with pytest.raises(DataError, match=r"found 1\.5 .*encode the labels"):
        load_file(_npz(tmp_path / "f.npz", [0.0, 1.5, 1.0]))


# ----------------------------------------------------------------- CSV cells
def _csv(tmp_path, text):
    path = tmp_path / "d.csv"
    path.write_text(text)
    return path


def test_a_non_numeric_feature_cell_names_its_column_row_and_value(tmp_path):
    path = _csv(tmp_path, "age,city,label\n31,7,0\n40,Paris,1\n")
    with pytest.raises(DataError) as err:
        load_file(path)
    msg = str(err.value)
    assert f"{path}:3: column 'city' (column 2) has value 'Paris'" in msg
    assert "features must be numbers" in msg


def test_a_string_label_column_gets_the_hint_to_encode_it(tmp_path):
    path = _csv(tmp_path, "a,b,species\n1,2,setosa\n")
    with pytest.raises(DataError) as err:
        load_file(path, label_column="species")
    msg = str(err.value)
    assert "column 'species' (column 3) has value 'setosa'" in msg
    assert "labels must be integers 0..C-1" in msg and "return_inverse=True" in msg


# ----------------------------------------------------------------- the server's own data
def test_the_server_line_says_how_many_rows_it_evaluates_on_and_why(tmp_path):
    path = _npz(tmp_path / "server.npz", np.arange(114) % 2)
    cfg = config_from_dict({"data": {"source": "file", "path": str(path)}})
    train, test = holdout(cfg.data, seed=cfg.run.seed)
    assert len(test) == 23  # round(114 * 0.2): the deployment the issue tried
    line = server_data_line(cfg, len(train) + len(test), len(test))
    assert line.startswith("the server evaluates the global model on 23 of the 114 example(s)")
    assert f"data.path = {path}" in line and "data.test-fraction = 0.2" in line


def test_the_documented_server_data_example_prints_what_the_doc_says(tmp_path):
    doc = ROOT / "docs" / "deployment.md"
    section = doc.read_text().split("### What the server reports", 1)[1].split("\n### ", 1)[0]
    (code,) = [b for kind, _, b in blocks(doc) if kind == "run-python" and b in section]
    after = section.split(code, 1)[1].split("```", 1)[1]  # past the code block's fence
    shown = re.search(r"```\n(.*?)```", after, re.S)[1].strip()  # the block it "prints"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == shown
