"""Each config key is declared once; validation, docs and pyproject's mirror come from it."""

from __future__ import annotations

import doctest
import shutil
import tomllib
import warnings
from dataclasses import fields

import pytest

import fedcore.core.config
import fedcore.core.keys
from fedcore.core.config import (
    DEPRECATED_KEYS,
    RESUME_MAY_CHANGE,
    SECTIONS,
    Config,
    FrozenMap,
    config_from_dict,
    config_from_flat,
    declared_keys,
    to_flat,
    to_toml,
)
from fedcore.core.errors import ConfigError
from fedcore.serverside.strategies import STRATEGIES
from fedcore.storage.config_docs import COMMAND, README_MARKERS, main, stale_files
from fedcore.storage.configfile import load_config

from .conftest import ROOT

# ------------------------------------------------------------------ generated files


def test_generated_table_and_pyproject_mirror_are_in_sync():
    stale = stale_files(ROOT)
    assert not stale, f"generated from fedcore/core/config.py and stale: {stale}; run `{COMMAND}`"


@pytest.fixture
def checkout(tmp_path):
    for rel in ("pyproject.toml", "simulations/README.md", "simulations/default.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def test_check_fails_when_stale_and_write_fixes_only_the_generated_part(checkout, capsys):
    readme = checkout / "simulations" / "README.md"
    pyproject = checkout / "pyproject.toml"
    before_readme, before_pyproject = readme.read_text(), pyproject.read_text()
    readme.write_text(before_readme.replace("| run | rounds |", "| run | roundz |"))
    pyproject.write_text(before_pyproject.replace("rounds = 20", "rounds = 21"))
    assert main(["--check", "--root", str(checkout)]) == 1
    err = capsys.readouterr().err
    assert COMMAND in err and "README.md" in err and "pyproject.toml" in err
    assert main(["--write", "--root", str(checkout)]) == 0
    assert readme.read_text() == before_readme
    assert pyproject.read_text() == before_pyproject
    assert main(["--check", "--root", str(checkout)]) == 0


def test_a_changed_default_toml_reaches_the_pyproject_mirror(checkout):
    default = checkout / "simulations" / "default.toml"
    default.write_text(default.read_text().replace("rounds = 20", "rounds = 7"))
    assert main(["--write", "--root", str(checkout)]) == 0
    project = tomllib.loads((checkout / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"]["run"]["rounds"] == 7
    assert project["project"]["name"] == "fedcore"  # the rest of the file is kept


def test_the_readme_table_has_a_row_for_every_key():
    text = (ROOT / "simulations" / "README.md").read_text()
    begin, end = README_MARKERS
    table = text[text.index(begin) : text.index(end)]
    for info in declared_keys():
        name = f"{info.name}.*" if info.is_table else info.name
        assert f"| {info.section} | {name} |" in table, info.dotted


# ------------------------------------------------------------------ declarations


def test_every_field_is_declared_with_one_line_of_help():
    for name, cls in SECTIONS.items():
        assert cls.section == name
        for f in fields(cls):
            help_text = f.metadata.get("help")
            assert help_text and "\n" not in help_text, f"{name}.{f.name} has no one-line help"
    assert [f.name for f in fields(Config)] == [*SECTIONS, "app"]  # [app]: free-form


def test_every_default_obeys_its_own_rule():
    for info in declared_keys():
        if info.rule is not None:
            assert info.rule.problem(info.default, info.kind) is None, info.dotted
        assert info.allowed().startswith("must be"), info.dotted


def test_rule_errors_say_what_is_allowed_and_what_the_key_is_for():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"round": {"retries": -1}})
    assert exc.value.key == "round.retries" and exc.value.value == -1
    assert "must be an integer >= 0" in str(exc.value) and "retries of a round" in str(exc.value)


def test_keys_that_may_change_on_resume_are_declared_on_the_field():
    assert {"round.timeout", "round.retries", "round.retry-backoff", "run.rounds"} <= (
        RESUME_MAY_CHANGE
    )
    assert "data.alpha" not in RESUME_MAY_CHANGE and "round.min-train-replies" not in (
        RESUME_MAY_CHANGE
    )


# ------------------------------------------------------------------ renamed keys

NEW_VALUES = {
    "round.timeout": 30.0,
    "round.min-available-clients": 3,
    "round.min-train-replies": 2,
    "round.retries": 5,
    "round.retry-backoff": 0.5,
}


def _attr(cfg: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name.replace("-", "_"))


@pytest.mark.parametrize(("old", "new"), sorted(DEPRECATED_KEYS.items()))
@pytest.mark.parametrize("form", ["nested", "flat", "replace"])
def test_old_key_still_works_with_one_warning_naming_the_new_key(old, new, form):
    value = NEW_VALUES[new]
    section, name = old.split(".")
    with pytest.warns(DeprecationWarning) as record:
        if form == "nested":
            cfg = config_from_dict({section: {name: value}})
        elif form == "flat":
            cfg = config_from_flat({old: value})
        else:
            cfg = Config().replace(**{section: {name: value}})
    messages = [str(w.message) for w in record if w.category is DeprecationWarning]
    assert messages == [f"config key '{old}' is deprecated; use '{new}'"]
    assert record[0].filename == __file__  # points at the caller, not at fedcore
    assert _attr(cfg, new) == value
    assert new in to_flat(cfg) and old not in to_flat(cfg)


@pytest.mark.parametrize(("old", "new"), sorted(DEPRECATED_KEYS.items()))
def test_old_and_new_key_together_are_refused(old, new):
    value = NEW_VALUES[new]
    old_section, old_name = old.split(".")
    new_section, new_name = new.split(".")
    for attempt in (
        lambda: config_from_dict({old_section: {old_name: value}, new_section: {new_name: value}}),
        lambda: config_from_flat({old: value, new: value}),
        lambda: Config().replace(
            **{old_section: {old_name: value}, new_section: {new_name: value}}
        ),
    ):
        with pytest.raises(ConfigError) as exc:
            attempt()
        assert exc.value.key == old and f"keep only '{new}'" in str(exc.value)


def test_shipped_configs_use_the_new_spelling():
    for path in (ROOT / "simulations").glob("*.toml"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            load_config(path)


# ------------------------------------------------------------------ did you mean


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        ({"run": {"roundz": 3}}, "run.roundz", "did you mean 'run.rounds'?"),
        ({"rnu": {"rounds": 3}}, "rnu", "did you mean 'run'?"),
        ({"secagg": {"neighbors": 4}}, "secagg.neighbors", "did you mean 'secagg.neighbours'?"),
        ({"strategy": {"timeout": 5.0}}, "strategy.timeout", "did you mean 'round.timeout'?"),
        (
            {"strategy": {"round-timout": 5.0}},
            "strategy.round-timout",
            "did you mean 'round.timeout'?",
        ),
        ({"data": {"partition": "dirichet"}}, "data.partition", "did you mean 'dirichlet'?"),
    ],
)
def test_near_misses_get_did_you_mean(raw, key, hint):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert exc.value.key == key
    assert hint in str(exc.value)


