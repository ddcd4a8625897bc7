"""The Gaussian the embeddings are read against: its log-density and a fit of it to reference rows.

One definition each of: ½·log 2π, the isotropic prior log N(z; 0, I), the Ledoit–Wolf shrinkage
intensity, and the mean/covariance fit with shrinkage that both whitening
(:mod:`jepa_monitor.whitening`) and the Mahalanobis baseline (:mod:`jepa_monitor.baselines`) use.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
Shrinkage = Union[str, float]
#: Names accepted for the Ledoit–Wolf estimate of the shrinkage intensity.
AUTO_SHRINKAGE = ("auto", "ledoit_wolf")
#: The smallest shrinkage "auto" uses when Ledoit–Wolf alone leaves the covariance singular.
AUTO_MIN_SHRINKAGE = 1e-6


def _singular(cov: torch.Tensor) -> bool:
    evals = torch.linalg.eigvalsh(cov)
    return not bool(evals[0] > 1e-12 * evals[-1].abs().clamp_min(1e-300))


def log_prior64(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row of a (B, K) embedding, float64 (B,)."""
    z64 = z.to(torch.float64)
    return -0.5 * z64.pow(2).sum(-1) - z.shape[-1] * HALF_LOG_2PI


def gaussian_log_prior(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row of a (B, K) embedding, computed in float64, returned float32."""
    return log_prior64(z).to(torch.float32)


def ledoit_wolf_shrinkage(centered: torch.Tensor) -> float:
    """Ledoit–Wolf optimal shrinkage intensity towards (tr S / K)·I for centred (N, K) data.

    The same estimate as ``sklearn.covariance.ledoit_wolf_shrinkage`` (float64).
    """
    x = centered.to(torch.float64)
    n, p = x.shape
    if p == 1:
        return 0.0  # one dimension: the target is the covariance itself
    x2 = x.pow(2)
    trace_terms = x2.sum(0) / n
    mu = trace_terms.sum() / p
    beta_ = (x2.T @ x2).sum()
    delta_ = (x.T @ x).pow(2).sum() / n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace_terms.sum() + p * mu**2) / p
    beta = torch.minimum(beta, delta)
    return 0.0 if float(beta) == 0.0 else float(beta / delta)


def fit_gaussian(z: torch.Tensor, shrinkage: Shrinkage = 0.0) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(mean (K,), covariance (K, K), shrinkage used) of finite (N, K) rows, float64.

    The covariance is the maximum-likelihood one (divided by N), shrunk towards its average
    variance: Σ = (1 - α)·S + α·(tr S / K)·I, with α = ``shrinkage`` in [0, 1] or ``"auto"`` /
    ``"ledoit_wolf"`` (estimated from the data; raised to :data:`AUTO_MIN_SHRINKAGE` where that
    alone leaves Σ singular, e.g. for two rows). Raises when the rows do not vary at all, up to
    rounding (a collapsed encoder has no covariance to fit).
    """
    x = z.detach().to(torch.float64)
    n, k = x.shape
    if n < 2:
        raise ValueError(f"fitting a Gaussian needs at least 2 finite rows; got {n}.")
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / n
    scale = cov.trace() / k
    # Relative: rows equal up to rounding (0.3 is not exact in binary) leave a trace of ~1e-31.
    if not scale > 1e-12 * float(x.pow(2).mean()):
        raise ValueError(
            "the reference embeddings are all identical: the encoder has collapsed and there is "
            "no covariance to fit."
        )
    if isinstance(shrinkage, str):
        if shrinkage not in AUTO_SHRINKAGE:
            raise ValueError(f"shrinkage must be a number in [0, 1] or one of {AUTO_SHRINKAGE}; got {shrinkage!r}.")
        alpha = ledoit_wolf_shrinkage(centred)
        if n <= 2 or alpha < AUTO_MIN_SHRINKAGE and _singular((1.0 - alpha) * cov + alpha * scale * torch.eye(
                k, dtype=torch.float64, device=cov.device)):
            # Ledoit–Wolf is exactly 0 for two rows (d and -d): the smallest shrinkage that keeps
            # the promise of a positive-definite fit whenever the rows vary.
            alpha = max(alpha, AUTO_MIN_SHRINKAGE)
    elif 0.0 <= float(shrinkage) <= 1.0:
        alpha = float(shrinkage)
    else:
        raise ValueError(f"shrinkage must be a number in [0, 1] or one of {AUTO_SHRINKAGE}; got {shrinkage!r}.")
    cov = (1.0 - alpha) * cov + alpha * scale * torch.eye(k, dtype=torch.float64, device=cov.device)
    return mean, cov, alpha
