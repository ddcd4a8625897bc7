"""How well a typicality score separates inliers from outliers, and how scores agree with each other.

:func:`ood_metrics` (AUROC, FPR at 95% TPR), :func:`spearman` (rank correlation) and
:func:`compare_scores`, which puts JEPA-SCORE, log_density and the embedding-space baselines of
:mod:`jepa_monitor.baselines` side by side on one inlier and one outlier set.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

from .baselines import GaussianPriorScore, KNNScore, MahalanobisScore
from .gaussian import Shrinkage
from .scorer import Scorer, as_scorer
from .sample_scores import SampleScores
from .statistics import rankdata, spearman

DEFAULT_MIN_SPEARMAN = 0.9

TPR_PERCENT = 95
SCORE_NAMES = ("jepa_score", "log_density", "log_prior", "mahalanobis", "knn")


def _drop_nan(scores: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{what} must be a 1-D tensor of scores; got {shape}.")
    nan = torch.isnan(scores)
    if bool(nan.any()):
        warnings.warn(f"{what}: {int(nan.sum())} of {scores.numel()} scores are NaN and were left out.", stacklevel=3)
    return scores[~nan]


def _dense_ranks01(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of x onto [0, 1] (equal values stay equal).

    torchmetrics treats predictions outside [0, 1] as logits and applies a sigmoid, which saturates
    in float32 for log-densities of a few tens of nats and would turn distinct scores into ties.
    """
    _, inverse = torch.unique(x, sorted=True, return_inverse=True)
    return inverse.to(torch.float64) / max(1, int(inverse.max()))


