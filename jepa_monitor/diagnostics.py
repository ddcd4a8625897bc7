"""Can the scores be read as a density? Gaussianity diagnostics, one trust number, score agreement.

JEPA-SCORE plus a Gaussian prior term is a log-density only when the encoder maps the data onto that
Gaussian. These functions measure, in float64, how far held-out embeddings z (N, K) are from it,
turn the answer into one trust number in [0, 1] (NaN: "unknown", the rows cannot support a
verdict) and name the diagnostic to blame. The rules are explained at length in ``docs/trust.md``.

Keys of :func:`gaussianity_report` (all floats):

- ``n_samples``, ``dim``: N finite rows used, K.
- ``epps_pulley``: the SIGReg / Epps–Pulley statistic of z itself, averaged over random directions
  (:func:`jepa_monitor.epps_pulley.epps_pulley`); ``epps_pulley / N`` estimates the divergence of the
  1-D marginals from N(0, 1). Reported, not scored.
- ``mean_offset``: ‖mean(z)‖ / √K, the RMS offset per coordinate in units of the target's standard
  deviation; √(χ²_K / (N K)) under N(0, I).
- ``eig_max``, ``eig_min``: largest and smallest eigenvalue of the sample covariance (1/(N-1)),
  target 1, spread by sampling over the Marchenko–Pastur range (1 ± √(K/N))². A large ``eig_max``
  is a stretched direction (or the whole scale too large); a small ``eig_min`` a collapsed one.
- ``condition_number``: eig_max / eig_min (inf when the covariance is singular). Reported only.
- ``effective_rank``: exp(entropy of the normalised eigenvalues) / K, in (0, 1]. Reported only: it
  mixes a stretched and a collapsed direction.
- ``norm_mean``: mean of ‖z‖ / √K, the RMS scale; E χ_K / √K under N(0, I); an L2-normalised output
  reads 1/√K at any N.
- ``norm_cv_ratio``: coefficient of variation of ‖z‖ over that of χ_K. Reported only.
- ``shape_epps_pulley``: the Epps–Pulley statistic of the whitened embeddings (mean removed, sample
  covariance made the identity on its numerical range): non-Gaussian shape (heavy tails, skew,
  several modes) that no affine map explains.
- ``shape_norm_cv_ratio``: coefficient of variation of the whitened norms over its exact null value
  (squared Mahalanobis distances of the fitting sample are scaled Beta(r/2, (N-r-1)/2), r the rank):
  > 1 heavy radial tails, < 1 norms too concentrated. NaN when the covariance is zero.

Contract of the trust number (:func:`trust_score`, :func:`weakest_diagnostic`):

- Each scored diagnostic gets a severity x >= 0: how far it lies beyond the range an exact Gaussian
  sample of the same N and K produces (:func:`null_bounds`), in units of a tolerance; its factor is
  1 / (1 + x²). Trust is the smallest factor, so ``trust >= TRUST_THRESHOLD`` (0.5) means "no scored
  diagnostic is past its doubt threshold". :func:`is_trusted` is the one definition of "trusted".
- Which diagnostics are scored depends on the reading (:func:`trust_keys`): ``"isotropic"``
  (N(0, I)) scores ``TRUST_KEYS``; ``"fitted"`` (the N(μ, Σ) of :mod:`jepa_monitor.reading`, which
  absorbs any mean, scale and covariance) scores the shape alone, ``FITTED_TRUST_KEYS``, and is 0
  for embeddings collapsed to one point.
- NaN ("unknown") when N ≤ K + 1 (the covariance is singular whatever the encoder; give
  :func:`trust_rows` (K) = 4K rows), or when a scored diagnostic is NaN and no other one is past its
  doubt threshold; when another one is, the low verdict stands.

======================  ==============================================  ==========================
diagnostic              null bound (N samples, K dims, γ = K/(N-1))     tolerance (x = 1)
======================  ==============================================  ==========================
norm_mean               c_K · exp(±3.5 · cv_K / √N)                      ×√2 or ÷√2
mean_offset             √(q₀.₉₉₉(χ²_K) / (N K))                          +0.25
eig_max                 (1 + √γ)² · exp(2.5/√N)                          ×2
eig_min                 (1 - √γ)² · exp(-3.5/√N) (unknown if γ ≥ 1)      ÷2
shape_epps_pulley       1.5 (3.0 when K = 1)                             +0.01 · N
shape_norm_cv_ratio     exp(±3.5/√N)                                     ×1.5 or ÷1.5
======================  ==============================================  ==========================

(c_K = E χ_K / √K and cv_K = sd χ_K / E χ_K, exact.) ``python benchmarks/trust_calibration.py``
prints how these rules score exact Gaussian samples, constructed failures and the known blind
spots, for both readings.

Rank deficiency of the Jacobian: :func:`rank_deficiency` reads the per-row ``n_floored`` counts of
the scorer; the same count on most rows means dead output dimensions, and the score is then a sum
over the remaining rank.

Agreement: :func:`score_agreement` gives the Spearman correlation of every pair of scores on the
held-out set (all oriented "higher = more typical"); :func:`disagreement` lists the pairs below
``DISAGREEMENT_THRESHOLD`` (0.1).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Dict, List, Mapping, Optional, Union

import torch

from .statistics import spearman
from .epps_pulley import epps_pulley, random_directions

TRUST_THRESHOLD = 0.5
DISAGREEMENT_THRESHOLD = 0.1
TRUST_KEYS = ("norm_mean", "mean_offset", "eig_max", "eig_min", "shape_epps_pulley", "shape_norm_cv_ratio")
#: The diagnostics that can break a reading through the fitted Gaussian N(μ, Σ) (module doc, "Readings").
FITTED_TRUST_KEYS = ("shape_epps_pulley", "shape_norm_cv_ratio")
# Embedding rows per dimension the diagnostics should be given (see the module doc, "How many rows").
MIN_ROWS_PER_DIM = 4
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
# K = 1: the directions are all ±1, one projection and no averaging over directions, so the null
# tail is heavier: 99.9% / 99.99% quantiles 2.2-2.26 / 2.9-3.1 for N = 256-1024 (200 000 draws each).
SHAPE_EP_NULL_1D = 3.0
SHAPE_EP_TOL = 0.01
NORM_CV_TOL = 1.5
NORM_MEAN_TOL = math.sqrt(2.0)
_NORM_MEAN_MARGIN = 3.5
_EIG_MAX_MARGIN = 2.5
_EIG_MIN_MARGIN = 3.5
_NORM_CV_MARGIN = 3.5


def is_trusted(trust: Optional[float]) -> bool:
    """The one definition of "trusted": a known trust score at or above :data:`TRUST_THRESHOLD`
    (None and NaN, "unknown", are not trusted). The monitor's warnings and anchor and the curation
    policies' warm-up all use it."""
    return trust is not None and trust >= TRUST_THRESHOLD


