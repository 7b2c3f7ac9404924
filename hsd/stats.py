"""The lab's verdicts as a reviewer would test them: arms paired by seed, a t-test at its real degrees of freedom,
and the false-discovery rate controlled across a table's cells (Benjamini-Hochberg). scipy does the statistics;
these functions only shape them for `hsd ablate`.

Why this procedure: arms with one seed share the LoRA initialisation, the batch draws and the evaluation set, so
the per-seed difference removes that shared noise (a paired test); with 3-5 seeds the t quantile, not the normal
2 SE, gives the stated 5 % (2 SE at 4 degrees of freedom is a 12 % test); a table tests tens of cells at once,
and Benjamini-Hochberg keeps the expected share of false discoveries among the marked ones at q.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Paired:
    """Other − base, paired by seed: mean difference, its confidence interval (t quantile, n − 1 degrees of
    freedom), the two-sided p of the paired t-test, and q once `with_q` has run over the table."""
    n: int
    mean: float
    low: float
    high: float
    p: float
    q: float = math.nan

    def significant(self, alpha: float) -> bool:
        return self.q <= alpha  # NaN (no test) is never significant


def paired(base: list[float], other: list[float], level: float = 0.95) -> Paired:
    """The paired test of `other` against `base` (equal-length lists, one value per seed, in seed order).
    Identical arms (every difference 0) have p = 1; a constant non-zero difference has p = 0."""
    if len(base) != len(other) or len(base) < 2:
        raise ValueError(f"paired: need two equal lists of >= 2 values per seed, got {len(base)} and {len(other)}")
    d = [b - a for a, b in zip(base, other)]
    n, mean = len(d), statistics.fmean(d)
    sd = statistics.stdev(d)
    if sd == 0:
        return Paired(n, mean, mean, mean, 1.0 if mean == 0 else 0.0)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_rel(other, base).pvalue)
    return Paired(n, mean, mean - half, mean + half, p)


def q_values(p: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (scipy.stats.false_discovery_control) over one table's cells."""
    if not p:
        return []
    return [float(q) for q in stats.false_discovery_control(p, method="bh")]


def with_q(tests: list[Paired]) -> list[Paired]:
    """The same tests with q filled in, the FDR controlled across all of them."""
    return [Paired(t.n, t.mean, t.low, t.high, t.p, q) for t, q in zip(tests, q_values([t.p for t in tests]))]
