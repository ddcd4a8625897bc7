"""Keeping a policy's fitted reading fresh between held-out evaluations.

A Gaussian fitted to the held-out embeddings reads rows through their low-variance directions, and a
training encoder moves: a few dozen batches later the old Gaussian reads clean rows as atypical and
the policy drops them. Between two held-out evaluations the monitor therefore *refreshes* the
reading: one embedding pass of the held-out rows (the Gaussian is fitted again, each reference row's
prior cross-fitted) and the Jacobian of :data:`REFRESH_ROWS` reference rows (rotating through them),
whose median change moves the Jacobian term of every reference row (a paired difference: a training
encoder's Jacobian term moves mostly in common). The policy is recalibrated with the re-read reference.

How often is decided by the data, never by a clock: at each refresh the reference rows' fresh
embeddings are also read through the *previous* Gaussian, and ``stale_drop``, the share of them below
the :data:`STALE_QUANTILE`-quantile of the same rows as that Gaussian read them when it was fitted,
says what the encoder's move in the gap did to clean rows. Both readings are in-sample (the rows were
in the previous fit), so the fit's optimism cancels: without a move ``stale_drop`` is the quantile
itself. Above twice the quantile the gap halves
(down to 1 batch); below 1.5 times it the gap doubles (up to :data:`MAX_GAP`): early in training the
reading is refreshed every few batches, later rarely. No Lightning import.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from jepa_monitor.reading import cross_fitted_log_prior, fit_reading
from jepa_monitor.statistics import quantiles
from jepa_monitor.whitening import Whitening

#: Reference rows scored again with the Jacobian at each refresh.
REFRESH_ROWS = 8
#: The quantile of the previous reference that ``stale_drop`` counts fresh rows below.
STALE_QUANTILE = 0.05
#: Longest gap, in batches, between two refreshes.
MAX_GAP = 128


def refresh_cost(embedded_rows: int, jacobian_rows: int, embed_dim: Optional[int]) -> int:
    """Backward passes of one sample a refresh costs: one per embedded row (a forward pass, counted
    as one), K per Jacobian row."""
    return int(embedded_rows) + int(jacobian_rows) * int(embed_dim or 1)


class ReadingRefresh:
    """The policy's reference between held-out evaluations: its Jacobian term, its log_density as last
    read, and when to read it again."""

    def __init__(self) -> None:
        # (n,) float64 per Jacobian column of the reference rows: "jepa_score", and "sketch_score"
        # when the policy scores with a sketch (each moved by its own median change).
        self.columns: Dict[str, torch.Tensor] = {}
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
        """The reference rows to score again at this refresh (rotating)."""
        n = self.jepa.shape[0]
        if n <= REFRESH_ROWS:
            return torch.arange(n)
        return (torch.arange(REFRESH_ROWS) + self.count * REFRESH_ROWS) % n

    def update(self, batch: int, rows: torch.Tensor, again: Dict[str, torch.Tensor], z: torch.Tensor,
               previous: Optional[Whitening]) -> Tuple[Dict[str, torch.Tensor], Whitening]:
        """Fold in a refresh at ``batch``: ``again`` the new Jacobian columns of ``rows`` (the keys of
        :meth:`reset`), ``z`` the fresh embeddings of every held-out row (the reference rows first),
        ``previous`` the reading in use. Returns the re-read reference (``jepa_score``, ``log_prior``,
        ``log_density``, ``embedding``, and ``sketch_score`` if kept) and the new Gaussian; raises
        (ValueError) when no Gaussian can be fitted."""
        n = self.jepa.shape[0]
        gaussian = fit_reading(z)
        prior = cross_fitted_log_prior(z, n).cpu()
        for name, column in self.columns.items():
            moved = again[name].double().cpu() - column[rows]
            moved = moved[torch.isfinite(moved)]
            self.columns[name] = column + (float(moved.median()) if moved.numel() else 0.0)
        if previous is not None and self.inside is not None:
            cut = float(quantiles(self.inside, [STALE_QUANTILE])[0])
            self.stale_drop = float((self._read(previous, z) < cut).double().mean())
            if self.stale_drop > 2 * STALE_QUANTILE:
                self.gap = max(1, self.gap // 2)
            elif self.stale_drop < 1.5 * STALE_QUANTILE:
                self.gap = min(MAX_GAP, self.gap * 2)
        self.inside = self._read(gaussian, z)
        self.last, self.count = batch, self.count + 1
        reference = {name: column.float() for name, column in self.columns.items()}
        reference.update(log_prior=prior.float(), log_density=(self.jepa + prior).float(), embedding=z)
        return reference, gaussian

    def state_dict(self) -> Dict[str, Any]:
        return {"columns": dict(self.columns), "inside": self.inside, "gap": self.gap, "last": self.last,
                "count": self.count, "stale_drop": self.stale_drop}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if state:  # absent from checkpoints of releases without a fitted reading
            self.columns, self.inside = dict(state["columns"]), state.get("inside")
            self.gap, self.last, self.count = int(state["gap"]), int(state["last"]), int(state["count"])
            self.stale_drop = float(state["stale_drop"])
