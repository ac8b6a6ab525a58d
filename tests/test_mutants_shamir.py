"""Shamir sharing: the edges of ``split``'s contract and the refusals, checked.

Found by mutation testing: ``1 <= t`` is inclusive (t = 1 shares the secret itself);
holders are field elements, so ``P`` is the forbidden point 0 and ``h`` and ``h + P`` are
one holder; refusals say what was wrong; and interpolation (``evaluate``,
``reconstruct``) works for holders whose differences are 1, and refuses a repeated one.
"""

from __future__ import annotations

import re

import pytest

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol.shamir import P, evaluate, reconstruct, split


def _exactly(message):
    return "^" + re.escape(message) + "$"


def test_threshold_one_gives_every_holder_the_secret():
    shares = split([5, 123456789], 1, [3, 8, 11])
    assert shares == {3: (5, 123456789), 8: (5, 123456789), 11: (5, 123456789)}
    assert reconstruct({8: shares[8][1]}, 1) == 123456789


@pytest.mark.parametrize("threshold", [0, 4])
def test_a_threshold_outside_one_to_the_holders_is_refused(threshold):
    with pytest.raises(
        SecureAggregationError,
        match=_exactly(f"threshold {threshold} must be between 1 and the number of holders 3"),
    ):
        split([1], threshold, [1, 2, 3])


@pytest.mark.parametrize("holders", [[1, 2, 2], [1, 0, 3], [1, P, 3], [2 * P, 5]])
def test_holders_must_be_distinct_nonzero_field_elements(holders):
    with pytest.raises(
        SecureAggregationError,
        match=_exactly("share holders must be distinct nonzero field elements"),
    ):
        split([1], 2, holders)


@pytest.mark.parametrize("secret", [-1, P, P + 5])
def test_a_secret_outside_the_field_is_refused(secret):
    with pytest.raises(
        SecureAggregationError, match=_exactly("a secret to share is outside the field")
    ):
        split([0, secret], 2, [1, 2])


def test_consecutive_holders_interpolate():
    """Holders 1 and 2 (a difference of 1 in every Lagrange denominator) are fine."""
    shares = split([99], 2, [1, 2, 3])
    assert reconstruct({1: shares[1][0], 2: shares[2][0]}, 2) == 99
    assert evaluate({1: shares[1][0], 2: shares[2][0]}, 3) == shares[3][0]
    assert evaluate({1: shares[1][0], 2: shares[2][0]}, 0) == 99


def test_one_holder_named_twice_is_refused_when_interpolating():
    """``h`` and ``h + P`` are the same field element: their two shares are one point."""
    shares = split([42], 2, [1, 2])
    twice = {1: shares[1][0], 1 + P: shares[2][0]}
    with pytest.raises(SecureAggregationError, match=_exactly("duplicate share holder")):
        reconstruct(twice, 2)
    with pytest.raises(SecureAggregationError, match=_exactly("duplicate share holder")):
        evaluate(twice, 0)