def test_a_far_miss_gets_no_guess():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"run": {"zzzzzz": 1}})
    assert "did you mean" not in str(exc.value) and "[run] accepts" in str(exc.value)


# ------------------------------------------------------------------ [strategy]


def test_strategy_options_is_a_free_form_table_of_scalars():
    cfg = config_from_dict({"strategy": {"options": {"mu": 0.1, "momentum": True, "tag": "x"}}})
    assert isinstance(cfg.strategy.options, FrozenMap)
    assert dict(cfg.strategy.options) == {"mu": 0.1, "momentum": True, "tag": "x"}
    flat = to_flat(cfg)
    assert flat["strategy.options.mu"] == 0.1
    assert config_from_flat(flat) == cfg and hash(config_from_flat(flat)) == hash(cfg)
    assert config_from_flat({"strategy.options.beta": 2}).strategy.options["beta"] == 2
    assert Config().strategy.options == {}


def test_strategy_options_refuse_non_scalars():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"strategy": {"options": {"betas": [0.9, 0.99]}}})
    assert exc.value.key == "strategy.options.betas" and "booleans, numbers" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"strategy": {"options": 3}})
    assert exc.value.key == "strategy.options"


@pytest.mark.parametrize("name", [*STRATEGIES, "my_pkg.strategies:Mine"])
def test_strategy_name_is_a_builtin_or_an_import_path(name):
    assert config_from_dict({"strategy": {"name": name}}).strategy.name == name


@pytest.mark.parametrize("name", ["", "Fed Avg", "pkg.mod:", ":Cls"])
def test_malformed_strategy_names_are_refused_by_the_config(name):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"strategy": {"name": name}})
    assert exc.value.key == "strategy.name"
    assert "docs/strategies.md" in str(exc.value) and "import path" in str(exc.value)


def test_an_unknown_strategy_name_is_refused_before_the_run_listing_the_builtins():
    """Which names exist is declared once, by the registry; the run's preflight asks it."""
    from fedcore.runtime.serve import build_strategy

    with pytest.raises(ConfigError) as exc:
        build_strategy(config_from_dict({"strategy": {"name": "fedadamm"}}))
    assert exc.value.key == "strategy.name"
    assert ", ".join(STRATEGIES) in str(exc.value) and "did you mean 'fedadam'?" in str(exc.value)


# ------------------------------------------------------------------ TOML writer


def test_to_toml_loads_back_identically(tmp_path):
    cfg = config_from_dict(
        {
            "run": {"seed": 7, "out-dir": 'odd "dir" \\ with ünïcode'},
            "model": {"factory": "mlp", "kwargs": {"hidden": 16, "bias": False}},
            "strategy": {"name": "fedadam", "options": {"eta": 0.01, "note": "a\nb"}},
            "round": {"timeout": 1e-3, "retries": 0},
            "secagg": {"clip": 0.1 + 0.2},
        }
    )
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg
    assert load_config(path).secagg.clip == 0.1 + 0.2  # floats are written exactly
    assert tomllib.loads(to_toml(Config()))["round"]["timeout"] == 600.0


@pytest.mark.parametrize("module", [fedcore.core.config, fedcore.core.keys])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
