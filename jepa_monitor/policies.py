"""Curation policies: which rows of an incoming batch train, and with what weight.

A policy compares each incoming row's density score with a threshold calibrated on the **held-out
reference** (its ``quantile``, refreshed by :meth:`~_Policy.calibrate` at every held-out
evaluation), never on the batch itself: a batch that is all junk is caught, a clean batch loses
about ``quantile`` of its rows. :class:`Drop` removes low-density rows; :class:`Reweight` gives each
row a weight in [0, 1] that is smooth in its score. Both are pure torch (no Lightning): the monitor
callback calls ``decide_batch`` on every training batch and :func:`jepa_monitor.batch_edit.apply_decision`
edits the batch.

**Cost, and the two-stage gate.** The exact score of a row costs one forward and K backward passes.
With ``score_key="log_density"`` (the default) the score is ``jepa_score + log_prior`` and the prior
term ``c`` needs the embedding only: one forward pass of the whole batch. The reference tells how
far the Jacobian term ranges: ``[lo, hi]`` = the held-out ``jepa_score`` range widened by
``gate_margin`` times its width. A row whose whole interval ``[c + lo, c + hi]`` lies on one side of
the policy's sensitive band (Drop: the threshold; Reweight: the band where the weight is strictly
between 0 and 1) is decided from ``c`` alone; only the other, *undecided* rows need the Jacobian.
That is exact as long as the incoming row's Jacobian term lies in ``[lo, hi]``; a reference of fewer
than :data:`GATE_MIN_REFERENCE` rows gives no trustworthy range, and then every row is scored exactly.

``gate_budget`` (default 16) caps the Jacobian rows per batch: the undecided rows whose estimate
``c + median reference jepa_score`` is nearest the threshold are scored, the others are decided from
that estimate. This approximation concerns only rows near the threshold (far-off junk is decided
exactly) and is counted in ``rows_estimated``; ``gate_budget=None`` makes every decision exact.
Measured by ``benchmarks/bench_curation.py`` on the demo encoder (K = 16, batch 128, CPU): exact
scoring of every row costs ~3.7 training steps; the gate alone leaves 2/3 of the rows undecided
(~2.1 steps); the default budget costs ~1.0 step and decides 1.4% of rows unlike exact scoring,
about the sampling noise of a 5%-quantile estimated from 242 reference rows. The cost floor of any
Jacobian is K backward passes, so a handful of rows already costs most of a step on CPU; for less,
``score_key="log_prior"`` needs no Jacobian at all (~0.05 step) and ``every_n_steps`` filters on a
cadence. ``score_key="jepa_score"`` cannot be gated.

The gate misses what it cannot see: junk whose embedding looks typical and whose Jacobian term
alone is abnormally low. ``rows_outside_gate`` counts scored rows whose Jacobian term fell outside
``[lo, hi]``: a sign to widen ``gate_margin`` or to set ``gate=False``.

**Non-finite scores** (a NaN/Inf input row) are dropped (weight 0) and counted.

**Noisy batches** (``batch_anomaly=q_b``): a batch whose median score lies below the reference's
``q_b``-quantile gets ``batch_weight = anomalous_batch_weight`` (0 by default: trained on with zero
weight), multiplied into every row's weight. For clean rows the median of n scores falls below the
``q_b``-quantile with probability P(Binomial(n, q_b) ≥ n/2): about 1e-24 for n = 64, q_b = 0.05.

**DDP.** Decisions are local: each rank decides on its own rows with the threshold that every rank
calibrated from the same gathered reference; ``decide_batch`` makes no collective call, so the
training step's gradient synchronisation is untouched and a rank may drop more rows than another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .embedding import cheap_embedder
from .scoring import gaussian_log_prior
from .statistics import quantiles

SCORE_KEYS = ("log_density", "jepa_score", "log_prior")
#: Fewest finite reference rows from which the gate takes the Jacobian term's range: a new row falls
#: outside the range of n reference rows with probability 2/(n+1), 17% for n = 11, 3% for n = 64.
GATE_MIN_REFERENCE = 64
Reference = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass
class Decision:
    """What a policy decided for one batch of B rows (tensors on the input's device).

    Attributes:
        keep: bool (B,): rows that reach the training step. Never fewer than ``min_keep`` True.
        weight: float32 (B,) in [0, 1]: the row's weight, ``batch_weight`` included (0 for dropped rows).
        scores: float32 (B,): the ``score_key`` score where it was computed, NaN where the gate
            decided without it (or the policy was inactive).
        batch_weight: weight of the batch as a whole (1, or ``anomalous_batch_weight``).
        active: whether the policy acted (reference known, warm-up over, on cadence).
        n_scored: rows that needed the expensive (Jacobian) score.
        n_nonfinite: rows with a NaN/Inf score.
        n_estimated: undecided rows left without the Jacobian by ``gate_budget`` (approximate).
    """

    keep: torch.Tensor
    weight: torch.Tensor
    scores: torch.Tensor
    batch_weight: float
    active: bool
    n_scored: int = 0
    n_nonfinite: int = 0
    n_estimated: int = 0


# ---------------------------------------------------------------------------------- pure functions
def reference_quantile(reference: torch.Tensor, q: float) -> float:
    """The q-quantile of the finite reference scores (linear interpolation, as ``numpy.quantile``)."""
    value = float(quantiles(reference, [q])[0])
    if value != value:
        raise ValueError("the reference has no finite score; a policy cannot be calibrated on it.")
    return value


def drop_mask(scores: torch.Tensor, threshold: float, min_keep: int = 1) -> torch.Tensor:
    """Keep rows with a finite score >= ``threshold``; if fewer than ``min_keep`` remain, add back the
    highest-scoring dropped rows (non-finite last, ties by position). Bool (B,)."""
    keep = torch.isfinite(scores) & (scores >= threshold)
    need = min(int(min_keep), scores.numel()) - int(keep.sum())
    if need > 0:
        candidates = (~keep).nonzero().reshape(-1)
        key = scores[candidates].double()
        key = torch.where(torch.isfinite(key), key, torch.full_like(key, -float("inf")))
        order = torch.argsort(key, descending=True, stable=True)
        keep[candidates[order[:need]]] = True
    return keep


def soft_weights(scores: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
    """Smoothstep weight in [0, 1]: 0 at or below ``threshold - scale``, ½ at ``threshold``, 1 at or
    above ``threshold + scale``, C¹ in between (3u² - 2u³ with u = (s - threshold + scale) / 2·scale).
    ``scale = 0`` is the hard step ``s >= threshold``. Non-finite scores get 0. float32 (B,)."""
    s = scores.double()
    if scale > 0:
        u = ((s - threshold) / (2 * scale) + 0.5).clamp(0.0, 1.0)
        w = u * u * (3 - 2 * u)
    else:
        w = (s >= threshold).double()
    return torch.where(torch.isfinite(s), w, torch.zeros_like(w)).to(torch.float32)


def undecided_rows(cheap: torch.Tensor, low: float, high: float, band_low: float, band_high: float) -> torch.Tensor:
    """Rows whose full score ``cheap + j``, for any ``j`` in [low, high], could fall on either side of
    the band [band_low, band_high]: bool (B,). A non-finite cheap score decides by itself (False)."""
    return torch.isfinite(cheap) & (cheap + low < band_high) & (cheap + high >= band_low)


def nearest_rows(undecided: torch.Tensor, estimate: torch.Tensor, center: float, budget: int) -> torch.Tensor:
    """At most ``budget`` of the ``undecided`` rows, those whose estimate is nearest ``center`` (ties
    by position): bool (B,). Near the threshold an error in the estimate changes the most."""
    chosen = torch.zeros_like(undecided)
    rows = undecided.nonzero().reshape(-1)
    if rows.numel() <= budget:
        chosen[rows] = True
        return chosen
    distance = (estimate[rows].double() - center).abs()
    chosen[rows[torch.argsort(distance, stable=True)[:budget]]] = True
    return chosen


def median_below(scores: torch.Tensor, cutoff: float) -> bool:
    """Whether the batch median (non-finite scores counted as the lowest) is below ``cutoff``:
    more than half of the rows are."""
    below = ~(torch.isfinite(scores) & (scores >= cutoff))
    return 2 * int(below.sum()) > scores.numel()


# ---------------------------------------------------------------------------------- policies
class _Policy:
    """Shared calibration, gating and bookkeeping of :class:`Drop` and :class:`Reweight`.

    State (``state_dict``): ``threshold``, ``reference_median`` and ``reference_low`` (the reference's
    median and ``quantile``-quantile), ``anomaly_cutoff``, ``jacobian_range`` and ``jacobian_center``
    (the gate), and ``counts``: ``batches``, ``active_batches``, ``anomalous_batches``, ``rows``,
    ``rows_dropped``, ``rows_scored`` (Jacobian computed), ``rows_nonfinite``, ``rows_outside_gate``,
    ``rows_estimated`` (decided from the estimate by the budget) and ``weight_sum``.
    """

    mode = ""

    def __init__(
        self,
        *,
        quantile: float,
        threshold: Optional[float],
        warmup: Union[int, str],
        trust_threshold: Optional[float],
        score_key: str,
        every_n_steps: int,
        batch_anomaly: Optional[float],
        anomalous_batch_weight: float,
        gate: bool,
        gate_margin: float,
        gate_budget: Optional[int],
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile={quantile!r} must be in (0, 1), e.g. 0.05 to act on the lowest 5%.")
        if score_key not in SCORE_KEYS:
            raise ValueError(f"score_key={score_key!r} is not one of {SCORE_KEYS}.")
        if warmup == "trust":
            if trust_threshold is None:
                from .diagnostics import TRUST_THRESHOLD

                trust_threshold = TRUST_THRESHOLD
        elif not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"warmup={warmup!r} must be a number of training batches (>= 0) or 'trust'.")
        if not (isinstance(every_n_steps, int) and every_n_steps >= 1):
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer.")
        if batch_anomaly is not None and not 0.0 < batch_anomaly < 0.5:
            raise ValueError(f"batch_anomaly={batch_anomaly!r} must be a reference quantile in (0, 0.5), or None.")
        if not 0.0 <= anomalous_batch_weight <= 1.0:
            raise ValueError(f"anomalous_batch_weight={anomalous_batch_weight!r} must be in [0, 1].")
        if gate_margin < 0:
            raise ValueError(f"gate_margin={gate_margin!r} must be >= 0.")
        if gate_budget is not None and not (isinstance(gate_budget, int) and gate_budget >= 0):
            raise ValueError(f"gate_budget={gate_budget!r} must be a number of rows (>= 0) or None (no cap).")
        self.quantile = float(quantile)
        self.absolute_threshold = None if threshold is None else float(threshold)
        self.warmup = warmup
        self.trust_threshold = trust_threshold
        self.score_key = score_key
        self.every_n_steps = every_n_steps
        self.batch_anomaly = batch_anomaly
        self.anomalous_batch_weight = float(anomalous_batch_weight)
        self.gate = gate
        self.gate_margin = float(gate_margin)
        self.gate_budget = gate_budget

        self.threshold: Optional[float] = self.absolute_threshold
        self.reference_median: Optional[float] = None
        self.reference_low: Optional[float] = None  # the reference's own q-quantile
        self.anomaly_cutoff: Optional[float] = None
        self.jacobian_range: Optional[tuple] = None
        self.jacobian_center: Optional[float] = None
        self.counts: Dict[str, float] = dict.fromkeys(
            ("batches", "active_batches", "anomalous_batches", "rows", "rows_dropped", "rows_scored",
             "rows_nonfinite", "rows_outside_gate", "rows_estimated", "weight_sum"), 0
        )

    # ------------------------------------------------------------------ calibration
    def calibrate(self, reference: Reference) -> None:
        """Set the threshold (and the gate) from held-out scores.

        ``reference``: the held-out scores of ``score_key`` (a tensor), or a mapping of components
        (``jepa_score``, ``log_prior``, ``log_density``) as the monitor gathers them; only the mapping
        lets the gate of ``score_key="log_density"`` measure the range of the Jacobian term.
        """
        if isinstance(reference, Mapping):
            if self.score_key not in reference:
                raise KeyError(f"the reference has no {self.score_key!r} scores; its keys are {list(reference)}.")
            scores = torch.as_tensor(reference[self.score_key])
            j = reference.get("jepa_score") if "log_prior" in reference else None
        else:
            scores, j = torch.as_tensor(reference), None
        self.reference_low = reference_quantile(scores, self.quantile)
        self.reference_median = reference_quantile(scores, 0.5)
        self.threshold = self.absolute_threshold if self.absolute_threshold is not None else self.reference_low
        if self.batch_anomaly is not None:
            self.anomaly_cutoff = reference_quantile(scores, self.batch_anomaly)
        self.jacobian_range = self.jacobian_center = None
        if j is not None:
            j = torch.as_tensor(j).double()
            j = j[torch.isfinite(j)]
            if j.numel() >= GATE_MIN_REFERENCE:
                lo, hi = float(j.min()), float(j.max())
                pad = self.gate_margin * (hi - lo)
                self.jacobian_range = (lo - pad, hi + pad)
                self.jacobian_center = float(j.median())
        self._calibrated()

    def _calibrated(self) -> None:
        pass

    # ------------------------------------------------------------------ per batch
    def is_active(self, step: int, trust: Optional[float] = None) -> bool:
        """Reference (or absolute threshold) known, warm-up over, and ``step`` on the cadence."""
        if self.threshold is None or not self._ready():
            return False
        if self.warmup == "trust":
            if trust is None or not trust >= self.trust_threshold:
                return False
        elif step < self.warmup:
            return False
        return step % self.every_n_steps == 0

    def _ready(self) -> bool:
        return True

    def _band(self) -> tuple:
        """[low, high] of full scores whose exact value changes the row's decision."""
        raise NotImplementedError

    def _rows(self, effective: torch.Tensor) -> tuple:
        """(keep, weight) from the effective per-row scores."""
        raise NotImplementedError

    def decide_batch(
        self,
        score_fn: Callable[[torch.Tensor], Any],
        x: torch.Tensor,
        step: int,
        trust: Optional[float] = None,
        *,
        embed_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> Decision:
        """Decide for every row of ``x`` (B, ...).

        ``score_fn(rows) -> SampleScores`` is the exact (expensive) scorer; ``embed_fn(rows) -> (b, K)``
        the cheap embedding, derived from ``score_fn`` when it is ``partial(score_samples, encoder,
        ...)``. Without an embedding function every row gets the exact score. ``step`` is the
        caller's batch counter (warm-up, cadence), ``trust`` the latest trust indicator.
        """
        n = x.shape[0]
        device = x.device
        self.counts["batches"] += 1
        scores = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        if not self.is_active(step, trust):
            self.counts["rows"] += n
            self.counts["weight_sum"] += n
            return Decision(torch.ones(n, dtype=torch.bool, device=device), torch.ones(n, device=device),
                            scores, 1.0, False)

        embed_fn = embed_fn if embed_fn is not None else cheap_embedder(score_fn)
        band_low, band_high = self._band()
        if self.anomaly_cutoff is not None:
            # The batch median is compared with the cutoff: rows on either side of it must be exact too.
            band_low, band_high = min(band_low, self.anomaly_cutoff), max(band_high, self.anomaly_cutoff)
        cheap, estimated = None, 0
        if embed_fn is not None and self.score_key != "jepa_score" and (
            self.score_key == "log_prior" or (self.gate and self.jacobian_range is not None)
        ):
            cheap = gaussian_log_prior(embed_fn(x)).to(device)

        if cheap is None:
            full = torch.ones(n, dtype=torch.bool, device=device)
        elif self.score_key == "log_prior":
            full = torch.zeros(n, dtype=torch.bool, device=device)
            scores = cheap.clone()
        else:
            lo, hi = self.jacobian_range
            undecided = undecided_rows(cheap, lo, hi, band_low, band_high)
            full = undecided
            if self.gate_budget is not None:
                full = nearest_rows(undecided, cheap + self.jacobian_center, self.threshold, self.gate_budget)
            estimated = int((undecided & ~full).sum())
        rows = full.nonzero().reshape(-1)
        if rows.numel():
            s = score_fn(x[rows])
            scores[rows] = getattr(s, self.score_key).to(device=device, dtype=torch.float32)
            if cheap is not None and self.jacobian_range is not None:
                j = s.jepa_score.to(device).double()
                lo, hi = self.jacobian_range
                self.counts["rows_outside_gate"] += int(((j < lo) | (j > hi)).sum())

        if cheap is None or self.score_key == "log_prior":
            effective = scores
        else:
            # Gated rows: any point of [lo, hi] lies on the same side of the band as the whole
            # interval; the reference median is also the best guess for rows left out by the budget.
            effective = torch.where(full, scores, (cheap + self.jacobian_center).to(torch.float32))
            effective = torch.where(torch.isfinite(cheap), effective, torch.full_like(effective, float("nan")))

        nonfinite = int((~torch.isfinite(effective)).sum())
        keep, weight = self._rows(effective)
        batch_weight = 1.0
        if self.anomaly_cutoff is not None and median_below(effective, self.anomaly_cutoff):
            batch_weight = self.anomalous_batch_weight
            self.counts["anomalous_batches"] += 1
        weight = weight * batch_weight
        self.counts["active_batches"] += 1
        self.counts["rows"] += n
        self.counts["rows_dropped"] += int((~keep).sum())
        self.counts["rows_scored"] += int(rows.numel())
        self.counts["rows_nonfinite"] += nonfinite
        self.counts["rows_estimated"] += estimated
        self.counts["weight_sum"] += float(weight.sum())
        return Decision(keep, weight, scores, batch_weight, True, int(rows.numel()), nonfinite, estimated)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        return {
            "threshold": self.threshold,
            "reference_median": self.reference_median,
            "reference_low": self.reference_low,
            "anomaly_cutoff": self.anomaly_cutoff,
            "jacobian_range": self.jacobian_range,
            "jacobian_center": self.jacobian_center,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.threshold = state["threshold"]
        self.reference_median = state["reference_median"]
        self.reference_low = state["reference_low"]
        self.anomaly_cutoff = state["anomaly_cutoff"]
        self.jacobian_range = None if state["jacobian_range"] is None else tuple(state["jacobian_range"])
        self.jacobian_center = state["jacobian_center"]
        self.counts = dict(state["counts"])
        self._calibrated()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quantile={self.quantile}, score_key={self.score_key!r}, threshold={self.threshold})"


class Drop(_Policy):
    """Drop rows whose score is below the threshold.

    Args:
        quantile: the threshold is this quantile of the held-out reference scores.
        threshold: an absolute threshold (nats) instead; the reference still calibrates the gate.
        min_keep: the fewest rows a batch keeps (the highest-scoring ones), at least 1.
        warmup: no action before this many training batches, or ``"trust"``: no action while the
            latest trust indicator is below ``trust_threshold`` (default
            :data:`jepa_monitor.diagnostics.TRUST_THRESHOLD`), checked at every batch.
        score_key: "log_density" (default), "jepa_score" or "log_prior" (no Jacobian at all).
        every_n_steps: act on every n-th batch only (the others pass untouched).
        batch_anomaly, anomalous_batch_weight: the noisy-batch rule of the module docstring.
        gate, gate_margin, gate_budget: the two-stage gate of the module docstring (``gate=False``:
            exact score for every row; ``gate_budget``: at most this many Jacobian rows per batch).
    """

    mode = "drop"

    def __init__(
        self,
        quantile: float = 0.05,
        *,
        threshold: Optional[float] = None,
        min_keep: int = 1,
        warmup: Union[int, str] = 0,
        trust_threshold: Optional[float] = None,
        score_key: str = "log_density",
        every_n_steps: int = 1,
        batch_anomaly: Optional[float] = None,
        anomalous_batch_weight: float = 0.0,
        gate: bool = True,
        gate_margin: float = 0.1,
        gate_budget: Optional[int] = 16,
    ) -> None:
        if not (isinstance(min_keep, int) and min_keep >= 1):
            raise ValueError(f"min_keep={min_keep!r} must be an integer >= 1: a training batch is never emptied.")
        super().__init__(quantile=quantile, threshold=threshold, warmup=warmup, trust_threshold=trust_threshold,
                         score_key=score_key, every_n_steps=every_n_steps, batch_anomaly=batch_anomaly,
                         anomalous_batch_weight=anomalous_batch_weight, gate=gate, gate_margin=gate_margin,
                         gate_budget=gate_budget)
        self.min_keep = min_keep

    def _band(self) -> tuple:
        return self.threshold, self.threshold

    def _rows(self, effective: torch.Tensor) -> tuple:
        keep = drop_mask(effective, self.threshold, self.min_keep)
        return keep, keep.to(torch.float32)


class Reweight(_Policy):
    """Weight every row by :func:`soft_weights` of its score; rows are never removed.

    The weight is ½ at the threshold, 0 at or below ``threshold - scale`` and 1 at or above
    ``threshold + scale``, with ``scale = temperature · (median - quantile)`` of the reference
    scores: with the default 0.5, rows at the typical (median) held-out density weigh exactly 1.

    Args: as :class:`Drop` (no ``min_keep``), plus
        temperature: width of the transition, in units of the reference's median-to-quantile gap.
        weight_key: the batch key the weights are written under (dict batches).
    """

    mode = "reweight"

    def __init__(
        self,
        quantile: float = 0.05,
        *,
        temperature: float = 0.5,
        threshold: Optional[float] = None,
        warmup: Union[int, str] = 0,
        trust_threshold: Optional[float] = None,
        score_key: str = "log_density",
        weight_key: str = "sample_weight",
        every_n_steps: int = 1,
        batch_anomaly: Optional[float] = None,
        anomalous_batch_weight: float = 0.0,
        gate: bool = True,
        gate_margin: float = 0.1,
        gate_budget: Optional[int] = 16,
    ) -> None:
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature!r} must be >= 0 (0: a hard step, as Drop without dropping).")
        super().__init__(quantile=quantile, threshold=threshold, warmup=warmup, trust_threshold=trust_threshold,
                         score_key=score_key, every_n_steps=every_n_steps, batch_anomaly=batch_anomaly,
                         anomalous_batch_weight=anomalous_batch_weight, gate=gate, gate_margin=gate_margin,
                         gate_budget=gate_budget)
        self.temperature = float(temperature)
        self.weight_key = weight_key
        self.scale: Optional[float] = None

    def _calibrated(self) -> None:
        if self.reference_median is not None:
            self.scale = self.temperature * max(0.0, self.reference_median - self.reference_low)

    def _ready(self) -> bool:
        # The transition width comes from the reference spread, even with an absolute threshold.
        return self.scale is not None

    def _band(self) -> tuple:
        return self.threshold - self.scale, self.threshold + self.scale

    def _rows(self, effective: torch.Tensor) -> tuple:
        weight = soft_weights(effective, self.threshold, self.scale)
        return torch.ones_like(weight, dtype=torch.bool), weight
