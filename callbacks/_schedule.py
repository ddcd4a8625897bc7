"""When the monitor scores: a fixed cadence, or a share of training's backward passes (``Cadence.pass_share``).

Costs are counted, never timed, so the schedule (and the curation calibrated at each evaluation) is
the same on any machine and under any load. The unit is one backward pass of one sample through
the encoder: a Jacobian-scored row costs K of them, an embedded row (trust) one, and a training
batch of B rows at least B. With a share, the held-out evaluation (and the incoming rows scored
with the same weights right after it) is spaced so that its cost stays within ``pass_share`` of
training's passes:

    gap = ceil(E / (pass_share·(s + c)))

batches between evaluations, where E is the cost of one evaluation, s the median rows of a training
batch and c the median passes curation spent per batch (a policy decides every batch; its Jacobian
rows have their own share, ``pass_share``, paced in ``_pacing.py``). The first evaluation, at
fit start, is outside the share.

A monitor with a policy evaluates the held-out set at doubling intervals early in the run (after
:data:`EARLY_GAP` batches, then at 2×, 4×, … that batch index, never later than the planned gap):
the encoder changes fastest at the start, and a policy's threshold comes from these evaluations.

How many rows: an evaluation of a large encoder (K backward passes per Jacobian row) can cost so
much that the gap would leave the run nearly unobserved. When the
gap at the configured rows (``Cadence.heldout_rows``, ``Cadence.incoming_rows``) exceeds
:data:`TARGET_GAP` batches, the rows are scaled down in proportion (the cost is taken as
proportional to the rows, which the Jacobian dominates), to no fewer than :data:`MIN_HELDOUT_ROWS`
and :data:`MIN_INCOMING_ROWS`; only then does the gap grow past the target. No Lightning import: plain numbers.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._options import Cadence

#: Training batches counted before the first plan.
WARMUP_BATCHES = 5
#: Batches between the first held-out evaluations while a policy waits for trust.
EARLY_GAP = 50
#: Batches between held-out evaluations beyond which the plan scores fewer rows first.
TARGET_GAP = 1000
#: Fewest held-out rows a plan scores (the policies' gate needs 64 reference rows; a KS
#: statistic on fewer is coarse), and fewest incoming rows.
MIN_HELDOUT_ROWS = 64
MIN_INCOMING_ROWS = 8


class Schedule:
    def __init__(self, cadence: Cadence, max_gap: int = 100_000) -> None:
        self.every_n_batches, self.incoming_every_n_batches = cadence.every_n_batches, cadence.incoming_every_n_batches
        self.share, self.max_gap = cadence.pass_share, max_gap
        self.next_heldout: Optional[int] = None  # share mode: the batch of the next evaluation
        self.gap: Optional[int] = None
        self.rows: Optional[Tuple[int, int]] = None  # share mode: (held-out, incoming) rows planned
        self.batch_passes: deque = deque(maxlen=50)
        self.curation_passes: deque = deque(maxlen=50)

    @property
    def budgeted(self) -> bool:
        """Evaluations spaced by ``pass_share`` (no fixed ``every_n_batches``)."""
        return self.every_n_batches is None

    def heldout_due(self, batch: int) -> bool:
        if not self.budgeted:
            return batch % self.every_n_batches == 0
        return self.next_heldout is not None and batch >= self.next_heldout

    def incoming_due(self, batch: int, latest_heldout_batch: int) -> bool:
        if self.incoming_every_n_batches is None:
            return False
        if self.incoming_every_n_batches == "auto":  # right after each held-out evaluation: same weights
            return batch == latest_heldout_batch
        return batch % self.incoming_every_n_batches == 0

    def needs_plan(self) -> bool:
        return self.budgeted and self.next_heldout is None and len(self.batch_passes) >= WARMUP_BATCHES

    def note_batch(self, batch_rows: int, curation_passes: int) -> None:
        """One training batch's rows (its passes), and the passes curation spent on it."""
        self.batch_passes.append(max(int(batch_rows), 0))
        self.curation_passes.append(max(int(curation_passes), 0))

    def _room(self) -> float:
        return self.share * (statistics.median(self.batch_passes) + statistics.median(self.curation_passes))

    def propose_gap(self, evaluation_passes: float) -> Optional[int]:
        """Batches until the next evaluation that keep its cost within ``pass_share`` (this rank's view;
        the ranks agree on the largest). None before any batch was counted."""
        if not self.batch_passes:
            return None
        room = self._room()
        if room <= 0:
            return self.max_gap
        return int(min(self.max_gap, max(1, math.ceil(evaluation_passes / room))))

    def propose_rows(self, heldout: Tuple[float, int], incoming: Tuple[float, int],
                     max_rows: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """(held-out rows, incoming rows) for the next evaluations from the latest (passes, rows) of
        each and the configured maxima: the maxima when their gap is within :data:`TARGET_GAP`, else
        scaled down to fit it (not below the minima). None before any batch was counted."""
        if not self.batch_passes:
            return None
        room = self._room()
        per_row = [t / r if r > 0 else 0.0 for t, r in (heldout, incoming)]
        full = per_row[0] * max_rows[0] + per_row[1] * max_rows[1]
        if room <= 0 or full <= TARGET_GAP * room:
            return max_rows
        scale = TARGET_GAP * room / full
        floors = (MIN_HELDOUT_ROWS, MIN_INCOMING_ROWS)
        return tuple(max(min(lo, m), int(m * scale)) for m, lo in zip(max_rows, floors))  # type: ignore[return-value]

    def plan(self, last_heldout_batch: int, gap: int, early: bool = False) -> None:
        """The next evaluation ``gap`` batches after the last; ``early`` (a policy is attached): no
        later than max(EARLY_GAP, last batch), the doubling intervals of the module docstring."""
        if early:
            gap = min(gap, max(EARLY_GAP, last_heldout_batch))
        self.gap = gap
        self.next_heldout = last_heldout_batch + gap

    def replan(self, measured: Sequence[Tuple[float, int]], max_rows: Tuple[int, int], last_heldout_batch: int,
               gather: Callable[[Any], List[Any]], early: bool = False) -> Optional[Tuple[int, int]]:
        """Plan the rows and the spacing of the next evaluations from the latest (passes, rows) of the
        held-out and the incoming one; returns the (held-out, incoming) rows planned, None while
        no rank has counted a batch. ``gather(x)`` is every rank's ``x``: the ranks agree on the fewest rows
        and the largest gap (an evaluation is a collective: every rank must run it at the same batch, on
        the same rows)."""
        proposals = [p for p in gather(self.propose_rows(*measured, max_rows)) if p]
        if proposals:
            self.rows = (min(p[0] for p in proposals), min(p[1] for p in proposals))
        rows = self.rows or max_rows
        # The cost at the planned rows: the latest one, in proportion to the rows (the Jacobian dominates).
        cost = sum(t * r / max(1, n) for (t, n), r in zip(measured, rows))
        gaps = [g for g in gather(self.propose_gap(cost)) if g is not None]
        if not gaps:
            return None
        self.plan(last_heldout_batch, max(gaps), early)
        return rows

    def state_dict(self) -> Dict[str, Any]:
        return {"next_heldout": self.next_heldout, "gap": self.gap, "rows": self.rows}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.next_heldout, self.gap = state["next_heldout"], state["gap"]
        rows = state.get("rows")
        self.rows = tuple(rows) if rows else None
