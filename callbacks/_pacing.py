"""Curation pacing: how many rows of the next batch may be scored with the Jacobian, by a count.

A policy decides every training batch, so its cost cannot be spaced out like an evaluation; what can
be chosen is how many rows get the Jacobian. The unit is one backward pass of one sample through the
encoder: a Jacobian row costs ``passes_per_row`` of them (K for the exact score), and a training
batch of B rows costs at least B (every row goes forward and backward at least once). Each decided
batch earns ``share · B`` passes of credit; a batch spends the credit on whole Jacobian rows, and
the rows it cannot pay for are decided from the gate's estimate (the policy counts them in
``rows_estimated``). Keeping the policy's reference fresh (``_refresh.py``: refreshes, level
measurements) is paid from the same credit. Credit is saved up to ``burst`` batches' allowance before it is spent, because a
scoring call has a fixed cost (the forward pass, the kernels' start-up) that many rows share.

Only counts enter: the same seed and data give the same rows on any machine and under any load
(measured seconds never decide what is curated). No Lightning import.
"""

from __future__ import annotations

from typing import Any, Dict, Optional


class CurationPacer:
    """Credit in backward passes of one sample, earned per decided batch and spent on Jacobian rows."""

    def __init__(self, share: float, burst: float = 4.0) -> None:
        if not (isinstance(share, (int, float)) and share > 0):
            raise ValueError(f"pass_share={share!r} must be a positive share of a training batch's "
                             "backward passes, or None.")
        self.share, self.burst = float(share), float(burst)
        self.credit = 0.0
        self.earned_total = self.spent_total = 0.0

    def max_rows(self, batch_rows: int, passes_per_row: int) -> int:
        """Jacobian rows the next batch (``batch_rows`` rows) may use: 0 while saving up, then all
        the credit pays for (at least 1)."""
        allowance = self.share * batch_rows
        if self.credit + allowance < self.burst * allowance:
            return 0
        return max(1, int((self.credit + allowance) // max(1, passes_per_row)))

    def spent(self, batch_rows: int, rows: int, passes_per_row: int) -> None:
        """A decided batch of ``batch_rows`` rows scored ``rows`` rows with the Jacobian."""
        allowance = self.share * batch_rows
        cost = rows * max(1, passes_per_row)
        self.credit = min(self.credit + allowance - cost, self.burst * allowance)
        self.earned_total += allowance
        self.spent_total += cost

    def charge(self, passes: int) -> None:
        """Other curation work (a refresh of the policy's reference, a measurement of its Jacobian
        level) spent ``passes`` of the credit."""
        self.credit -= passes
        self.spent_total += passes

    def state_dict(self) -> Dict[str, Any]:
        return {"credit": self.credit, "earned_total": self.earned_total, "spent_total": self.spent_total}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if state:  # absent from checkpoints of releases that paced by seconds
            self.credit = float(state["credit"])
            self.earned_total, self.spent_total = float(state["earned_total"]), float(state["spent_total"])
