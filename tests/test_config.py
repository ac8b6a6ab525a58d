"""Config validation: every bad value stops with the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.core.config import (
    DEPRECATED_KEYS,
    SECTIONS,
    Config,
    config_from_dict,
    config_from_flat,
    declared_keys,
    to_flat,
    to_toml,
)
from fedcore.core.errors import ConfigError
from fedcore.storage.configfile import load_config

from .conftest import ROOT


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"run": {"roundz": 3}}, "run.roundz", "unknown key"),
        ({"colour": {}}, "colour", "unknown section"),
        ({"run": {"rounds": "3"}}, "run.rounds", "must be an integer"),
        ({"run": {"rounds": 2.5}}, "run.rounds", "must be an integer"),
        ({"run": {"rounds": True}}, "run.rounds", "must be an integer"),
        ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
        ({"data": {"alpha": 0}}, "data.alpha", "must be > 0"),
        ({"data": {"alpha": -1.5}}, "data.alpha", "must be > 0"),
        ({"data": {"partition": "random"}}, "data.partition", "iid, dirichlet, shards"),
        ({"data": {"source": "file"}}, "data.path", "needs data.path"),
        ({"data": {"test-fraction": 1.0}}, "data.test-fraction", "between 0 and 1"),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer", "sgd, adam"),
        ({"strategy": {"fraction-train": 1.5}}, "strategy.fraction-train", "[0, 1]"),
        (
            {"run": {"clients": 3}, "round": {"min-available-clients": 5}},
            "round.min-available-clients",
            "<= run.clients",
        ),
        ({"model": {"kwargs": {"hidden": [1, 2]}}}, "model.kwargs.hidden", "booleans, numbers"),
        ({"model": {"train-fn": "no_colon"}}, "model.train-fn", "import path"),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, key, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert key in str(info.value)


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.run.rounds = 5  # type: ignore[misc]


def test_flat_and_toml_round_trip():
    cfg = config_from_dict(
        {"run": {"seed": 3}, "model": {"factory": "mlp", "kwargs": {"hidden": 16, "depth": 1}}}
    )
    assert config_from_flat(to_flat(cfg)) == cfg
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg
    assert to_flat(cfg)["model.kwargs.hidden"] == 16
    assert hash(cfg) == hash(config_from_flat(to_flat(cfg)))


def test_default_toml_loads_and_matches_issue_defaults():
    cfg = load_config(ROOT / "simulations" / "default.toml")
    assert (cfg.data.source, cfg.model.factory, cfg.run.clients) == ("digits", "cnn", 10)
    assert (cfg.data.partition, cfg.data.alpha, cfg.run.rounds) == ("dirichlet", 0.5, 20)


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def _simulate(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[data]\nalpha = 0.0\n", "data.alpha"),
        ("[run]\nclients = 5000\n", "run.clients"),
        ('[model]\nfactory = "nosuchpkg.nets:make"\n', "model.factory"),
        ('[model]\nfactory = "tests.apps.badmodels:wrong_classes"\n', "model.factory"),
        ("[run]\nroundz = 1\n", "run.roundz"),
    ],
)
def test_cli_stops_before_training_with_one_message(tmp_path, toml, key):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    proc = _simulate(str(cfg), "--out", str(tmp_path / "run"), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedcore: error:")]
    assert len(lines) == 1 and f"'{key}'" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_every_shipped_simulation_config_is_valid():
    for path in (ROOT / "simulations").glob("*.toml"):
        load_config(path)


# ------------------------------------------------------------------ fuzzer
#
# Raw configs drawn at random, each judged by an oracle written here from the key
# declarations (type and rule per key, renamed keys, unknown names): a config with
# any bad value must be refused naming one of its bad keys (and the value found
# there); a config with none must be accepted and read back value for value.

#: Keys that a rule spanning several keys reads (``cross_check``, ``Config.validate``).
#: The fuzzer gives them only values of the wrong type, refused before any such rule;
#: their cross-key rules have their own tests above and in test_secagg_app.py.
CROSS_KEYS = frozenset(
    {
        "run.clients",
        "data.source",
        "data.path",
        "train.lr",
        "train.min-lr",
        "train.max-lr",
        "train.local-epochs",
        "train.max-local-epochs",
        "train.batch-size",
        "train.max-batch-size",
        "round.min-available-clients",
        "strategy.min-train-clients",
        "secagg.enabled",
        "secagg.neighbours",
        "secagg.threshold",
        "secagg.bits",
        "secagg.ring-bits",
    }
)
_INFOS = {info.dotted: info for info in declared_keys()}


def _type_ok(kind, value) -> bool:
    """The oracle's own type rule: an int is a float, a bool is neither."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: number,
        str: isinstance(value, str),
    }[kind]


