"""What a test may assert about a certificate's interval without failing at random.

A 95% interval misses the truth in up to 1 run in 20 by design, and the suite runs dozens of certified jobs,
so tests check the job's own counts at 99.9% (the interval's coverage is tested in tests/unit)."""
from __future__ import annotations

from pipeline.offline.certificate import interval_of, with_head


def holds(cert: dict, truth: float, confidence: float = 0.999) -> bool:
    """Whether the true agreement lies in the interval the certificate's counts give at `confidence`."""
    lo, hi = (with_head(cert, cert["head"], confidence) if cert.get("head") else
              interval_of(cert, confidence, cert.get("audit_in_early", True)))["interval"]
    return lo - 1e-9 <= truth <= hi + 1e-9
