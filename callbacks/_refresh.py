"""Keeping a policy's fitted reading fresh between held-out evaluations.

A Gaussian fitted to the held-out embeddings reads rows through their low-variance directions, and a
training encoder moves: a few dozen batches later the old Gaussian reads clean rows as atypical and
the policy drops them. Between two held-out evaluations the monitor therefore *refreshes* the
reading: one embedding pass of the held-out rows, the Gaussian fitted again and each reference row's
prior cross-fitted; the policy is recalibrated with the re-read reference.

The reference's Jacobian *level* (the median paired change of :data:`REFRESH_ROWS` reference rows,
rotating through them, scored again since the held-out evaluation) is measured only where it can
change a decision; the monitor picks the mode (``JEPAScoreMonitor._level_mode``):

- **lazy**, for the library's policies calibrated on a quantile of the reference. A training
  encoder's Jacobian term moves mostly in common, and a common move c shifts their threshold, the
  gate's range and the estimate's median Jacobian term all by c: every row decided from its
  embedding, by the gate or by the estimate, gets the same decision either way. Only a row scored
  with its own Jacobian compares with the reference's level, so the level is measured when curation
  scores such rows (:class:`OnReferenceLevel`), once per column per refresh, and subtracted from
  their scores. A run whose credit rarely pays for a Jacobian row pays almost nothing for it; under
  rank-synchronous scoring every rank makes the same calls, so the level is measured at the first
  decided batch after each refresh. Under DDP each rank measures when it scores rows, so ranks may
  read their (local) decisions on levels measured at different batches.
- **eager**, for an absolute ``threshold`` or a policy of your own: the level is measured at every
  refresh and the reference handed to ``calibrate`` is moved onto it (:meth:`ReadingRefresh.on_level`),
  so that absolute comparisons stay absolute.
- none, for a policy that reads no Jacobian (``log_prior``, an embedding score).

How often to refresh is decided by the data, never by a clock: at each refresh the reference rows'
fresh embeddings are also read through the *previous* Gaussian, and ``stale_drop``, the share of them
below the :data:`STALE_QUANTILE`-quantile of the same rows as that Gaussian read them when it was
fitted, says what the encoder's move in the gap did to clean rows. Both readings are in-sample (the
rows were in the previous fit) and share the rows' Jacobian terms, so the fit's optimism cancels:
without a move ``stale_drop`` is the quantile itself. Above twice the quantile the gap halves (down to
1 batch); below 1.5 times it the gap doubles (up to :data:`MAX_GAP`): early in training the reading
is refreshed every few batches, later rarely. No Lightning import.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from jepa_monitor.reading import cross_fitted_log_prior, fit_reading
from jepa_monitor.sample_scores import SampleScores
from jepa_monitor.statistics import quantiles
from jepa_monitor.whitening import Whitening

#: Reference rows scored again with the Jacobian when the reference's level is measured.
REFRESH_ROWS = 8
#: The quantile of the previous reference that ``stale_drop`` counts fresh rows below.
STALE_QUANTILE = 0.05
#: Longest gap, in batches, between two refreshes.
MAX_GAP = 128


class ReadingRefresh:
    """The policy's reference between held-out evaluations: its Jacobian columns as the evaluation
    scored them, their level measured since, its log_density as last read, and when to read it again."""

    def __init__(self) -> None:
        # (n,) float64 per Jacobian column of the reference rows, as the held-out evaluation scored
        # them: "jepa_score", and "sketch_score" when the policy scores with a sketch.
        self.columns: Dict[str, torch.Tensor] = {}
        # Per column: the median paired change of re-scored reference rows since the evaluation (the
        # reference's level), and the columns whose level predates the latest refresh.
        self.shift: Dict[str, float] = {}
        self.level_due: set = set()
        # (n,) float64: the reference rows' log_density through the Gaussian in use, which was fitted
        # with them (in-sample; ``stale_drop`` compares against it, like with like).
        self.inside: Optional[torch.Tensor] = None
        self.gap = 1
        self.last = 0
        self.count = 0
        self.stale_drop = float("nan")

    def reset(self, scores: Dict[str, torch.Tensor], batch: int, gaussian: Optional[Whitening]) -> None:
        """A held-out evaluation at training batch ``batch`` gave these reference scores (components,
        ``embedding`` of every embedded held-out row with the scored ones first, and ``sketch_score``
        when a sketch is in use); ``gaussian`` is the reading fitted to those embeddings (None under
        the isotropic reading, which is never refreshed)."""
        self.columns = {c: scores[c].double().cpu().clone() for c in ("jepa_score", "sketch_score") if c in scores}
        self.shift = {c: 0.0 for c in self.columns}
        self.level_due = set()
        self.inside = None if gaussian is None else self._read(gaussian, scores["embedding"])
        self.last = batch

    def _read(self, gaussian: Whitening, z: torch.Tensor) -> torch.Tensor:
        """The reference rows' log_density through ``gaussian`` (``z``: their embeddings first)."""
        return self.jepa + gaussian.log_prob(z[: self.jepa.shape[0]]).double().cpu()

    @property
    def jepa(self) -> Optional[torch.Tensor]:
        return self.columns.get("jepa_score")

    def due(self, batch: int) -> bool:
        return self.jepa is not None and batch - self.last >= self.gap

    def rows(self) -> torch.Tensor:
        """The reference rows to score again at the next level measurement (rotating)."""
        n = self.jepa.shape[0]
        if n <= REFRESH_ROWS:
            return torch.arange(n)
        return (torch.arange(REFRESH_ROWS) + self.count * REFRESH_ROWS) % n

    def update(self, batch: int, z: torch.Tensor, previous: Optional[Whitening]) -> Tuple[Dict[str, torch.Tensor], Whitening]:
        """Fold in a refresh at ``batch``: ``z`` the fresh embeddings of every held-out row (the
        reference rows first), ``previous`` the reading in use. Returns the re-read reference
        (the Jacobian columns as evaluated, ``log_prior``, ``log_density``, ``embedding``) and the new
        Gaussian; raises (ValueError) when no Gaussian can be fitted. The level is due again."""
        gaussian = fit_reading(z)
        prior = cross_fitted_log_prior(z, self.jepa.shape[0]).cpu()
        if previous is not None and self.inside is not None:
            cut = float(quantiles(self.inside, [STALE_QUANTILE])[0])
            self.stale_drop = float((self._read(previous, z) < cut).double().mean())
            if self.stale_drop > 2 * STALE_QUANTILE:
                self.gap = max(1, self.gap // 2)
            elif self.stale_drop < 1.5 * STALE_QUANTILE:
                self.gap = min(MAX_GAP, self.gap * 2)
        self.inside = self._read(gaussian, z)
        self.last = batch
        self.level_due = set(self.columns)
        reference = {name: column.float() for name, column in self.columns.items()}
        reference.update(log_prior=prior.float(), log_density=(self.jepa + prior).float(), embedding=z)
        return reference, gaussian

    def level(self, column: str, rescore: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[float, int]:
        """The reference's level of ``column`` now: measured when due (``rescore(rows)`` gives the
        column's current values of those reference rows), else the last measurement. Returns the
        shift and the rows re-scored for it (0 when not due)."""
        if column not in self.level_due:
            return self.shift.get(column, 0.0), 0
        rows = self.rows()
        moved = rescore(rows).double().cpu() - self.columns[column][rows]
        moved = moved[torch.isfinite(moved)]
        if moved.numel():
            self.shift[column] = float(moved.median())
        self.level_due.discard(column)
        self.count += 1
        return self.shift[column], int(rows.numel())

    def on_level(self, reference: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``reference`` (as :meth:`update` returns it) with its Jacobian columns and ``log_density``
        moved by the level last measured: what a policy comparing absolute scores is calibrated on."""
        out = dict(reference)
        for name, column in self.columns.items():
            out[name] = (column + self.shift.get(name, 0.0)).float()
        out["log_density"] = (reference["log_density"].double() + self.shift.get("jepa_score", 0.0)).float()
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"columns": dict(self.columns), "shift": dict(self.shift), "level_due": sorted(self.level_due),
                "inside": self.inside, "gap": self.gap, "last": self.last, "count": self.count,
                "stale_drop": self.stale_drop}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if state:  # absent from checkpoints of releases without a fitted reading
            self.columns, self.inside = dict(state["columns"]), state.get("inside")
            self.gap, self.last, self.count = int(state["gap"]), int(state["last"]), int(state["count"])
            self.stale_drop = float(state["stale_drop"])
            # Checkpoints whose refresh moved the columns eagerly hold no shift: their columns are
            # on the level of their last refresh, measured again before the next Jacobian row.
            self.shift = dict(state.get("shift", {c: 0.0 for c in self.columns}))
            self.level_due = set(state.get("level_due", self.columns))


class OnReferenceLevel:
    """The curation scorer (a :class:`~jepa_monitor.scorer.RowScorer`) with Jacobian scores read on
    the level of the policy's reference: ``jepa_score`` and ``log_density`` of every scored row minus
    the reference's shift (:meth:`ReadingRefresh.level`), measured here when due. ``reference_rows``
    gives the encoder's inputs of reference rows (``x, side``); ``charge(passes)`` pays for the
    measurement; ``passes_per_row`` is what one of its rows costs."""

    def __init__(self, scorer: Any, refresh: ReadingRefresh, reference_rows: Callable[[torch.Tensor], Tuple[Any, Dict]],
                 charge: Callable[[int], None], passes_per_row: int, column: str = "jepa_score") -> None:
        self.scorer, self.refresh, self.reference_rows = scorer, refresh, reference_rows
        self.charge, self.passes_per_row, self.column = charge, passes_per_row, column

    @property
    def synchronized(self) -> bool:
        return self.scorer.synchronized

    def embed(self, x: torch.Tensor, **side: Any) -> torch.Tensor:
        return self.scorer.embed(x, **side)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.scorer.log_prior(z)

    def sketched(self, m: int) -> "OnReferenceLevel":
        return OnReferenceLevel(self.scorer.sketched(m), self.refresh, self.reference_rows, self.charge, m,
                                "sketch_score")

    def _rescore(self, rows: torch.Tensor) -> torch.Tensor:
        x, side = self.reference_rows(rows)
        return self.scorer.score(x, **side).jepa_score

    def measure(self) -> float:
        """The reference's level of this scorer's column, measured (and paid for) when due."""
        shift, rescored = self.refresh.level(self.column, self._rescore)
        if rescored:
            self.charge(rescored * self.passes_per_row)
        return shift

    def score(self, x: torch.Tensor, **side: Any) -> SampleScores:
        shift = self.measure()
        s = self.scorer.score(x, **side)
        if shift == 0.0:
            return s
        return SampleScores(s.jepa_score - shift, s.log_prior, s.log_density - shift, s.n_floored, s.embedding,
                            s.input_dim, s.method)
