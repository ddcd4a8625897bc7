"""Can the scores be read as a density? Gaussianity diagnostics, one trust number, score agreement.

JEPA-SCORE + the isotropic Gaussian term is a log-density only when the encoder pushes the data
onto N(0, I_K), the state the anti-collapse (SIGReg) term aims for. These functions measure how far
held-out embeddings z (N, K) are from that state, in float64, and turn the answer into one trust
number in [0, 1] and the name of the diagnostic to blame.

The departure is split into three orthogonal parts, so that each constructed failure moves one
diagnostic and the culprit can be named: the mean (``mean_offset``), the covariance of the centred
embeddings (``eig_max``, ``eig_min``), and the shape that is left after whitening with the sample
covariance (``shape_epps_pulley``, ``shape_norm_cv_ratio``). The raw SIGReg statistic, the
condition number, the effective rank and the raw norm statistics are reported for reading, not
scored: each of them mixes several parts.

Keys of :func:`gaussianity_report` (all floats):

- ``n_samples``, ``dim``: N finite rows used, K.
- ``epps_pulley``: the SIGReg / Epps–Pulley statistic of z itself, averaged over random
  directions (see :func:`jepa_monitor.gaussianity.epps_pulley`). Under N(0, I) its mean is about
  1.05 whatever N is (simulated 99th percentile 1.4–3.0 for N = 256–1024, highest at small K);
  ``epps_pulley / N`` estimates the divergence of the 1-D marginals from N(0, 1), so the same
  departure gives a number that grows with N.
- ``mean_offset``: ‖mean(z)‖ / √K, the RMS offset per coordinate in units of the target's standard
  deviation. The isotropic term then carries a spurious linear term zᵀμ whose spread is ‖μ‖ nats,
  against √(K/2) for the term itself. Under N(0, I) it is √(χ²_K / (N K)) ≈ 1/√N.
- ``eig_max``, ``eig_min``: largest and smallest eigenvalue of the sample covariance (1/(N-1)).
  Target 1. Sampling alone spreads them over the Marchenko–Pastur range (1 ± √(K/N))². A large
  ``eig_max`` is a stretched direction (anisotropy, or the whole scale too large); a small
  ``eig_min`` is a collapsed direction (dimensional collapse, or the whole scale too small).
- ``condition_number``: eig_max / eig_min (inf when the covariance is singular).
- ``effective_rank``: exp(entropy of the normalised eigenvalues) / K, in (0, 1]; 1/K for a rank-1
  collapse, 0 when every embedding is the same.
- ``norm_mean``: mean of ‖z‖ / √K; ≈ 1 - 1/(4K) under N(0, I).
- ``norm_cv_ratio``: coefficient of variation of ‖z‖ divided by that of the χ_K distribution (the
  norm of N(0, I_K)); 1 under the target, > 1 when norms do not concentrate.
- ``shape_epps_pulley``: the Epps–Pulley statistic of the whitened embeddings (mean removed,
  sample covariance made the identity, on the numerical range of the covariance): non-Gaussian
  shape of the 1-D marginals (heavy tails, skew, several modes) that no affine map explains.
  Simulated under N(0, I): mean 0.33, maximum 1.45 over N = 256–1024, K = 2–128.
- ``shape_norm_cv_ratio``: coefficient of variation of the whitened norms divided by its exact
  null value (squared Mahalanobis distances of the fitting sample are scaled Beta(r/2, (N-r-1)/2)
  variables, r the rank): > 1 heavy radial tails, < 1 norms too concentrated (e.g. a shell).
  NaN when the covariance is zero.

The covariance diagnostics need N > K rows (N >= 4K recommended: below that the sampling spread
of the eigenvalues is as wide as the departures worth reporting); when K >= N - 1, ``eig_min`` is
not scored and the shape keys are NaN.

Trust. Each scored diagnostic gets a severity x >= 0: how far it lies beyond the range an exact
N(0, I_K) sample of the same N and K produces (99.9% and above in simulation, so an exactly
Gaussian embedding has x = 0), in units of a tolerance at which the density reading becomes
doubtful. Its factor is 1 / (1 + x²): 1 inside the null range, 0.5 at the doubt threshold, 0.2 at
twice the tolerance beyond it. ``trust_score`` is the smallest factor; ``weakest_diagnostic``
names it. ``trust_score >= TRUST_THRESHOLD`` (0.5) therefore means "no diagnostic is past its
doubt threshold".

======================  ==============================================  ==========================
diagnostic              null bound (N samples, K dims, γ = K/(N-1))     tolerance (x = 1)
======================  ==============================================  ==========================
mean_offset             √(q₀.₉₉₉(χ²_K) / (N K))  (≈ 0.07 at N=512, K=16)  +0.25
eig_max                 (1 + √γ)² · exp(2.5/√N)                          ×2
eig_min                 (1 - √γ)² · exp(-3.5/√N) (uninformative if γ≥1)  ÷2
shape_epps_pulley       1.5                                              +0.01 · N
shape_norm_cv_ratio     exp(±3.5/√N)                                     ×1.5 or ÷1.5
======================  ==============================================  ==========================

Why these tolerances. With embeddings N(μ, Σ) the correct Gaussian term is log N(z; μ, Σ); the
error of the isotropic term, e(z), has variance ½Σᵢ(λᵢ - 1)² + μᵀΣμ, against K/2 for the term
itself. A mean offset of 0.25 per coordinate makes that ratio of standard deviations √2·0.25 ≈
0.35: the isotropic term then ranks samples with a Spearman correlation of 0.94 to the corrected
one (simulated, K = 16 and 64), and the error grows linearly beyond. A variance off by a factor 2
beyond sampling noise (standard deviation ×1.4) in one direction is the same order for K ≈ 16
(one such direction gives a ratio |λ - 1|/√K). A uniform change of scale leaves the ranking of
the Gaussian term unchanged (it only reweights it against JEPA-SCORE), so it has no diagnostic of
its own; ``eig_max`` / ``eig_min`` catch it once the variance is off by more than that factor 2
beyond sampling noise. For the shape, a divergence of 0.01 per
sample is what Student-t marginals with about 5 degrees of freedom (excess kurtosis 6) or Laplace
marginals produce (0.009 and 0.016); heavier tails make the Gaussian term wrong by many nats on the
extreme samples, which are the ones curation acts on. A norm spread 1.5× that of χ_K means the
Gaussian term's spread over the data is off by as much.

Agreement. :func:`score_agreement` gives the Spearman correlation of every pair of scores on the
held-out set (all oriented "higher = more typical"); :func:`disagreement` lists the pairs below
``DISAGREEMENT_THRESHOLD`` (0.1): scores meant to measure typicality that are uncorrelated or
anti-correlated cannot all be read as density.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Dict, List, Mapping, Optional

import torch

from .evaluation import spearman
from .gaussianity import epps_pulley, random_directions

TRUST_THRESHOLD = 0.5
DISAGREEMENT_THRESHOLD = 0.1
TRUST_KEYS = ("mean_offset", "eig_max", "eig_min", "shape_epps_pulley", "shape_norm_cv_ratio")
REPORT_KEYS = (
    "n_samples", "dim", "epps_pulley", "mean_offset", "eig_max", "eig_min", "condition_number",
    "effective_rank", "norm_mean", "norm_cv_ratio", "shape_epps_pulley", "shape_norm_cv_ratio",
)

# Fixed so that successive held-out evaluations project on the same directions and stay comparable.
_DEFAULT_SEED = 20251007
# Directions whose variance is below this fraction of the largest are treated as absent when
# whitening: far above float32 rounding noise (~1e-14 relative), so noise is never amplified.
_RANK_RTOL = 1e-6
_NOISE_RTOL = 1e-12
_Z_999 = 3.090232306167813  # standard normal 99.9% quantile

MEAN_TOL = 0.25
EIG_TOL = 2.0
SHAPE_EP_NULL = 1.5
SHAPE_EP_TOL = 0.01
NORM_CV_TOL = 1.5
_EIG_MAX_MARGIN = 2.5
_EIG_MIN_MARGIN = 3.5
_NORM_CV_MARGIN = 3.5


def _chi_cv(k: int) -> float:
    """Coefficient of variation of the χ_k distribution, ‖N(0, I_k)‖."""
    mean = math.sqrt(2.0) * math.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))
    return math.sqrt(max(k - mean * mean, 0.0)) / mean


def _sqrt_beta_cv(a: float, b: float) -> float:
    """Coefficient of variation of √B for B ~ Beta(a, b)."""
    mean_sqrt = math.exp(math.lgamma(a + 0.5) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(a + b + 0.5))
    mean = a / (a + b)
    return math.sqrt(max(mean - mean_sqrt**2, 0.0)) / mean_sqrt


def _chi2_quantile(k: int, z: float) -> float:
    """Wilson–Hilferty approximation of a χ²_k quantile (relative error < 1% for k >= 1 at 99.9%)."""
    c = 2.0 / (9.0 * k)
    return k * (1.0 - c + z * math.sqrt(c)) ** 3


def gaussianity_report(
    z: torch.Tensor, *, generator: Optional[torch.Generator] = None, num_directions: int = 64
) -> Dict[str, float]:
    """How far embeddings ``z`` (N, K) are from N(0, I_K); every key is explained in the module doc.

    Rows with a non-finite entry are left out (``n_samples`` counts the rows used). Random
    directions come from ``generator`` when given, otherwise from a private generator with a fixed
    seed; the global RNG is never touched. Computed in float64.

    Returns a dict with the keys of ``REPORT_KEYS``: n_samples, dim, epps_pulley, mean_offset,
    eig_max, eig_min, condition_number, effective_rank, norm_mean, norm_cv_ratio,
    shape_epps_pulley, shape_norm_cv_ratio.
    """
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a (N, K) tensor of embeddings; got {shape}. Pool token outputs first.")
    z = z.detach().to(torch.float64)
    z = z[torch.isfinite(z).all(dim=1)]
    n, k = z.shape
    if n < 2 or k < 1:
        raise ValueError(f"gaussianity_report needs at least 2 finite rows and 1 column; got {n} x {k}.")
    if generator is None:
        generator = torch.Generator(device=z.device).manual_seed(_DEFAULT_SEED)

    mean = z.mean(0)
    centred = z - mean
    cov = centred.T @ centred / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)
    # Variance below this is rounding noise of the centring (a constant column is not exactly
    # constant after z - mean in floating point), not a direction the encoder uses.
    noise_floor = _NOISE_RTOL * z.pow(2).mean().item()
    evals = torch.where(evals > noise_floor, evals, torch.zeros_like(evals))
    eig_max, eig_min = evals[-1].item(), evals[0].item()
    total = evals.sum().item()
    if total > 0:
        p = evals / total
        entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum().item()
        effective_rank = math.exp(entropy) / k
    else:
        effective_rank = 0.0

    norms = z.norm(dim=1)
    norm_mean = norms.mean().item()
    norm_cv = (norms.std() / norms.mean()).item() if norm_mean > 0 else float("nan")

    directions = random_directions(k, num_directions, generator=generator, device=z.device, dtype=torch.float64)
    report = {
        "n_samples": float(n),
        "dim": float(k),
        "epps_pulley": epps_pulley(z, directions).item(),
        "mean_offset": (mean.norm() / math.sqrt(k)).item(),
        "eig_max": eig_max,
        "eig_min": eig_min,
        "condition_number": eig_max / eig_min if eig_min > 0 else float("inf"),
        "effective_rank": effective_rank,
        "norm_mean": norm_mean / math.sqrt(k),
        "norm_cv_ratio": norm_cv / _chi_cv(k),
        "shape_epps_pulley": float("nan"),
        "shape_norm_cv_ratio": float("nan"),
    }

    keep = evals > _RANK_RTOL * eig_max if eig_max > 0 else torch.zeros_like(evals, dtype=torch.bool)
    rank = int(keep.sum())
    if rank > 0 and n > rank + 1:
        white = centred @ (evecs[:, keep] / evals[keep].sqrt())
        shape_dirs = random_directions(rank, num_directions, generator=generator, device=z.device, dtype=torch.float64)
        report["shape_epps_pulley"] = epps_pulley(white, shape_dirs).item()
        wnorms = white.norm(dim=1)
        wcv = (wnorms.std() / wnorms.mean()).item()
        report["shape_norm_cv_ratio"] = wcv / _sqrt_beta_cv(rank / 2, (n - rank - 1) / 2)
    return report


def null_bounds(n: int, k: int) -> Dict[str, tuple]:
    """(low, high) range of each scored diagnostic for an exact N(0, I_K) sample of n rows."""
    gamma = k / max(n - 1, 1)
    root_n = math.sqrt(n)
    mean_hi = math.sqrt(_chi2_quantile(k, _Z_999) / (n * k))
    eig_hi = (1 + math.sqrt(gamma)) ** 2 * math.exp(_EIG_MAX_MARGIN / root_n)
    eig_lo = (1 - math.sqrt(gamma)) ** 2 * math.exp(-_EIG_MIN_MARGIN / root_n) if gamma < 1 else 0.0
    cv = math.exp(_NORM_CV_MARGIN / root_n)
    return {
        "mean_offset": (0.0, mean_hi),
        "eig_max": (0.0, eig_hi),
        "eig_min": (eig_lo, math.inf),
        "shape_epps_pulley": (0.0, SHAPE_EP_NULL),
        "shape_norm_cv_ratio": (1.0 / cv, cv),
    }


def severities(report: Mapping[str, float]) -> Dict[str, float]:
    """Severity x >= 0 of each scored diagnostic: excess beyond the null range, in tolerances.

    NaN diagnostics (undefined, e.g. the shape of a zero covariance) get 0: the failure that made
    them undefined is scored by another diagnostic.
    """
    n, k = int(report["n_samples"]), int(report["dim"])
    bounds = null_bounds(n, k)
    tiny = 1e-300

    def log_excess(value: float, bound: float) -> float:
        return math.log(max(value, tiny) / max(bound, tiny))

    x = {
        "mean_offset": (report["mean_offset"] - bounds["mean_offset"][1]) / MEAN_TOL,
        "eig_max": log_excess(report["eig_max"], bounds["eig_max"][1]) / math.log(EIG_TOL),
        "eig_min": (
            log_excess(bounds["eig_min"][0], report["eig_min"]) / math.log(EIG_TOL)
            if bounds["eig_min"][0] > 0 else 0.0
        ),
        "shape_epps_pulley": (report["shape_epps_pulley"] - SHAPE_EP_NULL) / (SHAPE_EP_TOL * n),
        "shape_norm_cv_ratio": (
            abs(math.log(max(report["shape_norm_cv_ratio"], tiny))) - math.log(bounds["shape_norm_cv_ratio"][1])
        ) / math.log(NORM_CV_TOL),
    }
    return {key: (max(v, 0.0) if not math.isnan(v) else 0.0) for key, v in x.items()}


def trust_factors(report: Mapping[str, float]) -> Dict[str, float]:
    """Factor 1 / (1 + x²) in (0, 1] of each scored diagnostic (1 = within the null range)."""
    return {key: 1.0 / (1.0 + x * x) for key, x in severities(report).items()}


def trust_score(report: Mapping[str, float]) -> float:
    """min over the scored diagnostics of 1 / (1 + x²); >= TRUST_THRESHOLD iff none is past its
    doubt threshold."""
    return min(trust_factors(report).values())


def weakest_diagnostic(report: Mapping[str, float]) -> str:
    """The report key of the scored diagnostic with the lowest factor (the reason trust is low),
    or "none" when every scored diagnostic is within its null range."""
    sev = severities(report)
    worst = max(sev, key=sev.get)
    return worst if sev[worst] > 0 else "none"


def score_agreement(scores: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Spearman correlation (average ranks for ties) of every pair of per-sample scores, keyed
    ``"<a>_vs_<b>"`` in the order given (e.g. jepa_score, log_density, mahalanobis, knn on the
    held-out set, all oriented "higher = more typical"). Rows non-finite in either score of a pair
    are left out of that pair; NaN when fewer than 3 rows remain or a score is constant.
    """
    names = list(scores)
    values = {}
    for name in names:
        v = scores[name]
        if not isinstance(v, torch.Tensor) or v.ndim != 1:
            raise ValueError(f"score {name!r} must be a 1-D tensor with one value per sample.")
        values[name] = v.detach().to(torch.float64).cpu()
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise ValueError(f"scores must all have the same length; got {dict((n, len(v)) for n, v in values.items())}.")
    out = {}
    for a, b in combinations(names, 2):
        ok = torch.isfinite(values[a]) & torch.isfinite(values[b])
        out[f"{a}_vs_{b}"] = spearman(values[a][ok], values[b][ok]).item() if int(ok.sum()) >= 3 else float("nan")
    return out


def disagreement(agreement: Mapping[str, float], threshold: float = DISAGREEMENT_THRESHOLD) -> List[str]:
    """The pairs of :func:`score_agreement` whose rank correlation is below ``threshold`` or NaN
    (sharp disagreement: they order the held-out samples unrelatedly or oppositely, or one of them
    does not order them at all). Empty when all agree."""
    return [pair for pair, rho in agreement.items() if not rho >= threshold]
