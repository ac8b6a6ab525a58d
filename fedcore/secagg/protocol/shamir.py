"""Shamir t-of-k secret sharing over the prime field GF(2**255 - 19).

Shamir, "How to Share a Secret", Communications of the ACM 22(11), 1979.

A secret ``s < p`` is the constant term of a random polynomial of degree
``t - 1``; holder ``x`` (a nonzero field element: fedcore uses the holder's node
id) gets ``f(x)``. Any ``t`` shares give ``s`` by Lagrange interpolation at 0;
any ``t - 1`` reveal nothing about it (the coefficients are uniform in the
field, rejection-sampled from a CSPRNG).

Several secrets are shared to the same holders at once (:func:`split`): one
pass of Horner's rule per holder over all of them. Field elements are Python
integers (255 bits do not fit a NumPy dtype); the cost is ``O(k t)``
multiplications per secret to share and ``O(t^2)`` to reconstruct, which for
``t <= ~30`` is microseconds: the mask arithmetic, not this, is what is
vectorized.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol.crypto import FIELD_PRIME, RandBytes, new_field_secret

__all__ = ["evaluate", "reconstruct", "split"]

P = FIELD_PRIME


def split(
    secrets: Sequence[int],
    threshold: int,
    holders: Sequence[int],
    randbytes: RandBytes = os.urandom,
) -> dict[int, tuple[int, ...]]:
    """Shares of each secret for each holder.

    Parameters
    ----------
    secrets : Sequence[int]
        Field elements (each ``0 <= s < p``).
    threshold : int
        ``t``: shares needed to reconstruct (``1 <= t <= len(holders)``).
    holders : Sequence[int]
        Distinct nonzero evaluation points (node ids).
    randbytes : callable (default: ``os.urandom``)
        CSPRNG for the polynomial coefficients.

    Returns
    -------
    dict[int, tuple[int, ...]]
        ``{holder: (share of secret 0, share of secret 1, ...)}``.

    Examples
    --------
    >>> shares = split([42], 2, [1, 2, 3])
    >>> reconstruct({1: shares[1][0], 3: shares[3][0]}, 2)
    42

    """
    if not 1 <= threshold <= len(holders):
        raise SecureAggregationError(
            f"threshold {threshold} must be between 1 and the number of holders {len(holders)}"
        )
    if len(set(holders)) != len(holders) or any(h % P == 0 for h in holders):
        raise SecureAggregationError("share holders must be distinct nonzero field elements")
    if any(not 0 <= s < P for s in secrets):
        raise SecureAggregationError("a secret to share is outside the field")
    polys = [[s] + [new_field_secret(randbytes) for _ in range(threshold - 1)] for s in secrets]
    out: dict[int, tuple[int, ...]] = {}
    for x in holders:
        values = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):  # Horner
                acc = (acc * x + c) % P
            values.append(acc)
        out[x] = tuple(values)
    return out


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """Recover the secret from ``threshold`` shares ``{holder: share}`` (the first ones).

    Raises
    ------
    SecureAggregationError
        With fewer than ``threshold`` shares.

    """
    if len(shares) < threshold:
        raise SecureAggregationError(
            f"{len(shares)} share(s) available, {threshold} needed to reconstruct"
        )
    points = list(shares.items())[:threshold]
    xs = [x % P for x, _ in points]
    # Lagrange basis at 0: l_j = prod_{m != j} x_m / (x_m - x_j); one inversion in all
    # (Montgomery's trick over the denominators).
    nums: list[int] = []
    dens: list[int] = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % P
                den = den * (xm - xj) % P
        if den == 0:
            raise SecureAggregationError("duplicate share holder")
        nums.append(num)
        dens.append(den)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % P)
    inv = pow(prefix[-1], -1, P)
    secret = 0
    for j in range(len(xs) - 1, -1, -1):
        inv_j = inv * prefix[j] % P
        inv = inv * dens[j] % P
        secret = (secret + points[j][1] * nums[j] % P * inv_j) % P
    return secret


def evaluate(points: Mapping[int, int], x: int) -> int:
    """The value at ``x`` of the polynomial of degree ``len(points) - 1`` through ``points``.

    Lagrange interpolation over GF(p): with ``t`` shares that reconstruct the secret,
    it gives the share every other holder should have sent (so a bad one is identified).

    >>> shares = split([7], 3, [1, 2, 3, 4])
    >>> evaluate({h: shares[h][0] for h in (1, 2, 3)}, 4) == shares[4][0]
    True
    >>> evaluate({h: shares[h][0] for h in (1, 2, 3)}, 0)
    7

    """
    pts = [(h % P, y % P) for h, y in points.items()]
    x %= P
    total = 0
    for j, (xj, yj) in enumerate(pts):
        num = den = 1
        for m, (xm, _) in enumerate(pts):
            if m != j:
                num = num * (x - xm) % P
                den = den * (xj - xm) % P
        if den == 0:
            raise SecureAggregationError("duplicate share holder")
        total = (total + yj * num * pow(den, -1, P)) % P
    return total
