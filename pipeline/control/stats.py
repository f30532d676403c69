"""Binomial statistics for accuracy claims: exact tails, Clopper-Pearson and Wilson intervals, sample sizes.

Pure Python + math (no scipy): disagreement with the original model is a count of rare events, where normal
approximations are wrong exactly where it matters (a few disagreements in a few hundred rows).
"""
from __future__ import annotations

import math

__all__ = ["binom_cdf", "binom_quantile", "binom_sf", "clopper_pearson", "hypergeom_count_interval", "wilson",
           "rows_to_certify"]


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [_log_pmf(i, n, p) for i in range(k + 1)]
    top = max(logs)
    return 0.0 if top == -math.inf else min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_cdf(k - 1, n, p) if k > 0 else 1.0


def _solve(f, lo: float, hi: float) -> float:
    """The root of a function increasing on [lo, hi] (bisection to 1e-12)."""
    for _ in range(100):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial rate from k successes in n trials (each tail (1 - confidence)/2).

    Coverage is at least `confidence` for every true rate; with n == 0 the interval is [0, 1]."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    a = (1 - confidence) / 2
    lo = 0.0 if k == 0 else _solve(lambda p: binom_sf(k, n, p) - a, 0.0, 1.0)
    hi = 1.0 if k == n else _solve(lambda p: a - binom_cdf(k, n, p), 0.0, 1.0)
    return lo, hi


def _hypergeom_cdf(k: int, population: int, marked: int, n: int) -> float:
    """P(X <= k) for X the marked items in a uniform sample of n without replacement."""
    lo, hi = max(0, n - (population - marked)), min(n, marked)
    if k < lo:
        return 0.0
    if k >= hi:
        return 1.0

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    base = log_comb(population, n)
    logs = [log_comb(marked, i) + log_comb(population - marked, n - i) - base for i in range(lo, k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def hypergeom_count_interval(k: int, n: int, population: int, confidence: float = 0.95) -> tuple[int, int]:
    """Exact two-sided interval for the number of marked items in a finite population from k marked in a
    uniform sample of n drawn from it without replacement (each tail (1 - confidence)/2).

    What a certificate needs about *this* output's rows: their disagreements are a count, and counts are
    integers; a binomial rate times the population can claim a fraction of a row where one row is possible."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if not 0 <= k <= n <= population:
        raise ValueError(f"need 0 <= k <= n <= population, got k={k}, n={n}, population={population}")
    a = (1 - confidence) / 2
    least, most = k, population - (n - k)  # what the sample itself proves

    def first(ok, lo: int, hi: int) -> int:  # the least m in [lo, hi] with ok(m), ok monotone, ok(hi) true
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return lo

    # P(X >= k | m) grows with m; P(X <= k | m) falls with m.
    lower = first(lambda m: 1.0 - _hypergeom_cdf(k - 1, population, m, n) > a, least, most)
    upper = first(lambda m: _hypergeom_cdf(k, population, m + 1, n) <= a, least, most) if least < most else most
    return lower, upper


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (two-sided): cheaper than Clopper-Pearson, for steering rather than claims."""
    if n == 0:
        return 0.0, 1.0
    z = _normal_quantile(1 - (1 - confidence) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    return _solve(lambda x: 0.5 * math.erfc(-x / math.sqrt(2)) - q, -40.0, 40.0)


def binom_quantile(q: float, n: int, p: float) -> int:
    """The least k with P(X <= k) >= q for X ~ Binomial(n, p)."""
    total = 0.0
    for k in range(n + 1):
        total += math.exp(_log_pmf(k, n, p))
        if total >= q:
            return k
    return n


def rows_to_certify(rate: float, budget: float, confidence: float = 0.95, most: int = 1_000_000,
                    power: float | None = None) -> int:
    """Fewest rows whose two-sided Clopper-Pearson interval, at a disagreement `rate` observed exactly, ends
    at or below `budget`: how many checked rows it takes to tell `rate` from `budget` (e.g. 0.5% from 1%:
    ~1,900 at 95%). `power`: the count those rows show is random, and at `rate` exactly the interval misses
    about half the time; plan for the count's `power` quantile instead (the chance it then ends within budget).
    `most` when the rate is not below the budget or more rows would be needed."""
    if not 0 <= rate < budget:
        return most

    def hi(n: int) -> float:
        k = math.floor(rate * n) if power is None else binom_quantile(power, n, rate)
        return clopper_pearson(k, n, confidence)[1]

    lo, up = 1, 64
    while hi(up) > budget:
        if up >= most:
            return most
        lo, up = up, min(most, up * 2)
    while lo < up:  # the first n whose bound is in budget (the bound falls with n, with a sawtooth)
        mid = (lo + up) // 2
        if hi(mid) <= budget:
            up = mid
        else:
            lo = mid + 1
    return up
