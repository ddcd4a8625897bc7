"""The Gaussian an embedding is read through: the paper's N(0, I), or the N(μ, Σ) it actually has.

``log_density = jepa_score + log_prior``, where the prior term is the log-density of the embedding
under a Gaussian. The paper reads it under N(0, I), the target of the anti-collapse term. Real
SIGReg encoders get near that target but not onto it (a shifted mean, directions stretched or
shrunk several-fold), and the isotropic term then drowns the low-variance directions that carry the
off-manifold signal. Reading the embedding through a Gaussian N(μ, Σ) fitted to reference
embeddings is the exact change of variables for an encoder whose embeddings are N(μ, Σ): with
u = Σ^{-1/2}(z - μ), JEPA-SCORE of u∘f is JEPA-SCORE of f - ½·logdet Σ (K <= D), and

    jepa_score(x) + log N(u; 0, I) - ½·logdet Σ = jepa_score(x) + log N(f(x); μ, Σ).

So ``jepa_score`` is the same number in both readings (comparable with the paper's); only the prior
term changes, to ``log N(z; μ, Σ)``. With K > D neither reading is a density on R^K (the embedded
data lie on a D-dimensional manifold); the sum is still read the same way.

A reading is a :class:`~jepa_monitor.whitening.Whitening` (the fitted mean and shrunk covariance) or
None (N(0, I)). Rows used to fit the Gaussian look more typical under it than new rows do (their
squared Mahalanobis distances average K in the fitting sample, less with shrinkage, and more than K
outside it), so a
threshold taken from the fitting rows themselves would drop clean new rows too often:
:func:`cross_fitted_log_prior` reads each reference row through a Gaussian fitted without it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .gaussian import HALF_LOG_2PI, Shrinkage, log_prior64
from .sample_scores import SampleScores
from .whitening import Whitening

#: The readings a monitor offers: "fitted" (N(μ, Σ) of the held-out embeddings) or "isotropic" (N(0, I)).
READINGS = ("fitted", "isotropic")
#: Folds of :func:`cross_fitted_log_prior`: each reference row is read through a Gaussian fitted on
#: the other (FOLDS-1)/FOLDS of the rows.
FOLDS = 5


def log_prior(z: torch.Tensor, gaussian: Optional[Whitening] = None) -> torch.Tensor:
    """log N(z; μ, Σ) of each row of ``z`` (B, K) under ``gaussian``, or log N(z; 0, I) when it is
    None; float64 (B,) on z's device."""
    if gaussian is None:
        return log_prior64(z)
    return gaussian.log_prob(z).to(z.device)


def fit_reading(z: torch.Tensor, *, shrinkage: Shrinkage = "auto") -> Whitening:
    """The Gaussian of reference embeddings ``z`` (N, K): mean and Ledoit–Wolf-shrunk covariance
    (rows with a non-finite entry left out). Raises when fewer than 2 finite rows remain or the
    rows do not vary at all (a collapsed encoder)."""
    return Whitening.fit(z, shrinkage=shrinkage)


def cross_fit(z: torch.Tensor, rows: int, fit: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]],
              *, folds: int = FOLDS) -> torch.Tensor:
    """A score of the first ``rows`` rows of ``z`` (N, K), each from a scorer fitted without it:
    ``fit(reference rows)`` returns a function of embeddings, and row i is scored by the one fitted
    on the rows of the other folds (row i is in fold i mod ``folds``). float64 (rows,) on z's
    device; NaN for a row with a non-finite entry, which no fit sees either. With N < 2·folds rows
    the folds shrink to N // 2 (at least 2)."""
    n = z.shape[0]
    if not 0 <= rows <= n:
        raise ValueError(f"rows={rows} must be between 0 and the {n} embedding rows.")
    folds = max(2, min(int(folds), n // 2))
    fold = torch.arange(n) % folds
    out = torch.full((rows,), float("nan"), dtype=torch.float64)
    finite = torch.isfinite(z).all(1).cpu()
    for f in range(folds):
        target = (fold[:rows] == f) & finite[:rows]
        if not target.any():
            continue
        score = fit(z[((fold != f) & finite).to(z.device)])
        out[target] = score(z[:rows][target.to(z.device)]).double().cpu()
    return out.to(z.device)


def cross_fitted_log_prior(z: torch.Tensor, rows: int, *, folds: int = FOLDS,
                           shrinkage: Shrinkage = "auto") -> torch.Tensor:
    """The prior of the first ``rows`` rows of ``z`` (N, K) as :func:`fit_reading` of all N rows reads
    new rows, without letting a row flatter itself: its squared Mahalanobis distance is taken to a
    Gaussian fitted on the rows of the other folds (:func:`cross_fit`), and the normalisation
    (-K/2·log 2π - ½·logdet Σ) is the full fit's, the one new rows get: a fold's own logdet differs
    from the full fit's by an amount that grows with K (fewer rows, other shrinkage), and would shift
    every reference row against new ones. float64 (rows,)."""
    full = fit_reading(z, shrinkage=shrinkage)
    d2 = cross_fit(z, rows, lambda ref: fit_reading(ref, shrinkage=shrinkage).mahalanobis, folds=folds)
    return -0.5 * d2 - z.shape[1] * HALF_LOG_2PI - full.half_logdet


def reread(scores: SampleScores, prior: torch.Tensor) -> SampleScores:
    """``scores`` with ``log_prior`` replaced by ``prior`` (B,) and ``log_density`` recomputed as
    ``jepa_score + prior`` (in float64, stored float32); the Jacobian term is unchanged."""
    prior64 = prior.to(device=scores.jepa_score.device, dtype=torch.float64)
    density = scores.jepa_score.double() + prior64
    return SampleScores(scores.jepa_score, prior64.float(), density.float(), scores.n_floored,
                        scores.embedding, scores.input_dim, scores.method)
