"""How well a typicality score separates inliers from outliers, and how scores agree with each other.

:func:`ood_metrics` (AUROC, FPR at 95% TPR), :func:`spearman` (rank correlation) and
:func:`compare_scores`, which puts JEPA-SCORE, log_density and the embedding-space baselines of
:mod:`jepa_monitor.baselines` side by side on one inlier and one outlier set.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Mapping

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

from .baselines import GaussianPriorScore, KNNScore, MahalanobisScore, Shrinkage
from .scoring import SampleScores, score_samples

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


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of a 1-D tensor, ties sharing their average rank (scipy's "average"), float64."""
    sorted_x, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    average = counts.cumsum(0) - (counts - 1) / 2
    ranks = torch.empty(x.numel(), dtype=torch.float64, device=x.device)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor, *, nan_policy: str = "propagate") -> torch.Tensor:
    """Spearman rank correlation of two 1-D tensors of equal length, 0-dim float64 tensor.

    ``nan_policy``: "propagate" returns NaN when either input has a NaN (as scipy does), "omit"
    drops the pairs with a NaN. A constant input (or fewer than 2 pairs) gives NaN.
    """
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"spearman needs two 1-D tensors of equal length; got {tuple(a.shape)} and {tuple(b.shape)}.")
    if nan_policy not in ("propagate", "omit"):
        raise ValueError(f"nan_policy must be 'propagate' or 'omit'; got {nan_policy!r}.")
    b = b.to(a.device)
    nan = torch.isnan(a) | torch.isnan(b)
    if bool(nan.any()):
        if nan_policy == "propagate":
            return torch.tensor(float("nan"), dtype=torch.float64)
        a, b = a[~nan], b[~nan]
    if a.numel() < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    ra = rankdata(a)
    rb = rankdata(b)
    ra = ra - ra.mean()
    rb = rb - rb.mean()
    denom = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    if float(denom) == 0.0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (ra * rb).sum() / denom


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
    encoder: Callable[[torch.Tensor], Any],
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
    on its embeddings (a sample is its own nearest neighbour). Each set is scored by one
    :func:`~jepa_monitor.score_samples` call with ``score_options``.

    Returns ``{score name: {"auroc": ..., "fpr95": ...}}``.
    """
    reference = score_samples(encoder, reference_x, **score_options)
    baselines = fit_baselines(reference.embedding, knn_k=knn_k, shrinkage=shrinkage)
    inl = score_columns(score_samples(encoder, inlier_x, **score_options), baselines)
    out = score_columns(score_samples(encoder, outlier_x, **score_options), baselines)
    return {name: ood_metrics(inl[name], out[name]) for name in inl}
