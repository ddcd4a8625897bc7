"""Curation pacing: how many rows of the next batch may be scored with the Jacobian.

A policy decides every training batch, so its cost cannot be spaced out like an evaluation; what can
be chosen is how many rows get the Jacobian. The pacer keeps a credit in seconds: every decided
batch earns ``share`` times a training batch's wall time and pays what curating it took. The fixed
part of that cost (the embedding forward pass, paid by every decided batch) is measured on batches
without Jacobian rows; the cost of r Jacobian rows is fitted as ``fixed + r·per_row`` on batches with
some (a handful of rows costs more per row than many: K backward passes have a per-pass overhead).
A batch gets the rows its credit pays for beyond the embedding, at most the policy's own
``gate_budget``; the rows it does not get are decided from the gate's estimate (counted by the policy
as ``rows_estimated``). Credit is capped at ``burst`` batches' worth, so a long cheap stretch does
not buy a long expensive one. No Lightning import: plain numbers.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

#: Decided batches of (rows, seconds) the cost fit remembers.
WINDOW = 32


class CurationPacer:
    def __init__(self, share: float, burst: float = 4.0) -> None:
        if not 0.0 < share:
            raise ValueError(f"curation_budget={share!r} must be a positive share of a training batch's time, or None.")
        self.share, self.burst = float(share), float(burst)
        self.credit = 0.0
        self.base: Optional[float] = None  # seconds of a decided batch without Jacobian rows
        self.with_rows: deque = deque(maxlen=WINDOW)  # (rows, seconds beyond base)
        self.spent_total = self.earned_total = 0.0

    def max_rows(self, step_seconds: Optional[float]) -> Optional[int]:
        """Jacobian rows the next batch may use; None: not paced yet (no training batch timed, or no
        batch with Jacobian rows measured: the policy's own cap applies once, to measure it)."""
        if step_seconds is None or not self.with_rows:
            return None
        available = self.credit + self.share * step_seconds - (self.base or 0.0)
        fixed, per_row = self.row_cost()
        if available <= fixed + per_row:
            return 0
        return int((available - fixed) // per_row)

    def row_cost(self) -> tuple:
        """(fixed, per_row) seconds of Jacobian rows, least squares over the window (clamped >= 0);
        with a single row count seen: (0, mean seconds per row)."""
        rs = [r for r, _ in self.with_rows]
        ts = [t for _, t in self.with_rows]
        n, mr, mt = len(rs), sum(rs) / len(rs), sum(ts) / len(ts)
        var = sum((r - mr) ** 2 for r in rs) / n
        if var > 0:
            slope = sum((r - mr) * (t - mt) for r, t in zip(rs, ts)) / n / var
            fixed = mt - slope * mr
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, max(sum(ts) / max(1, sum(rs)), 1e-9)

    def spent(self, step_seconds: Optional[float], seconds: float, rows: int) -> None:
        """A decided batch (the policy acted) took ``seconds`` with ``rows`` Jacobian rows."""
        if rows == 0:
            self.base = seconds if self.base is None else 0.8 * self.base + 0.2 * seconds
        else:
            self.with_rows.append((rows, max(0.0, seconds - (self.base or 0.0))))
        if step_seconds is None:
            return
        allowance = self.share * step_seconds
        self.credit = min(self.credit + allowance - seconds, self.burst * allowance)
        self.earned_total += allowance
        self.spent_total += seconds

    def over_budget(self) -> bool:
        """The embedding forward alone costs more than the allowance: pacing cannot keep the budget."""
        return self.earned_total > 0 and self.base is not None and self.spent_total > 1.5 * self.earned_total
