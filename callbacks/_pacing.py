"""Curation pacing: how many rows of the next batch may be scored with the Jacobian.

A policy decides every training batch, so its cost cannot be spaced out like an evaluation; what can
be chosen is how many rows get the Jacobian. The pacer keeps a credit in seconds: every decided
batch earns ``share`` times a training batch's wall time and pays what curating it took. The fixed
part of that cost (the embedding forward pass, paid by every decided batch) is measured on batches
without Jacobian rows; the cost of r Jacobian rows is fitted as ``fixed + r·per_row`` on batches with
some (a handful of rows costs more per row than many: K backward passes have a per-pass overhead).
Credit is capped at ``burst`` batches' allowance. A batch that would find the credit full spends it:
it gets the Jacobian rows the whole credit pays for beyond its embedding (at least one, at most the
policy's own ``gate_budget``); the other batches get none, and their undecided rows are decided from
the gate's estimate (counted by the policy as ``rows_estimated``). Saving up is cheaper than
spreading: K backward passes cost nearly as much for 1 row as for many (on the demo encoder with the
row loop, 16 rows cost 2.1× what 1 row costs, not 16×: ``bench_scorer.py --rows --quick``), and a
spending batch adds at most ``burst·share`` of a training batch. The fit is robust to one-off costs: the first batch at each row count (which may pay
for the scorer's ``vectorize="auto"`` timing or first allocations) is left out once that count has
been seen again, and each row count enters the fit by its median. A batch is charged its measured
seconds, but at most :data:`SPIKE` times its modelled cost (median embedding cost + fitted row cost):
a batch slowed by something else on the machine must not stop the Jacobian for hundreds of batches,
while the ordinary spread of costs (whose mean exceeds the median) is still paid in full. No
Lightning import.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Dict, Optional, Tuple

#: Decided batches of (rows, seconds) the cost fit remembers.
WINDOW = 32
#: A batch is charged at most this many times its modelled cost.
SPIKE = 3.0
#: Decided batches before curation's cost is judged against its budget.
JUDGED_AFTER = 50


class CurationPacer:
    def __init__(self, share: float, burst: float = 4.0) -> None:
        if not 0.0 < share:
            raise ValueError(f"curation_budget={share!r} must be a positive share of a training batch's time, or None.")
        self.share, self.burst = float(share), float(burst)
        self.credit = 0.0
        self.base_samples: deque = deque(maxlen=WINDOW)  # seconds of decided batches without Jacobian rows
        self.with_rows: deque = deque(maxlen=WINDOW)  # (rows, seconds beyond base), first of each count excluded
        self.first: Dict[int, float] = {}  # the first (possibly one-off) cost at each row count
        self.spent_total = self.earned_total = 0.0
        self.charged_batches = 0

    def max_rows(self, step_seconds: Optional[float]) -> Optional[int]:
        """Jacobian rows the next batch may use; None: not paced yet (no training batch timed, or no
        batch with Jacobian rows measured: the policy's own cap applies once, to measure it)."""
        if step_seconds is None or not self.first:
            return None
        allowance = self.share * step_seconds
        if self.credit + allowance < self.burst * allowance:
            return 0  # saving up
        fixed, per_row = self.row_cost()
        return max(1, int((self.credit + allowance - self.base - fixed) // per_row))

    @property
    def base(self) -> float:
        """Median seconds of a decided batch without Jacobian rows (the embedding forward); 0 unknown."""
        return statistics.median(self.base_samples) if self.base_samples else 0.0

    def row_cost(self) -> Tuple[float, float]:
        """(fixed, per_row) seconds of Jacobian rows: least squares over the median cost of each row
        count seen (clamped >= 0); with one row count: (0, its median seconds per row)."""
        samples = list(self.with_rows) or list(self.first.items())
        by_rows: Dict[int, list] = {}
        for r, t in samples:
            by_rows.setdefault(r, []).append(t)
        points = [(r, statistics.median(ts)) for r, ts in by_rows.items()]
        if len(points) >= 2:
            n = len(points)
            mr, mt = sum(r for r, _ in points) / n, sum(t for _, t in points) / n
            var = sum((r - mr) ** 2 for r, _ in points)
            slope = sum((r - mr) * (t - mt) for r, t in points) / var
            fixed = mt - slope * mr
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, max(sum(t for _, t in points) / sum(r for r, _ in points), 1e-9)

    def spent(self, step_seconds: Optional[float], seconds: float, rows: int) -> None:
        """A decided batch (the policy acted) took ``seconds`` with ``rows`` Jacobian rows."""
        if rows == 0:
            self.base_samples.append(seconds)
        else:
            extra = max(0.0, seconds - self.base)
            if rows in self.first:
                self.with_rows.append((rows, extra))
            else:
                self.first[rows] = extra
        if step_seconds is None:
            return
        allowance = self.share * step_seconds
        charged = seconds
        if self.base_samples:
            fixed, per_row = self.row_cost() if self.first else (0.0, 0.0)
            charged = min(seconds, SPIKE * (self.base + (fixed + per_row * rows if rows else 0.0)))
        self.credit = min(self.credit + allowance - charged, self.burst * allowance)
        self.earned_total += allowance
        self.spent_total += seconds
        self.charged_batches += 1

    def over_budget(self) -> bool:
        """Curation has cost more than 1.5 x its allowance over at least :data:`JUDGED_AFTER` decided
        batches (the embedding forward alone, or a policy whose rows cannot be paced, e.g.
        ``gate=False``); the first, unpaced batch alone must not decide it."""
        return self.charged_batches >= JUDGED_AFTER and self.spent_total > 1.5 * self.earned_total
