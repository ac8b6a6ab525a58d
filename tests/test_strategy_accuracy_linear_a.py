"""Every built-in strategy trains the default digits setup: the first half of
the linear ones, with secure aggregation on and off (>= 0.90, within 1.5 points).

The runs are split over three files so that ``pytest -n 2 --dist loadfile`` can put
them on both workers (they are the suite's longest file otherwise). The shared run
is :func:`tests.strategy_accuracy.accuracy`.
"""

from __future__ import annotations

import pytest

from .strategy_accuracy import LINEAR_FIRST, accuracy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", LINEAR_FIRST)
def test_linear_strategy_trains_with_secure_aggregation(tmp_path, name):
    secure = accuracy(tmp_path, name, True)
    plain = accuracy(tmp_path, name, False)
    assert secure >= 0.90, f"{name}: {secure:.4f} with secure aggregation"
    assert abs(secure - plain) <= 0.015, f"{name}: secure {secure:.4f} vs plain {plain:.4f}"
