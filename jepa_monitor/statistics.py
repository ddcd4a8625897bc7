"""Summaries of a score distribution and its distance from a reference distribution.

Pure functions of 1-D tensors. Non-finite values (a NaN/Inf input row gets a non-finite score) are
left out of every statistic and counted separately, so one bad row never turns a whole summary
into NaN. Distances are computed in float64: scores are log-densities of a few hundred nats, and a
float32 CDF difference would round away small shifts.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

SUMMARY_QUANTILES = {"p1": 0.01, "p5": 0.05, "p50": 0.50, "p95": 0.95}


def _finite64(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach().reshape(-1).to(torch.float64)
    return x[torch.isfinite(x)]


def quantiles(x: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles of the finite values of ``x`` (linear interpolation, as ``numpy.quantile``), float64.

    NaN for every q when ``x`` has no finite value.
    """
    v = _finite64(x)
    q = torch.as_tensor(list(qs), dtype=torch.float64, device=v.device)
    if v.numel() == 0:
        return torch.full_like(q, float("nan"))
    return torch.quantile(v, q)


def _ecdf_at(sorted_values: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(sorted_values, points, right=True).to(torch.float64) / sorted_values.numel()


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two-sample Kolmogorov–Smirnov statistic sup_t |F_a(t) - F_b(t)| in [0, 1], float64 scalar.

    Same value as ``scipy.stats.ks_2samp(a, b).statistic``. NaN when either side has no finite value.
    """
    a, b = _finite64(a), _finite64(b)
    if a.numel() == 0 or b.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    a, b = a.sort().values, b.sort().values
    # Both ECDFs are step functions that only jump at sample points, so the supremum is attained there.
    points = torch.cat([a, b])
    return (_ecdf_at(a, points) - _ecdf_at(b, points)).abs().max()


def wasserstein_1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Wasserstein-1 (earth mover's) distance ∫ |F_a(t) - F_b(t)| dt between two samples, float64 scalar.

    In the units of the scores (nats). Same value as ``scipy.stats.wasserstein_distance(a, b)``.
    NaN when either side has no finite value.
    """
    a, b = _finite64(a), _finite64(b)
    if a.numel() == 0 or b.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    a, b = a.sort().values, b.sort().values
    points = torch.cat([a, b]).sort().values
    widths = points[1:] - points[:-1]
    left = points[:-1]
    return ((_ecdf_at(a, left) - _ecdf_at(b, left)).abs() * widths).sum()


def summarize(x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """mean, std (unbiased), p1, p5, p50, p95 of the finite values of ``x``, plus ``nonfinite`` (count).

    Every entry is a float64 scalar tensor; statistics are NaN when no value is finite (std also
    when only one is).
    """
    raw = torch.as_tensor(x).detach().reshape(-1)
    v = _finite64(raw)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    out = {
        "mean": v.mean() if v.numel() else nan,
        "std": v.std() if v.numel() > 1 else nan,
    }
    for key, q in zip(SUMMARY_QUANTILES, quantiles(v, SUMMARY_QUANTILES.values())):
        out[key] = q
    out["nonfinite"] = torch.tensor(float(raw.numel() - v.numel()), dtype=torch.float64)
    return out


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