def _is_scalar(value) -> bool:
    return isinstance(value, bool | int | float | str)


_scalar = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([2**31, 2**63, -(2**40)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.5, 1e-7, 11.0]),
    st.text(max_size=6),
    st.sampled_from(["", "iid", "dirichet", "sgd", "adam", "mlp", "pkg.mod:fn", "no_colon"]),
    st.booleans(),
)
_value = st.one_of(
    _scalar,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), _scalar, max_size=2),
)


def _typed(info):
    """Any value of the key's type: it passes the type check and meets the key's rule,
    which may refuse it."""
    return {
        bool: st.booleans(),
        int: st.one_of(st.integers(-3, 70), st.sampled_from([2**31, -(2**40)])),
        float: st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.5, 1e-7, 11.0]),
            st.integers(-3, 3),
        ),
        str: st.one_of(
            st.text(max_size=6),
            st.sampled_from(["", "iid", "dirichet", "sgd", "mlp", "pkg.mod:fn", "no_colon"]),
        ),
    }[info.kind]


def _choices(info):
    choices = getattr(info.rule, "choices", ())
    return st.sampled_from(choices) if choices else st.nothing()


def _near(info):
    """Values around the key's default: mostly allowed, sometimes just outside."""
    d = info.default
    if info.kind is bool:
        return st.booleans()
    if info.kind is int:
        return st.integers(0, 3).map(lambda k: d + k)
    if info.kind is float:
        return st.sampled_from([0.5, 1.0, 1.5, 2.0]).map(lambda k: d * k)
    return st.just(d)


@st.composite
def _raw_configs(draw):
    raw = {}
    sections = st.sampled_from([*SECTIONS, *SECTIONS, *SECTIONS, "nope"])
    for section in draw(st.lists(sections, unique=True, max_size=3)):
        if draw(st.sampled_from(range(20))) == 19:  # a section that is not a table
            raw[section] = draw(_scalar)
            continue
        names = [i.name for i in _INFOS.values() if i.section == section]
        names += [old.split(".")[1] for old in DEPRECATED_KEYS if old.startswith(section + ".")]
        if not names or draw(st.sampled_from(range(5))) == 4:
            names.append("bogus")
        table = {}
        for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=3)):
            dotted = DEPRECATED_KEYS.get(f"{section}.{name}", f"{section}.{name}")
            info = _INFOS.get(dotted)
            if info is None:
                value = draw(_value)
            elif info.is_table:
                tables = st.dictionaries(st.text(max_size=4), _scalar, max_size=3)
                nested = st.dictionaries(
                    st.text(min_size=1, max_size=4),
                    st.one_of(st.lists(st.integers(), max_size=2), st.just({"x": 1})),
                    min_size=1,
                    max_size=2,
                )
                mixed = st.tuples(tables, nested).map(lambda ab: {**ab[0], **ab[1]})
                # (an explicit pick: st.one_of flattens nested one_ofs, so its branches
                # would be the scalars' seven and the tables' two)
                pick = draw(st.sampled_from(["table", "table", "mixed", "scalar"]))
                value = draw({"table": tables, "mixed": mixed, "scalar": _scalar}[pick])
            elif dotted in CROSS_KEYS:
                if draw(st.sampled_from(range(6))):
                    continue  # mostly left out: every value drawn for it is bad
                value = draw(_value.filter(lambda v, kind=info.kind: not _type_ok(kind, v)))
            else:
                pick = draw(st.sampled_from(["default", "choice", "near", "typed", "any"]))
                if pick == "choice" and not getattr(info.rule, "choices", ()):
                    pick = "near"
                value = draw(
                    {
                        "default": st.just(info.default),
                        "choice": _choices(info),
                        "near": _near(info),
                        "typed": _typed(info),
                        "any": _value,
                    }[pick]
                )
            table[name] = value
        raw[section] = table
    for old, new in DEPRECATED_KEYS.items():  # old and new spelling together, sometimes
        old_section, old_name = old.split(".")
        new_section, new_name = new.split(".")
        table = raw.get(old_section)
        if isinstance(table, dict) and old_name in table and draw(st.booleans()):
            target = raw.setdefault(new_section, {})
            if isinstance(target, dict):
                target[new_name] = table[old_name]
    return raw


