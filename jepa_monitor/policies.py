"""Curation policies: which rows of an incoming batch train, and with what weight.

A policy compares each incoming row's score with a threshold calibrated on the **held-out
reference** (its ``quantile``, refreshed by :meth:`~ThresholdPolicy.calibrate` at every held-out
evaluation), never on the batch itself: a batch that is all junk is caught, a clean batch loses
about ``quantile`` of its rows. :class:`Drop` removes low-score rows; :class:`Reweight` gives each
row a weight in [0, 1] that is smooth in its score. Both are pure torch (no Lightning): the monitor
callback calls ``decide_batch`` on every training batch and :func:`jepa_monitor.batches.apply_decision`
edits the batch. :class:`Policy` is the protocol a user-written policy implements. Explained at
length, with what it costs and what it catches, in ``docs/curation.md``.

**Safe by default.** Nothing is decided until the encoder can be read as a density
(``warmup="trust"``: :func:`jepa_monitor.diagnostics.is_trusted` holds for the latest trust, and the
threshold comes from a held-out evaluation whose trust passed); a threshold older than
``max_threshold_age`` batches is refreshed before use; :class:`Drop` never leaves fewer than
``min_keep`` rows nor drops more than ``max_drop_fraction`` of a batch.

**The two-stage gate.** With ``score_key="log_density"`` (the default) the score is
``jepa_score + log_prior``; the prior term ``c`` needs the embedding only (one forward pass of the
batch), the Jacobian term K backward passes per row. The reference gives the Jacobian term's range
``[lo, hi]`` (its held-out range widened by ``gate_margin`` times its width). A row whose interval
``[c + lo, c + hi]`` lies on one side of the policy's sensitive band (Drop: the threshold; Reweight:
the band where the weight is strictly between 0 and 1) is decided from ``c`` alone (``rows_gated``);
the other, *undecided* rows need the Jacobian. That is exact as long as the incoming row's Jacobian
term lies in ``[lo, hi]``; ``rows_outside_gate`` counts scored rows whose term did not. A reference
of fewer than :data:`GATE_MIN_REFERENCE` rows gives no range, and then every row is scored.

**Caps.** At most ``max_jacobian_rows`` undecided rows per batch get the Jacobian, and inside the monitor
at most ``max_scored`` (what ``pass_share`` pays for, ``callbacks/_pacing.py``); the undecided
rows nearest the threshold by their estimate are chosen, the others are decided from the estimate
(``rows_estimated``). ``max_jacobian_rows=None`` and ``pass_share=None`` make every decision exact.
For K above :data:`SKETCH_FROM_K`, ``sketch="auto"`` scores Jacobian rows of a sketch of the output
whose level is fitted on the reference (:func:`fit_level`). ``score_key`` may also name a score of
the embedding alone (``"log_prior"``, ``"mahalanobis"``, ``"knn"``: no Jacobian at all);
``score_key="jepa_score"`` cannot be gated.

**Non-finite scores** (a NaN/Inf input row) are dropped (weight 0) and counted.

**Noisy batches** (``batch_anomaly=q_b``): a batch whose median score lies below the reference's
``q_b``-quantile gets ``batch_weight = anomalous_batch_weight`` (0 by default), multiplied into
every row's weight. For clean rows the median of n scores falls below the ``q_b``-quantile with
probability P(Binomial(n, q_b) ≥ n/2).

**DDP.** Decisions are local: each rank decides on its own rows with the threshold that every rank
calibrated from the same gathered reference; ``decide_batch`` makes no collective call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from .baselines import knn_score
from .diagnostics import is_trusted
from .reading import cross_fit, fit_reading
from .scorer import RowScorer, side_rows
from .sample_scores import COMPONENTS
from .statistics import quantiles

#: Scores a policy can read that need the embedding alone (no Jacobian): minus the squared Mahalanobis
#: distance to the reference embeddings' fitted Gaussian, minus the distance to the k-th nearest one.
EMBEDDING_SCORES = ("mahalanobis", "knn")
SCORE_KEYS = COMPONENTS + EMBEDDING_SCORES
#: Neighbours of the "knn" score.
KNN_K = 5
#: ``sketch="auto"``: exact Jacobian rows up to this K, a sketch of max(16, K // 8) directions above.
SKETCH_FROM_K = 64
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
        n_estimated: undecided rows left without the Jacobian by ``max_jacobian_rows`` (approximate).
        n_gated: rows decided exactly from the embedding alone by the cheap gate.
        n_capped: rows kept only because of ``min_keep`` / ``max_drop_fraction``.
    """

    keep: torch.Tensor
    weight: torch.Tensor
    scores: torch.Tensor
    batch_weight: float
    active: bool
    n_scored: int = 0
    n_nonfinite: int = 0
    n_estimated: int = 0
    n_gated: int = 0
    n_capped: int = 0


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