def ood_metrics(inlier_scores: torch.Tensor, outlier_scores: torch.Tensor) -> Dict[str, torch.Tensor]:
    """AUROC and FPR95 of a "higher = more typical" score, inliers being the positive class.

    - ``auroc``: probability that a random inlier scores above a random outlier (ties count ½);
      1 = perfect, 0.5 = chance, below 0.5 = the score ranks outliers as more typical.
    - ``fpr95``: the fraction of outliers kept by the highest threshold that keeps at least 95% of
      the inliers (``score >= threshold``); 0 = perfect, lower is better.

    NaN scores are left out of both sets with a warning (±Inf are kept: they are ordered). If a
    set is empty after that, both metrics are NaN. Returns 0-dim float32 tensors.
    """
    inl = _drop_nan(inlier_scores, "inlier_scores")
    out = _drop_nan(outlier_scores, "outlier_scores")
    if inl.numel() == 0 or out.numel() == 0:
        warnings.warn("ood_metrics needs at least one inlier and one outlier score; returning NaN.", stacklevel=2)
        nan = torch.tensor(float("nan"))
        return {"auroc": nan, "fpr95": nan.clone()}
    preds = _dense_ranks01(torch.cat([inl.to(torch.float64), out.to(torch.float64).to(inl.device)]))
    target = torch.cat([torch.ones(inl.numel()), torch.zeros(out.numel())]).to(device=preds.device, dtype=torch.long)
    fpr, tpr, _ = binary_roc(preds, target)
    # Compare counts, not float32 rates: 0.95 is not exact in binary.
    n_keep = -(-TPR_PERCENT * inl.numel() // 100)
    return {
        "auroc": binary_auroc(preds, target).to(torch.float32),
        "fpr95": fpr[tpr.double() * inl.numel() >= n_keep - 0.5].min().to(torch.float32),
    }


def fit_baselines(
    reference_embedding: torch.Tensor, *, knn_k: int = 5, shrinkage: Shrinkage = 0.0
) -> Dict[str, Any]:
    """The three embedding-space baselines, fitted on (N, K) reference embeddings, by name."""
    return {
        "log_prior": GaussianPriorScore().fit(reference_embedding),
        "mahalanobis": MahalanobisScore(shrinkage=shrinkage).fit(reference_embedding),
        "knn": KNNScore(knn_k).fit(reference_embedding),
    }


def score_columns(scores: SampleScores, baselines: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Every score of one scored set, by name: jepa_score, log_density and each fitted baseline."""
    columns = {"jepa_score": scores.jepa_score, "log_density": scores.log_density}
    for name, baseline in baselines.items():
        columns[name] = baseline.score(scores.embedding)
    return columns


def compare_scores(
    encoder: Union[Scorer, Callable[[torch.Tensor], Any]],
    reference_x: torch.Tensor,
    inlier_x: torch.Tensor,
    outlier_x: torch.Tensor,
    *,
    knn_k: int = 5,
    shrinkage: Shrinkage = 0.0,
    **score_options: Any,
) -> Dict[str, Dict[str, torch.Tensor]]:
    """AUROC and FPR95 of every score (names in ``SCORE_NAMES``) on inliers vs outliers.

    ``reference_x`` must be distinct from ``inlier_x``: the Mahalanobis and kNN baselines are fitted
    on its embeddings (a sample is its own nearest neighbour). ``encoder`` is a
    :class:`~jepa_monitor.scorer.Scorer`, or an encoder with ``score_options``.

    Returns ``{score name: {"auroc": ..., "fpr95": ...}}``.
    """
    scorer = as_scorer(encoder, **score_options)
    reference = scorer.score(reference_x)
    baselines = fit_baselines(reference.embedding, knn_k=knn_k, shrinkage=shrinkage)
    inl = score_columns(scorer.score(inlier_x), baselines)
    out = score_columns(scorer.score(outlier_x), baselines)
    return {name: ood_metrics(inl[name], out[name]) for name in inl}


@dataclass
class CalibrationReport:
    """Approximate versus exact JEPA-SCORE on the same samples.

    Attributes:
        spearman: rank correlation between the two scores (what monitoring and curation rely on).
        mean_bias: mean of approximate − exact, in nats.
        max_abs_error: largest |approximate − exact|, in nats.
        n: samples compared (rows where both scores are finite).
        min_spearman: the threshold ``ok`` is judged against.
        exact, approx: the float32 (B,) scores themselves.
    """

    spearman: float
    mean_bias: float
    max_abs_error: float
    n: int
    min_spearman: float
    exact: torch.Tensor
    approx: torch.Tensor

    @property
    def ok(self) -> bool:
        """The approximation ranks like the exact score on this subset."""
        return math.isfinite(self.spearman) and self.spearman >= self.min_spearman


def calibrate(
    encoder: Union[Scorer, Callable[[torch.Tensor], Any]],
    x: torch.Tensor,
    *,
    method: str = "slq",
    approx_options: Optional[dict] = None,
    min_spearman: float = DEFAULT_MIN_SPEARMAN,
    **score_options: Any,
) -> CalibrationReport:
    """Score ``x`` (a modest subset: the exact path runs on it) exactly and with ``method``, and compare.

    ``encoder``: a :class:`~jepa_monitor.scorer.Scorer` or an encoder with ``score_options``.

    Warns when the approximation's Spearman correlation with the exact score is below
    ``min_spearman``: then use ``method="exact"`` or raise ``num_probes``/``lanczos_steps``.
    """
    base = as_scorer(encoder, **score_options)
    exact = base.replace(method="exact").score(x).jepa_score
    approx = base.replace(method=method, approx_options=approx_options).score(x).jepa_score
    keep = torch.isfinite(exact) & torch.isfinite(approx)
    e, a = exact[keep].to(torch.float64), approx[keep].to(torch.float64)
    count = int(keep.sum())
    if count < 3:
        raise ValueError(f"calibration needs at least 3 samples with finite scores; got {count}.")
    diff = a - e
    report = CalibrationReport(
        spearman=float(spearman(a, e)),
        mean_bias=float(diff.mean()),
        max_abs_error=float(diff.abs().max()),
        n=count,
        min_spearman=min_spearman,
        exact=exact,
        approx=approx,
    )
    if not report.ok:
        warnings.warn(
            f"method={method!r} ranks samples unlike the exact score on this subset "
            f"(Spearman {report.spearman:.3f} < {min_spearman}, mean bias {report.mean_bias:.2f} nats): "
            "use method='exact', or raise approx_options num_probes / lanczos_steps and calibrate again.",
            stacklevel=2,
        )
    return report