def _judge(raw):
    """``(bad, good)``: every key the loader must be able to name, and, if there is
    none, each given value by its (new) dotted key as the config must hold it."""
    bad: dict[str, object] = {}
    good: dict[str, object] = {}
    for section, table in raw.items():
        if section not in SECTIONS or not isinstance(table, dict):
            bad[section] = table
            continue
        for name, value in table.items():
            dotted = f"{section}.{name}"
            new = DEPRECATED_KEYS.get(dotted)
            if new is not None:
                new_section, new_name = new.split(".")
                target = raw.get(new_section, {})
                if not isinstance(target, dict):
                    continue  # the new section is bad itself (named above or below)
                if new_name in target:
                    bad[dotted] = value  # old and new spelling together
                    continue
                dotted = new
            info = _INFOS.get(dotted)
            if info is None:
                bad[dotted] = value  # unknown key
            elif info.is_table:
                if not isinstance(value, dict):
                    bad[dotted] = value
                else:
                    bad.update({f"{dotted}.{k}": v for k, v in value.items() if not _is_scalar(v)})
                    good[dotted] = dict(value)
            elif not _type_ok(info.kind, value):
                bad[dotted] = value
            else:
                value = float(value) if info.kind is float else value
                if info.rule is not None and not info.rule.ok(value):
                    bad[dotted] = value
                else:
                    good[dotted] = value
    return bad, good


def _same(a, b) -> bool:
    return a is b or a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _check(raw) -> bool:
    """Run the loader on ``raw`` and hold it to the oracle; whether it had a bad key."""
    bad, good = _judge(raw)
    if bad:
        with pytest.raises(ConfigError) as exc:
            config_from_dict(raw)
        err = exc.value
        assert err.key in bad, f"refused naming {err.key!r}; the bad keys are {sorted(bad)}"
        assert str(err).startswith(f"config key '{err.key}' has value ")
        assert _same(err.value, bad[err.key]), (err.value, bad[err.key])
        return True
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        pytest.fail(
            f"refused a config the oracle accepts ({exc}); if a new rule spans keys, "
            "add them to CROSS_KEYS"
        )
    for dotted, value in good.items():
        info = _INFOS[dotted]
        held = getattr(getattr(cfg, info.section), info.attr)
        assert _same(held, value), (dotted, held, value)
        assert info.is_table or type(held) is info.kind, (dotted, held)
    return False


@pytest.mark.property
@pytest.mark.filterwarnings("ignore:config key .* is deprecated:DeprecationWarning")
def test_fuzzed_configs_are_refused_naming_a_bad_key_or_accepted_as_given():
    verdicts: list[bool] = []

    @settings(max_examples=250, deadline=None, derandomize=True)
    @given(_raw_configs())
    def fuzz(raw):
        verdicts.append(_check(raw))

    fuzz()
    # both branches ran often: the generator is not lopsided
    assert 40 <= sum(verdicts) <= len(verdicts) - 40, (sum(verdicts), len(verdicts))