def embedding_detector(name: str, reference: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The embedding-space score ``name`` (one of :data:`EMBEDDING_SCORES`) fitted on reference
    embeddings (N, K): a function (B, K) -> float64 (B,), higher = more typical."""
    if name == "mahalanobis":
        gaussian = fit_reading(reference)
        return lambda z: -gaussian.mahalanobis(z).to(z.device)
    if name == "knn":
        ref = reference.detach()
        k = min(KNN_K, ref.shape[0])
        return lambda z: knn_score(z, ref.to(z.device), k).double()
    raise ValueError(f"{name!r} is not one of {EMBEDDING_SCORES}.")


def sketch_rows(k: int, sketch: Union[int, str, None]) -> Optional[int]:
    """Output directions of the sketched Jacobian for a K-dimensional embedding: ``sketch`` itself,
    None (exact) when it is None or at least K, and for "auto" max(16, K // 8) above
    :data:`SKETCH_FROM_K` (exact below)."""
    if sketch == "auto":
        return max(16, k // 8) if k > SKETCH_FROM_K else None
    if sketch is None or sketch >= k:
        return None
    return int(sketch)


def fit_level(sketched: torch.Tensor, exact: torch.Tensor) -> Optional[Tuple[float, float]]:
    """(a, b) of the least-squares line exact ≈ a·sketched + b over rows finite in both; None with
    fewer than 3 such rows or a constant sketched score."""
    ok = torch.isfinite(sketched) & torch.isfinite(exact)
    x, y = sketched[ok].double(), exact[ok].double()
    if x.numel() < 3 or not float(x.var()) > 0:
        return None
    a = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return a, float(y.mean() - a * x.mean())


def median_below(scores: torch.Tensor, cutoff: float) -> bool:
    """Whether the batch median (non-finite scores counted as the lowest) is below ``cutoff``:
    more than half of the rows are."""
    below = ~(torch.isfinite(scores) & (scores >= cutoff))
    return 2 * int(below.sum()) > scores.numel()


# ---------------------------------------------------------------------------------- the protocol
@runtime_checkable
class Policy(Protocol):
    """What the monitor needs of a curation policy; implement it to bring your own rule.

    - ``mode``: "drop" (rows with ``keep`` False are removed from the batch) or "reweight"
      (``weight`` is written into the batch under ``weight_key``).
    - ``pass_share``: the share of a training batch's backward passes the monitor lets this
      policy's Jacobian rows cost (passed to ``decide_batch`` as ``max_scored``), or None.
    - ``score_key``: the score the policy reads: a component ("log_density", "jepa_score",
      "log_prior") or an embedding score of :data:`EMBEDDING_SCORES` ("mahalanobis", "knn"; the
      monitor always adds ``embedding`` to the reference mapping).
    - ``counts``: cumulative counters (str -> number), all logged as ``<name>/policy/<key>_total``.
      The monitor adds ``rows_not_applied`` (rows a policy dropped that the batch type could not
      lose) and moves them out of ``rows_dropped``.
    - ``calibrate(reference, *, batch, trust)``: new held-out scores (a mapping of components) at
      training batch ``batch`` with the trust indicator of that evaluation.
    - ``needs_refresh(batch)``: True when the calibration is too old to act on; the monitor then
      re-scores the held-out set before the batch is decided.
    - ``decide_batch(scorer, x, batch, trust, side=...)`` -> :class:`Decision`. ``scorer`` is a
      :class:`~jepa_monitor.scorer.RowScorer`: ``score(x, **side) -> SampleScores``,
      ``embed(x, **side) -> (B, K)``, ``log_prior(z) -> (B,)`` (the prior term as the scores read
      it), ``sketched(m)`` (the same scorer with a sketched Jacobian) and ``synchronized``. ``max_scored``: at most that many rows scored with the Jacobian in this batch
      (the monitor's pacing of ``pass_share``; None: no cap).
    - ``record_not_applied(rows)``: ``rows`` the policy dropped stayed in the batch (it could not
      be edited); the counters should say training saw them.
    - ``sketch_rows(k)``: directions of the sketched Jacobian the policy scores rows with for a
      K-dimensional embedding, or None (exact); when not None the monitor adds the reference rows'
      sketched ``sketch_score`` to the mapping given to ``calibrate``.
    - ``state_dict()`` / ``load_state_dict(state)``: checkpointed with the monitor.
    """

    mode: str
    weight_key: str
    score_key: str
    pass_share: Optional[float]
    counts: Dict[str, float]

    def calibrate(self, reference: Reference, *, batch: int = 0, trust: Optional[float] = None) -> None: ...

    def needs_refresh(self, batch: int) -> bool: ...

    def sketch_rows(self, k: int) -> Optional[int]: ...

    def decide_batch(self, scorer: RowScorer, x: torch.Tensor, batch: int, trust: Optional[float] = None, *,
                     side: Optional[Mapping[str, Any]] = None, max_scored: Optional[int] = None) -> Decision: ...

    def record_not_applied(self, rows: int) -> None: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


#: The members of :class:`Policy`, for the error that names what a user's policy lacks.
POLICY_MEMBERS = ("mode", "weight_key", "score_key", "pass_share", "counts", "calibrate", "needs_refresh",
                  "sketch_rows", "decide_batch", "record_not_applied", "state_dict", "load_state_dict")

COUNT_KEYS = (
    "batches", "active_batches", "anomalous_batches", "rows_seen", "rows_dropped", "rows_not_applied",
    "rows_scored", "rows_sketched", "rows_gated", "rows_estimated", "rows_capped", "rows_nonfinite", "rows_outside_gate",
    "weight_sum", "calibrations_refused",
)


# ---------------------------------------------------------------------------------- policies
class ThresholdPolicy:
    """Calibration, gating and bookkeeping shared by :class:`Drop` and :class:`Reweight`: every
    option below is defined here once, and the two policies add only their own.

    Args:
        quantile: the threshold is this quantile of the held-out reference scores.
        threshold: an absolute threshold (nats) instead; the reference still calibrates the gate.
        warmup: ``"trust"`` (default): no action while the latest trust indicator is below
            :data:`jepa_monitor.diagnostics.TRUST_THRESHOLD` (:func:`~jepa_monitor.diagnostics.is_trusted`) or unknown,
            and a reference is only accepted from an evaluation whose trust passed; or a number of
            training batches before the first action (references always accepted).
        score_key: "log_density" (default), "jepa_score", or a score of the embedding alone (no
            Jacobian at all, for runs that cannot afford one): "log_prior" (the prior term as the
            scorer reads it), "mahalanobis" or "knn" (fitted on the reference embeddings).
        every_n_batches: act on every n-th batch only (the others pass untouched).
        max_threshold_age: a calibration older than this many training batches is refreshed (the
            monitor re-scores the held-out set) before it is used; None: never.
        batch_anomaly, anomalous_batch_weight: the noisy-batch rule of the module docstring.
        gate, gate_margin, max_jacobian_rows: the two-stage gate of the module docstring (``gate=False``:
            exact score for every row; ``max_jacobian_rows``: at most this many Jacobian rows per batch).
        sketch: Jacobian rows of a sketch ``P∘f`` with this many output directions instead of K
            (see :class:`jepa_monitor.Scorer`), the level mapped onto the exact score by a line fitted
            on the reference rows (given as ``sketch_score`` to :meth:`calibrate`); ``"auto"``
            (default): exact up to K = 64, max(16, K // 8) directions above; None: always exact.
        pass_share: inside the monitor, the backward passes this policy's Jacobian rows may
            add, as a share of a training batch's rows (0.2 on a 128-row batch: 25.6 passes, 1.6
            exact rows at K = 16), saved up and spent on whole batches of rows
            (``callbacks/_pacing.py``); the rest of the undecided rows are decided from the gate's
            estimate (``rows_estimated``). Counted, never timed: the same seed curates the same
            rows on any machine. None: no pacing (``max_jacobian_rows`` alone caps the rows).
        weight_key: the batch key weights are written under (dict batches).

    State (``state_dict``): ``threshold``, ``reference_median`` and ``reference_low`` (the reference's
    median and ``quantile``-quantile), ``anomaly_cutoff``, ``jacobian_range`` and ``jacobian_center``
    (the gate), ``calibrated_batch``, and ``counts``: ``batches``, ``active_batches``,
    ``anomalous_batches``, ``rows_seen``, ``rows_dropped`` (removed from training), ``rows_not_applied``
    (dropped by the decision, kept by an uneditable batch), ``rows_scored`` (Jacobian computed),
    ``rows_gated`` (decided exactly from the embedding), ``rows_estimated`` (decided from the
    estimate by the budget), ``rows_capped`` (kept by ``min_keep``/``max_drop_fraction``),
    ``rows_nonfinite``, ``rows_outside_gate``, ``weight_sum`` and ``calibrations_refused`` (held-out
    evaluations not used because trust had not passed).
    """

    mode = ""

    def __init__(
        self,
        quantile: float = 0.05,
        *,
        threshold: Optional[float] = None,
        warmup: Union[int, str] = "trust",
        score_key: str = "log_density",
        every_n_batches: int = 1,
        max_threshold_age: Optional[int] = 2000,
        batch_anomaly: Optional[float] = None,
        anomalous_batch_weight: float = 0.0,
        gate: bool = True,
        gate_margin: float = 0.1,
        max_jacobian_rows: Optional[int] = 16,
        sketch: Union[int, str, None] = "auto",
        pass_share: Optional[float] = 0.2,
        weight_key: str = "sample_weight",
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile={quantile!r} must be in (0, 1), e.g. 0.05 to act on the lowest 5%.")
        if score_key not in SCORE_KEYS:
            raise ValueError(f"score_key={score_key!r} is not one of {SCORE_KEYS}.")
        if warmup != "trust" and not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"warmup={warmup!r} must be a number of training batches (>= 0) or 'trust'.")
        if not (isinstance(every_n_batches, int) and every_n_batches >= 1):
            raise ValueError(f"every_n_batches={every_n_batches!r} must be a positive integer.")
        if max_threshold_age is not None and not (isinstance(max_threshold_age, int) and max_threshold_age >= 1):
            raise ValueError(f"max_threshold_age={max_threshold_age!r} must be a positive number of batches or None.")
        if batch_anomaly is not None and not 0.0 < batch_anomaly < 0.5:
            raise ValueError(f"batch_anomaly={batch_anomaly!r} must be a reference quantile in (0, 0.5), or None.")
        if not 0.0 <= anomalous_batch_weight <= 1.0:
            raise ValueError(f"anomalous_batch_weight={anomalous_batch_weight!r} must be in [0, 1].")
        if gate_margin < 0:
            raise ValueError(f"gate_margin={gate_margin!r} must be >= 0.")
        if max_jacobian_rows is not None and not (isinstance(max_jacobian_rows, int) and max_jacobian_rows >= 0):
            raise ValueError(f"max_jacobian_rows={max_jacobian_rows!r} must be a number of rows (>= 0) or None (no cap).")
        if pass_share is not None and not (isinstance(pass_share, (int, float)) and pass_share > 0):
            raise ValueError(f"pass_share={pass_share!r} must be a positive share of a training batch's "
                             "backward passes, or None (no pacing).")
        if not (sketch in (None, "auto") or (isinstance(sketch, int) and sketch >= 1)):
            raise ValueError(f"sketch={sketch!r} must be 'auto', a number of output directions (>= 1) or None (exact).")
        self.quantile = float(quantile)
        self.absolute_threshold = None if threshold is None else float(threshold)
        self.warmup = warmup
        self.score_key = score_key
        self.every_n_batches = every_n_batches
        self.max_threshold_age = max_threshold_age
        self.batch_anomaly = batch_anomaly
        self.anomalous_batch_weight = float(anomalous_batch_weight)
        self.gate = gate
        self.gate_margin = float(gate_margin)
        self.max_jacobian_rows = max_jacobian_rows
        self.sketch = sketch
        self.pass_share = None if pass_share is None else float(pass_share)
        self.weight_key = weight_key
        self.sketch_level: Optional[Tuple[float, float]] = None  # exact ≈ a·sketched + b on the reference
        self.sketch_dim: Optional[int] = None  # directions of the sketch that level was fitted for
        self.detector_reference: Optional[torch.Tensor] = None  # embeddings of EMBEDDING_SCORES
        self._detector: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

        self.threshold: Optional[float] = self.absolute_threshold
        self.reference_median: Optional[float] = None
        self.reference_low: Optional[float] = None  # the reference's own q-quantile
        self.anomaly_cutoff: Optional[float] = None
        self.jacobian_range: Optional[tuple] = None
        self.jacobian_center: Optional[float] = None
        self.calibrated_batch: Optional[int] = None
        self.counts: Dict[str, float] = dict.fromkeys(COUNT_KEYS, 0)

    # ------------------------------------------------------------------ calibration
    def _trusted(self, trust: Optional[float]) -> bool:
        return self.warmup != "trust" or is_trusted(trust)

    def calibrate(self, reference: Reference, *, batch: int = 0, trust: Optional[float] = None) -> None:
        """Set the threshold (and the gate) from held-out scores taken at training batch ``batch``.

        ``reference``: the held-out scores of ``score_key`` (a tensor), or a mapping of components
        (``jepa_score``, ``log_prior``, ``log_density``) as the monitor gathers them; only the mapping
        lets the gate of ``score_key="log_density"`` measure the range of the Jacobian term. The
        mapping may also hold ``embedding`` (N, K), which ``score_key="mahalanobis"``/``"knn"`` are
        fitted on (their reference scores cross-fitted, :func:`jepa_monitor.reading.cross_fit`), and
        ``sketch_score`` (the reference rows' sketched jepa_score, with ``embedding``), from which the
        line mapping sketched scores onto exact ones is fitted. With
        ``warmup="trust"``, a reference whose ``trust`` has not passed is refused (counted in
        ``calibrations_refused``): a threshold from an untrusted encoder would act on noise.
        """
        embedded = self.score_key in EMBEDDING_SCORES
        if isinstance(reference, Mapping):
            need = "embedding" if embedded else self.score_key
            if need not in reference:
                raise KeyError(f"the reference has no {need!r} entry (score_key={self.score_key!r}); "
                               f"its keys are {list(reference)}.")
            j = reference.get("jepa_score") if "log_prior" in reference else None
        elif embedded:
            raise TypeError(f"score_key={self.score_key!r} is calibrated on reference embeddings: pass a "
                            "mapping with an 'embedding' entry (N, K).")
        else:
            j = None
        if not self._trusted(trust):
            self.counts["calibrations_refused"] += 1
            return
        if embedded:
            z = torch.as_tensor(reference["embedding"]).detach().float().cpu()
            z = z[torch.isfinite(z).all(1)]
            # Each reference row scored by a detector fitted without it (a row is its own nearest neighbour).
            scores = cross_fit(z, z.shape[0], lambda ref: embedding_detector(self.score_key, ref))
            self.detector_reference, self._detector = z, embedding_detector(self.score_key, z)
            j = None
        else:
            scores = torch.as_tensor(reference if not isinstance(reference, Mapping) else reference[self.score_key])
        self.sketch_level, self.sketch_dim = None, None
        if isinstance(reference, Mapping) and "sketch_score" in reference and j is not None:
            if "embedding" not in reference:
                raise KeyError("a reference with 'sketch_score' needs its 'embedding' too (the sketch's size "
                               "follows K).")
            self.sketch_dim = self.sketch_rows(torch.as_tensor(reference["embedding"]).shape[1])
            if self.sketch_dim is not None:
                self.sketch_level = fit_level(torch.as_tensor(reference["sketch_score"]), torch.as_tensor(j))
        low = reference_quantile(scores, self.quantile)
        self.reference_low = low
        self.reference_median = reference_quantile(scores, 0.5)
        self.threshold = self.absolute_threshold if self.absolute_threshold is not None else low
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
                # A row left without its Jacobian is given the reference's median Jacobian term: its
                # likeliest side of the threshold when the term does not depend on the prior. (Mapping
                # the prior's own quantile onto the threshold instead dropped 2-4x the quantile of clean
                # rows in the demo: the reading is a little stale between refreshes.)
                self.jacobian_center = float(j.median())
        self.calibrated_batch = int(batch)
        self._calibrated()

    def _calibrated(self) -> None:
        pass

    def sketch_rows(self, k: int) -> Optional[int]:
        """Output directions of the sketched Jacobian this policy scores rows with for a K-dimensional
        embedding (None: exact); the caller calibrates its level by passing ``sketch_score`` (the
        sketched jepa_score of the reference rows) to :meth:`calibrate`."""
        if self.score_key not in ("log_density", "jepa_score"):
            return None
        return sketch_rows(k, self.sketch)

    def needs_refresh(self, batch: int) -> bool:
        """The calibration is older than ``max_threshold_age`` batches (an absolute threshold without
        a reference never is)."""
        if self.max_threshold_age is None or self.calibrated_batch is None:
            return False
        return batch - self.calibrated_batch > self.max_threshold_age

    # ------------------------------------------------------------------ per batch
    def is_active(self, batch: int, trust: Optional[float] = None) -> bool:
        """Threshold known and fresh, warm-up over (or trust passed), and ``batch`` on the cadence."""
        if self.threshold is None or not self._ready() or self.needs_refresh(batch):
            return False
        if self.warmup == "trust":
            if self.calibrated_batch is None and self.absolute_threshold is None:
                return False
            if not self._trusted(trust):
                return False
        elif batch < self.warmup:
            return False
        return batch % self.every_n_batches == 0

    def _ready(self) -> bool:
        return True

    def _band(self) -> tuple:
        """[low, high] of full scores whose exact value changes the row's decision."""
        raise NotImplementedError

    def _rows(self, effective: torch.Tensor) -> tuple:
        """(keep, weight, n_capped) from the effective per-row scores."""
        raise NotImplementedError

    def decide_batch(
        self,
        scorer: RowScorer,
        x: torch.Tensor,
        batch: int,
        trust: Optional[float] = None,
        *,
        side: Optional[Mapping[str, Any]] = None,
        max_scored: Optional[int] = None,
    ) -> Decision:
        """Decide for every row of ``x`` (B, ...).

        ``scorer``: a :class:`~jepa_monitor.scorer.RowScorer` (a :class:`~jepa_monitor.Scorer`), or
        a plain callable ``rows -> SampleScores``, which has no cheap stage: its rows are scored
        exactly, as many as the caps allow. ``batch`` is the
        caller's batch counter (warm-up, cadence), ``trust`` the latest trust indicator, ``side``
        the encoder's side inputs for these rows (sliced with them). ``max_scored``: a cap on this
        batch's Jacobian rows below ``max_jacobian_rows`` (the monitor's ``pass_share`` pacing); it
        applies where the gate has an estimate for the other rows (not with ``gate=False``).
        """
        n = x.shape[0]
        device = x.device
        self.counts["batches"] += 1
        scores = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        if not self.is_active(batch, trust):
            self.counts["rows_seen"] += n
            self.counts["weight_sum"] += n
            return Decision(torch.ones(n, dtype=torch.bool, device=device), torch.ones(n, device=device),
                            scores, 1.0, False)

        full_scorer = isinstance(scorer, RowScorer)  # else a plain callable rows -> SampleScores
        score_fn = scorer.score if full_scorer else scorer
        embed_fn = scorer.embed if full_scorer else None
        band_low, band_high = self._band()
        if self.anomaly_cutoff is not None:
            # The batch median is compared with the cutoff: rows on either side of it must be exact too.
            band_low, band_high = min(band_low, self.anomaly_cutoff), max(band_high, self.anomaly_cutoff)
        cheap, estimated = None, 0
        embedding_only = self.score_key == "log_prior" or self.score_key in EMBEDDING_SCORES
        if embed_fn is not None and self.score_key != "jepa_score" and (
            embedding_only or (self.gate and self.jacobian_range is not None)
        ):
            z = embed_fn(x, **(side or {}))
            score_of_embedding = self._detector if self.score_key in EMBEDDING_SCORES else scorer.log_prior
            cheap = score_of_embedding(z).to(device=device, dtype=torch.float32)
        elif self.score_key in EMBEDDING_SCORES:
            raise TypeError(f"score_key={self.score_key!r} needs a scorer with embed(); got {type(scorer).__name__}.")

        if cheap is None:
            full = torch.ones(n, dtype=torch.bool, device=device)
        elif embedding_only:
            full = torch.zeros(n, dtype=torch.bool, device=device)
            scores = cheap.clone()
        else:
            lo, hi = self.jacobian_range
            undecided = undecided_rows(cheap, lo, hi, band_low, band_high)
            full = undecided
            cap = min((c for c in (self.max_jacobian_rows, max_scored) if c is not None), default=None)
            if cap is not None:
                full = nearest_rows(undecided, cheap + self.jacobian_center, self.threshold, cap)
            estimated = int((undecided & ~full).sum())
        rows = full.nonzero().reshape(-1)
        sketched = self.sketch_level is not None and not embedding_only
        if sketched:
            score_fn = scorer.sketched(self.sketch_dim).score
        # A rank-synchronous scorer (sharded training) must be called on every rank alike, even with no row.
        if rows.numel() or (full_scorer and scorer.synchronized):
            s = score_fn(x[rows], **side_rows(side or {}, n, rows))
            j = s.jepa_score.to(device).double()
            if sketched:  # the sketch's level mapped onto the exact score's, fitted on the reference
                a, b = self.sketch_level
                j = a * j + b
                self.counts["rows_sketched"] += int(rows.numel())
            if sketched:
                value = j if self.score_key == "jepa_score" else j + scorer.log_prior(s.embedding).to(device).double()
            else:
                value = getattr(s, self.score_key)
            scores[rows] = value.to(device=device, dtype=torch.float32)
            if cheap is not None and self.jacobian_range is not None:
                lo, hi = self.jacobian_range
                self.counts["rows_outside_gate"] += int(((j < lo) | (j > hi)).sum())

        if cheap is None or embedding_only:
            effective = scores
        else:
            # Gated rows: any point of [lo, hi] lies on the same side of the band as the whole
            # interval; jacobian_center (calibrate) is the guess for rows left out by the budget.
            effective = torch.where(full, scores, (cheap + self.jacobian_center).to(torch.float32))
            effective = torch.where(torch.isfinite(cheap), effective, torch.full_like(effective, float("nan")))

        nonfinite = int((~torch.isfinite(effective)).sum())
        keep, weight, capped = self._rows(effective)
        batch_weight = 1.0
        if self.anomaly_cutoff is not None and median_below(effective, self.anomaly_cutoff):
            batch_weight = self.anomalous_batch_weight
            self.counts["anomalous_batches"] += 1
        weight = weight * batch_weight
        gated = n - int(rows.numel()) - estimated if cheap is not None else 0
        self.counts["active_batches"] += 1
        self.counts["rows_seen"] += n
        self.counts["rows_dropped"] += int((~keep).sum())
        self.counts["rows_scored"] += int(rows.numel())
        self.counts["rows_gated"] += gated
        self.counts["rows_nonfinite"] += nonfinite
        self.counts["rows_estimated"] += estimated
        self.counts["rows_capped"] += capped
        self.counts["weight_sum"] += float(weight.sum())
        return Decision(keep, weight, scores, batch_weight, True, int(rows.numel()), nonfinite, estimated,
                        gated, capped)

    def record_not_applied(self, rows: int) -> None:
        """``rows`` this policy dropped were kept in the batch (it could not be edited): count them
        as not applied, so ``rows_dropped`` says what training did not see."""
        self.counts["rows_dropped"] -= rows
        self.counts["rows_not_applied"] += rows

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        return {
            "threshold": self.threshold,
            "reference_median": self.reference_median,
            "reference_low": self.reference_low,
            "anomaly_cutoff": self.anomaly_cutoff,
            "jacobian_range": self.jacobian_range,
            "jacobian_center": self.jacobian_center,
            "calibrated_batch": self.calibrated_batch,
            "counts": dict(self.counts),
            "sketch_level": self.sketch_level,
            "sketch_dim": self.sketch_dim,
            "detector_reference": self.detector_reference,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.threshold = state["threshold"]
        self.reference_median = state["reference_median"]
        self.reference_low = state["reference_low"]
        self.anomaly_cutoff = state["anomaly_cutoff"]
        self.jacobian_range = None if state["jacobian_range"] is None else tuple(state["jacobian_range"])
        self.jacobian_center = state["jacobian_center"]
        self.calibrated_batch = state.get("calibrated_batch", state.get("calibrated_step"))
        self.counts = {**dict.fromkeys(COUNT_KEYS, 0), **state["counts"]}
        level = state.get("sketch_level")  # absent from checkpoints of earlier releases
        self.sketch_level = None if level is None else tuple(level)
        self.sketch_dim = state.get("sketch_dim")
        self.detector_reference = state.get("detector_reference")
        self._detector = None if self.detector_reference is None else embedding_detector(
            self.score_key, self.detector_reference)
        self._calibrated()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quantile={self.quantile}, score_key={self.score_key!r}, threshold={self.threshold})"


class Drop(ThresholdPolicy):
    """Drop rows whose score is below the threshold.

    Args:
        quantile: the threshold is this quantile of the held-out reference scores.
        min_keep: the fewest rows a batch keeps (the highest-scoring ones), at least 1. The default 2
            keeps a BatchNorm layer in the training step working (one row raises in train mode).
        max_drop_fraction: never drop more than this fraction of a batch (rounded down); the
            highest-scoring rows below the threshold are kept first. 1.0 lifts the cap.
        threshold, warmup, score_key, every_n_batches, max_threshold_age, batch_anomaly,
        anomalous_batch_weight, gate, gate_margin, max_jacobian_rows, sketch, pass_share, weight_key:
            the options every threshold policy shares, documented in :class:`ThresholdPolicy`.
    """

    mode = "drop"

    def __init__(
        self,
        quantile: float = 0.05,
        *,
        min_keep: int = 2,
        max_drop_fraction: float = 0.5,
        threshold: Optional[float] = None,
        warmup: Union[int, str] = "trust",
        score_key: str = "log_density",
        every_n_batches: int = 1,
        max_threshold_age: Optional[int] = 2000,
        batch_anomaly: Optional[float] = None,
        anomalous_batch_weight: float = 0.0,
        gate: bool = True,
        gate_margin: float = 0.1,
        max_jacobian_rows: Optional[int] = 16,
        sketch: Union[int, str, None] = "auto",
        pass_share: Optional[float] = 0.2,
        weight_key: str = "sample_weight",
    ) -> None:
        if not (isinstance(min_keep, int) and min_keep >= 1):
            raise ValueError(f"min_keep={min_keep!r} must be an integer >= 1: a training batch is never emptied.")
        if not 0.0 < max_drop_fraction <= 1.0:
            raise ValueError(f"max_drop_fraction={max_drop_fraction!r} must be in (0, 1].")
        super().__init__(quantile, threshold=threshold, warmup=warmup, score_key=score_key,
                         every_n_batches=every_n_batches, max_threshold_age=max_threshold_age,
                         batch_anomaly=batch_anomaly, anomalous_batch_weight=anomalous_batch_weight, gate=gate,
                         gate_margin=gate_margin, max_jacobian_rows=max_jacobian_rows, sketch=sketch,
                         pass_share=pass_share, weight_key=weight_key)
        self.min_keep = min_keep
        self.max_drop_fraction = float(max_drop_fraction)

    def _band(self) -> tuple:
        return self.threshold, self.threshold

    def _rows(self, effective: torch.Tensor) -> tuple:
        n = effective.numel()
        floor = max(self.min_keep, n - int(self.max_drop_fraction * n))
        uncapped = int((torch.isfinite(effective) & (effective >= self.threshold)).sum())
        keep = drop_mask(effective, self.threshold, floor)
        return keep, keep.to(torch.float32), max(0, min(floor, n) - uncapped)


class Reweight(ThresholdPolicy):
    """Weight every row by :func:`soft_weights` of its score; rows are never removed.

    The weight is ½ at the threshold, 0 at or below ``threshold - scale`` and 1 at or above
    ``threshold + scale``, with ``scale = temperature · (median - quantile)`` of the reference
    scores: with the default 0.5, rows at the typical (median) held-out density weigh exactly 1.

    Args:
        quantile: the threshold is this quantile of the held-out reference scores.
        temperature: width of the transition, in units of the reference's median-to-quantile gap.
        threshold, warmup, score_key, every_n_batches, max_threshold_age, batch_anomaly,
        anomalous_batch_weight, gate, gate_margin, max_jacobian_rows, sketch, pass_share, weight_key:
            the options every threshold policy shares, documented in :class:`ThresholdPolicy`.
    """

    mode = "reweight"

    def __init__(
        self,
        quantile: float = 0.05,
        *,
        temperature: float = 0.5,
        threshold: Optional[float] = None,
        warmup: Union[int, str] = "trust",
        score_key: str = "log_density",
        every_n_batches: int = 1,
        max_threshold_age: Optional[int] = 2000,
        batch_anomaly: Optional[float] = None,
        anomalous_batch_weight: float = 0.0,
        gate: bool = True,
        gate_margin: float = 0.1,
        max_jacobian_rows: Optional[int] = 16,
        sketch: Union[int, str, None] = "auto",
        pass_share: Optional[float] = 0.2,
        weight_key: str = "sample_weight",
    ) -> None:
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature!r} must be >= 0 (0: a hard step, as Drop without dropping).")
        super().__init__(quantile, threshold=threshold, warmup=warmup, score_key=score_key,
                         every_n_batches=every_n_batches, max_threshold_age=max_threshold_age,
                         batch_anomaly=batch_anomaly, anomalous_batch_weight=anomalous_batch_weight, gate=gate,
                         gate_margin=gate_margin, max_jacobian_rows=max_jacobian_rows, sketch=sketch,
                         pass_share=pass_share, weight_key=weight_key)
        self.temperature = float(temperature)
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
        return torch.ones_like(weight, dtype=torch.bool), weight, 0
