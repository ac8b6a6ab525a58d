"""Config rules, as a section declares them: each rule's edges and its words.

The built-in sections build their rules once, at import, so mutation testing found the
rule builders of ``fedcore.core.keys`` unchecked by the config tests. Here each rule is
built the way a section declares it (``key(..., rule=...)``, as in the module docstring)
and checked at its boundaries, on values of the wrong type, and for the text a user
reads when a value is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fedcore.core.errors import ConfigError
from fedcore.core.keys import (
    FrozenMap,
    Section,
    at_least,
    check_value_type,
    close_match,
    greater_than,
    identifier_or_import_path,
    import_path_or_empty,
    in_range,
    key,
    key_infos,
    non_empty,
    one_of,
    zero_or_at_least,
)

INF, NAN = float("inf"), float("nan")


def _declare():
    """A section declared as the module docstring does; built inside each test (the
    rules and keys are made when the class is, which must happen under test)."""

    @dataclass(frozen=True)
    class Demo(Section):
        section = "demo"
        rounds: int = key(20, help="federated rounds", rule=at_least(1))
        name: str = key("fedavg", help="a strategy", choices=("fedavg", "fedprox"))
        deadline: float = key(60.0, help="seconds", rule=greater_than(0), resume_may_change=True)
        opts: FrozenMap = key(FrozenMap(), help="free options")

    return Demo


def _refusal(**values):
    with pytest.raises(ConfigError) as info:
        _declare()(**values).validate()
    return str(info.value)


def test_a_declared_section_keeps_defaults_help_and_flags():
    Demo = _declare()
    assert Demo().rounds == 20 and Demo().name == "fedavg" and Demo().deadline == 60.0
    infos = {i.name: i for i in key_infos(Demo)}
    assert infos["rounds"].default == 20 and infos["rounds"].help == "federated rounds"
    assert infos["rounds"].resume_may_change is False  # the default: it changes the model
    assert infos["deadline"].resume_may_change is True
    Demo(name="fedprox").validate()
    assert _refusal(deadline=0.0).startswith(
        "config key 'demo.deadline' has value 0.0: must be > 0"
    )


def test_choices_are_a_one_of_rule_with_a_did_you_mean():
    assert _refusal(name="fedprx") == (
        "config key 'demo.name' has value 'fedprx': must be one of fedavg, fedprox; "
        "did you mean 'fedprox'? (a strategy)"
    )
    assert _refusal(name="zzz") == (
        "config key 'demo.name' has value 'zzz': must be one of fedavg, fedprox (a strategy)"
    )


def test_rule_and_choices_together_are_a_declaration_error():
    with pytest.raises(TypeError, match="^give rule or choices, not both$"):
        key(1, help="x", rule=at_least(0), choices=(1, 2))


def test_the_docstring_example_refusal():
    assert _refusal(rounds=0) == (
        "config key 'demo.rounds' has value 0: must be an integer >= 1 (federated rounds)"
    )


@pytest.mark.parametrize(
    ("make", "good", "bad", "kind", "words"),
    [
        (
            lambda: at_least(1),
            [1, 1.0, 5],
            [0, 0.9, INF, NAN, "2", True],
            int,
            "must be an integer >= 1",
        ),
        (lambda: at_least(0, finite=False), [0, INF], [-1, NAN, "x"], float, "must be >= 0"),
        (lambda: greater_than(0), [1e-9, 3], [0, -1, INF, NAN, "1", None], float, "must be > 0"),
        (lambda: greater_than(0.5, finite=False), [0.6, INF], [0.5, "x"], float, "must be > 0.5"),
        (lambda: greater_than(2), [3], [2], int, "must be an integer > 2"),
    ],
)
def test_comparisons(make, good, bad, kind, words):
    rule = make()  # built under test, as a section declaration would
    assert all(rule.ok(v) for v in good)
    assert not any(rule.ok(v) for v in bad)
    assert rule.allowed(kind) == words
    assert rule.problem(good[0], kind) is None and rule.problem(bad[0], kind) == words


@pytest.mark.parametrize(
    ("open_", "good", "bad", "words"),
    [
        ("", [0, 0.5, 1], [-0.1, 1.1], "must be in [0, 1]"),
        ("low", [0.5, 1], [0, 1.1], "must be in (0, 1]"),
        ("high", [0, 0.5], [1, -0.1], "must be in [0, 1)"),
        ("both", [0.5], [0, 1], "must be strictly between 0 and 1"),
    ],
)
def test_ranges_at_their_ends(open_, good, bad, words):
    rule = in_range(0, 1, open=open_)
    assert all(rule.ok(v) for v in good)
    assert not any(rule.ok(v) for v in [*bad, INF, -INF, NAN, "0.5", None, True])
    assert rule.allowed(float) == words


def test_integer_ranges_say_integer():
    assert in_range(1, 9, open="both").allowed(int) == "must be an integer strictly between 1 and 9"
    assert in_range(1, 9).allowed(int) == "must be an integer in [1, 9]"


def test_an_unknown_open_end_is_a_declaration_error():
    with pytest.raises(ValueError, match=r"^open must be '', 'low', 'high' or 'both', not 'left'$"):
        in_range(0, 1, open="left")


def test_one_of_matches_value_and_type():
    rule = one_of(1, "a")
    assert rule.ok(1) and rule.ok("a")
    assert not rule.ok(True) and not rule.ok(1.0) and not rule.ok("b")
    assert rule.allowed(int) == "must be one of 1, a"


def test_close_match_picks_the_closest_candidate_or_none():
    assert close_match("fedprx", ["fedavg", "fedprox", "fedadam"]) == "fedprox"
    assert close_match("zzzz", ["fedavg", "fedprox"]) is None


def test_zero_means_auto_else_at_least_the_bound():
    rule = zero_or_at_least(2)
    assert rule.ok(0) and rule.ok(2) and rule.ok(7)
    assert not any(rule.ok(v) for v in [1, -1, "0", "x", None])
    assert rule.allowed(int) == "must be 0 (auto) or an integer >= 2"


def test_non_empty_strings():
    assert non_empty().ok("a") and not non_empty().ok("")
    assert not non_empty().ok(3) and not non_empty().ok(None)
    assert non_empty().allowed(str) == "must be a non-empty string"
    assert non_empty("path").allowed(str) == "must be a non-empty path"


def test_import_paths_or_empty():
    rule = import_path_or_empty(empty_means="the built-in loop")
    assert rule.ok("") and rule.ok("pkg.mod:train")
    assert not any(rule.ok(v) for v in ["pkg.mod", ":train", "pkg.mod:", 3])
    assert rule.allowed(str) == (
        "must be empty (the built-in loop) or an import path 'package.module:function'"
    )
    assert import_path_or_empty(empty_means="none", what="Net").allowed(str) == (
        "must be empty (none) or an import path 'package.module:Net'"
    )


def test_names_or_import_paths():
    rule = identifier_or_import_path(what="Strategy", where="see docs/strategies.md")
    assert rule.ok("fedavg") and rule.ok("fed-avg_2") and rule.ok("pkg.mod:MyStrategy")
    assert not any(rule.ok(v) for v in ["FedAvg", "2fed", "", "pkg.mod", 7])
    assert rule.allowed(str) == (
        "must be a built-in name (see docs/strategies.md) or an import path "
        "'package.module:Strategy'"
    )


def test_a_table_key_needs_a_table_of_scalars():
    info = {i.name: i for i in key_infos(_declare())}["opts"]
    assert check_value_type(info, {"a": 1, "b": "x"}) == FrozenMap({"a": 1, "b": "x"})
    with pytest.raises(ConfigError) as bad:
        check_value_type(info, 5)
    assert (bad.value.key, bad.value.value) == ("demo.opts", 5)
    assert bad.value.allowed == "must be a table [demo.opts] (free options)"


def test_frozen_maps_compare_as_mappings_and_hash_by_content():
    a = FrozenMap({"x": 1, "y": "z"})
    assert a == {"y": "z", "x": 1} and a == FrozenMap({"y": "z", "x": 1})
    assert a != 3 and a != "x" and a != {"x": 1}
    assert hash(a) == hash(FrozenMap({"y": "z", "x": 1}))
    assert len({a, FrozenMap({"x": 1, "y": "z"}), FrozenMap({"x": 2})}) == 2