def trust_rows(k: int) -> int:
    """Embedding rows to give the Gaussianity diagnostics for a K-dimensional embedding:
    ``MIN_ROWS_PER_DIM * k`` (4K). With N ≤ K + 1 rows the trust verdict is unknown whatever the
    encoder; at 4K the sampling spread of the covariance spectrum ((1 ± √γ)², γ ≈ 1/4) is narrower
    than the departures the trust score is meant to report."""
    k = int(k)
    if k < 1:
        raise ValueError(f"trust_rows needs an embedding dimension K >= 1; got {k}.")
    return MIN_ROWS_PER_DIM * k


def _chi_mean_scaled(k: int) -> float:
    """E χ_k / √k, the mean of ‖N(0, I_k)‖ / √k (≈ 1 - 1/(4k))."""
    return math.sqrt(2.0 / k) * math.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))


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
    """(low, high) range of each scored diagnostic for an exact N(0, I_K) sample of n rows.

    The ``eig_min`` low bound is 0 (uninformative) when γ = k/(n-1) >= 1."""
    gamma = k / max(n - 1, 1)
    root_n = math.sqrt(n)
    mean_hi = math.sqrt(_chi2_quantile(k, _Z_999) / (n * k))
    eig_hi = (1 + math.sqrt(gamma)) ** 2 * math.exp(_EIG_MAX_MARGIN / root_n)
    eig_lo = (1 - math.sqrt(gamma)) ** 2 * math.exp(-_EIG_MIN_MARGIN / root_n) if gamma < 1 else 0.0
    cv = math.exp(_NORM_CV_MARGIN / root_n)
    c_k = _chi_mean_scaled(k)
    norm_spread = math.exp(_NORM_MEAN_MARGIN * _chi_cv(k) / root_n)
    return {
        "norm_mean": (c_k / norm_spread, c_k * norm_spread),
        "mean_offset": (0.0, mean_hi),
        "eig_max": (0.0, eig_hi),
        "eig_min": (eig_lo, math.inf),
        "shape_epps_pulley": (0.0, SHAPE_EP_NULL if k > 1 else SHAPE_EP_NULL_1D),
        "shape_norm_cv_ratio": (1.0 / cv, cv),
    }


