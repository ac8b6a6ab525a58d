"""Every built-in strategy trains the default digits setup: the second half of
the linear ones, with secure aggregation on (>= 0.90); those in ``TWINNED`` also with
it off, within 1.5 points. The others need no plain twin: the exchange, plain or
secure, hands the strategy one aggregate (the same within the quantization bound:
``tests/test_secagg_workers.py``), so a strategy cannot tell the two apart; FedAvg
(the plain mean) and SCAFFOLD (extra summed arrays: the control variates) check it
end to end.

The runs are split over three files so that ``pytest -n 2 --dist loadfile`` can put
them on both workers (they are the suite's longest file otherwise). The shared run
is :func:`tests.strategy_accuracy.accuracy`.
"""

from __future__ import annotations

import pytest

from .strategy_accuracy import LINEAR_SECOND, check_linear

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", LINEAR_SECOND)
def test_linear_strategy_trains_with_secure_aggregation(tmp_path, name):
    check_linear(tmp_path, name)
