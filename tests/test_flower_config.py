"""pyproject's ``[tool.flwr.app.config]`` is simulations/default.toml in Flower's flat form.

The tables are generated (``python -m fedcore.storage.config_docs --write``); this checks the
result the way Flower reads it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from flwr.common.config import flatten_dict

from fedcore.core.config import config_from_flat, to_flat
from fedcore.storage.configfile import load_config

ROOT = Path(__file__).resolve().parent.parent


def _app_config() -> dict:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    # Flower flattens the nested tables exactly like this before handing them to the apps.
    return flatten_dict(project["tool"]["flwr"]["app"]["config"])


def test_app_config_is_the_flattened_default_toml():
    expected = to_flat(load_config(ROOT / "simulations" / "default.toml"))
    found = _app_config()
    differing = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    assert found == expected, (
        "pyproject.toml [tool.flwr.app.config] drifted from simulations/default.toml; "
        f"differing keys: {differing}; run `python -m fedcore.storage.config_docs --write`"
    )
    # same types too (Flower's run config keeps int/float/bool/str apart)
    assert {k: type(v) for k, v in found.items()} == {k: type(v) for k, v in expected.items()}


def test_app_config_parses_back_to_the_default_config():
    assert config_from_flat(_app_config()) == load_config(ROOT / "simulations" / "default.toml")