def _rows_insufficient(n: float, k: float) -> bool:
    """True when N ≤ K + 1 (γ >= 1) or the sizes are missing: no verdict possible."""
    return not (n >= 2 and k >= 1 and n > k + 1)


def severities(report: Mapping[str, float]) -> Dict[str, float]:
    """Severity x >= 0 of each scored diagnostic (``TRUST_KEYS``): excess beyond the null range,
    in tolerances.

    NaN for a diagnostic that cannot be scored: its value is NaN or missing from the report (e.g.
    the shape of a zero covariance), or it is ``eig_min`` with N ≤ K + 1 (its null bound is 0).
    :func:`trust_score` decides what a NaN means (see the module doc, "Unknown").
    """
    n, k = float(report.get("n_samples", math.nan)), float(report.get("dim", math.nan))
    if math.isnan(n) or math.isnan(k) or n < 2 or k < 1:
        return {key: math.nan for key in TRUST_KEYS}
    n, k = int(n), int(k)
    bounds = null_bounds(n, k)
    tiny = 1e-300
    v = {key: float(report.get(key, math.nan)) for key in TRUST_KEYS}

    def log_excess(value: float, bound: float) -> float:
        return math.log(max(value, tiny) / max(bound, tiny))

    norm_lo, norm_hi = bounds["norm_mean"]
    x = {
        "norm_mean": max(log_excess(v["norm_mean"], norm_hi), log_excess(norm_lo, v["norm_mean"]))
        / math.log(NORM_MEAN_TOL),
        "mean_offset": (v["mean_offset"] - bounds["mean_offset"][1]) / MEAN_TOL,
        "eig_max": log_excess(v["eig_max"], bounds["eig_max"][1]) / math.log(EIG_TOL),
        "eig_min": (
            log_excess(bounds["eig_min"][0], v["eig_min"]) / math.log(EIG_TOL)
            if bounds["eig_min"][0] > 0 else math.nan
        ),
        "shape_epps_pulley": (v["shape_epps_pulley"] - bounds["shape_epps_pulley"][1]) / (SHAPE_EP_TOL * n),
        "shape_norm_cv_ratio": (
            abs(math.log(max(v["shape_norm_cv_ratio"], tiny))) - math.log(bounds["shape_norm_cv_ratio"][1])
        ) / math.log(NORM_CV_TOL),
    }
    for key in TRUST_KEYS:  # max()/log() above do not propagate a NaN value reliably
        if math.isnan(v[key]):
            x[key] = math.nan
    return {key: (max(x[key], 0.0) if not math.isnan(x[key]) else math.nan) for key in TRUST_KEYS}


def trust_factors(report: Mapping[str, float]) -> Dict[str, float]:
    """Factor 1 / (1 + x²) in (0, 1] of each scored diagnostic (1 = within the null range; NaN
    when the diagnostic cannot be scored, see :func:`severities`)."""
    return {key: 1.0 / (1.0 + x * x) for key, x in severities(report).items()}


def trust_keys(reading: str = "isotropic") -> tuple:
    """The scored diagnostics of a reading: all of ``TRUST_KEYS`` for "isotropic" (N(0, I)), the shape
    alone (``FITTED_TRUST_KEYS``) for "fitted" (N(μ, Σ) absorbs any mean, scale and covariance)."""
    if reading == "isotropic":
        return TRUST_KEYS
    if reading == "fitted":
        return FITTED_TRUST_KEYS
    raise ValueError(f"reading={reading!r} is not one of ('fitted', 'isotropic').")


def _verdict(report: Mapping[str, float], reading: str = "isotropic") -> tuple:
    """(trust, weakest) following the rules of the module doc."""
    keys = trust_keys(reading)
    n, k = float(report.get("n_samples", math.nan)), float(report.get("dim", math.nan))
    if _rows_insufficient(n, k):
        if math.isnan(n) or math.isnan(k):
            return math.nan, "unknown (n_samples or dim missing)"
        need = trust_rows(int(k)) if k >= 1 else 0
        return math.nan, f"unknown (N ≤ K + 1: {int(n)} rows for K = {int(k)}; use >= {need})"
    if reading == "fitted" and not float(report.get("eig_max", math.nan)) > 0:
        # Every embedding the same: there is no Gaussian to fit, whatever the shape keys say.
        return 0.0, "collapsed (eig_max = 0)"
    factors = {key: f for key, f in trust_factors(report).items() if key in keys}
    known = {key: f for key, f in factors.items() if not math.isnan(f)}
    blind = [key for key in factors if key not in known]
    worst = min(known, key=known.get) if known else None
    if blind and (worst is None or not known[worst] < TRUST_THRESHOLD):
        return math.nan, f"unknown ({', '.join(blind)} undefined)"
    if worst is None:  # pragma: no cover - TRUST_KEYS is never empty
        return math.nan, "unknown"
    return known[worst], (worst if known[worst] < 1.0 else "none")


