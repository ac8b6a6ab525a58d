"""Every built-in strategy trains the default digits setup: the non-linear ones, plain (>= 0.85).

The runs are split over three files so that ``pytest -n 2 --dist loadfile`` can put
them on both workers (they are the suite's longest file otherwise). The shared run
is :func:`tests.strategy_accuracy.accuracy`.
"""

from __future__ import annotations

import pytest

from .strategy_accuracy import LINEAR, LINEAR_FIRST, LINEAR_SECOND, NONLINEAR, TWINNED, accuracy

pytestmark = pytest.mark.slow


def test_every_builtin_strategy_is_covered():
    assert set(LINEAR) >= {"fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi"}
    assert "scaffold" in LINEAR
    assert set(NONLINEAR) == {"fedmedian", "fedtrimmedavg", "krum", "multikrum"}
    assert sorted(LINEAR_FIRST + LINEAR_SECOND) == sorted(LINEAR)
    assert TWINNED <= set(LINEAR)


@pytest.mark.parametrize("name", NONLINEAR)
def test_nonlinear_strategy_trains_plain(tmp_path, name):
    acc = accuracy(tmp_path, name, False)
    assert acc >= 0.85, f"{name}: {acc:.4f}"