def trust_score(report: Mapping[str, float], reading: str = "isotropic") -> float:
    """min over the scored diagnostics of 1 / (1 + x²); >= TRUST_THRESHOLD iff none is past its
    doubt threshold. NaN ("unknown") when the report cannot support a verdict: N ≤ K + 1, or a
    scored diagnostic is undefined while no other one is past its doubt threshold (module doc,
    "Unknown"). Never high while a diagnostic is blind. ``reading``: which diagnostics are scored
    (:func:`trust_keys`); "fitted" is also 0 when the embeddings have collapsed to one point."""
    return _verdict(report, reading)[0]


def weakest_diagnostic(report: Mapping[str, float], reading: str = "isotropic") -> str:
    """The report key of the scored diagnostic with the lowest factor (the reason trust is low),
    "none" when every scored diagnostic is within its null range, or a string starting with
    "unknown (" that says why when :func:`trust_score` is NaN, e.g.
    "unknown (N ≤ K + 1: 200 rows for K = 384; use >= 1536)"; for ``reading="fitted"`` also
    "collapsed (eig_max = 0)"."""
    return _verdict(report, reading)[1]


def rank_deficiency(
    n_floored: torch.Tensor, rank_dim: Union[torch.Tensor, int], *, majority: float = 0.5
) -> Dict[str, Union[bool, int, float]]:
    """Is the Jacobian rank-deficient by the same amount on most rows? (dead output dimensions)

    ``n_floored`` (B,): per row, how many of the ``rank_dim`` = min(K, D) singular values the
    scorer raised to its floor (:class:`jepa_monitor.functional.SampleScores`); negative entries (not
    computed) are left out. ``rank_dim``: that count of singular values, an int or one per row.

    A count that varies from row to row is local geometry. The same count > 0 on more than
    ``majority`` of the rows is systematic: output dimensions that no input moves, such as a
    LayerNorm whose γ ≈ 0 on some channels, an output bottleneck narrower than K, or an
    L2-normalised output (one exactly-zero singular value). Each such direction then contributes
    log(floor) instead of a log-density term, the same amount on every row: with the relative floor
    the score is, up to that constant, a sum over the remaining ``score_rank`` directions, which
    ranks samples consistently, but it is not the K-dimensional density. Warn once and log it.

    Returns ``{"systematic": bool, "typical_floored": int (the most common count, the mode),
    "fraction_rows": float (share of rows with that count), "min_floored": int (found on every
    row), "rank_dim": int, "score_rank": int (rank_dim - typical_floored), "rows": int}``; with no
    usable row: not systematic, counts 0, fraction NaN.
    """
    counts = torch.as_tensor(n_floored).detach().reshape(-1).cpu()
    if counts.is_floating_point():
        ok = torch.isfinite(counts) & (counts >= 0)
    else:
        ok = counts >= 0
    if isinstance(rank_dim, torch.Tensor) and rank_dim.numel() > 1:
        dims = rank_dim.detach().reshape(-1).cpu()
        if dims.numel() != counts.numel():
            raise ValueError(f"rank_dim has {dims.numel()} entries for {counts.numel()} rows of n_floored.")
        dims = dims[ok].round().long()
        dim = int(torch.mode(dims).values) if dims.numel() else 0
    else:
        dim = int(rank_dim.item() if isinstance(rank_dim, torch.Tensor) else rank_dim)
    counts = counts[ok].round().long()
    rows = int(counts.numel())
    if rows == 0:
        return {"systematic": False, "typical_floored": 0, "fraction_rows": math.nan, "min_floored": 0,
                "rank_dim": dim, "score_rank": dim, "rows": 0}
    values, freq = torch.unique(counts, return_counts=True)
    best = int(torch.argmax(freq))  # first of the most frequent: the smallest count on a tie
    typical, fraction = int(values[best]), float(freq[best]) / rows
    return {
        "systematic": bool(typical > 0 and fraction > majority),
        "typical_floored": typical,
        "fraction_rows": fraction,
        "min_floored": int(counts.min()),
        "rank_dim": dim,
        "score_rank": dim - typical,
        "rows": rows,
    }


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
