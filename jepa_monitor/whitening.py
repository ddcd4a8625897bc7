"""Whitened scoring: read the embedding through the reference's own Gaussian, N(μ, Σ), not N(0, I).

An encoder trained towards N(0, I) but not there yet (a shifted mean, a stretched or shrunk
direction) makes the isotropic Gaussian term mis-rank samples. Whitening with the reference
(held-out) mean and covariance, u = W(z - μ) with W = Σ^{-1/2}, is an affine map of the embedding,
so for K <= D:

- JEPA-SCORE of the whitened encoder = ½·logdet(W J Jᵀ Wᵀ) = JEPA-SCORE - ½·logdet Σ: a constant
  shift, which changes no ranking;
- its isotropic Gaussian term is the Mahalanobis term -½(z - μ)ᵀΣ⁻¹(z - μ) - K/2·log 2π;
- their sum is JEPA-SCORE + log N(z; μ, Σ): the change-of-variables log-density under a Gaussian
  fitted to the reference, exact when f maps the data affinely onto any non-degenerate Gaussian.

When K > D the score is ½·logdet(Jᵀ Wᵀ W J) (D×D), which is not logdet(Jᵀ J) plus a constant: it
depends on how the column space of J (the tangent space of the embedded data manifold at x) sits
against the eigenvectors of Σ, and that changes from sample to sample. It cannot be recovered from
the unwhitened score, so :func:`whitened_components` refuses that case; score the wrapped encoder
``WhitenedEncoder(encoder, whitening)`` with :func:`jepa_monitor.score_samples` instead (exact for
any K, at the cost of another Jacobian pass).

The constant shift is exact when no singular value hits the floor (``n_floored == 0``): the floor
acts on the singular values of J, which W changes non-uniformly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

import torch
from torch import nn

from .gaussian import HALF_LOG_2PI, Shrinkage, fit_gaussian
from .outputs import OutputSelector, Pooling, embed

if TYPE_CHECKING:
    from .sample_scores import SampleScores


class Whitening:
    """Reference mean μ (K,) and covariance Σ (K, K) in float64, with W = Σ^{-1/2} (symmetric).

    Build it with :meth:`fit` from reference embeddings, or directly from a known mean and
    covariance. Σ must be positive definite; :meth:`fit` shrinks it towards a multiple of the
    identity when asked (``shrinkage="auto"``, the default, is Ledoit–Wolf).
    """

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor, shrinkage: float = 0.0):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        covariance = torch.as_tensor(covariance, dtype=torch.float64)
        k = mean.shape[-1] if mean.ndim == 1 else -1
        if mean.ndim != 1 or covariance.shape != (k, k):
            raise ValueError(
                f"mean must be (K,) and covariance (K, K); got {tuple(mean.shape)} and {tuple(covariance.shape)}."
            )
        covariance = 0.5 * (covariance + covariance.T)
        evals, evecs = torch.linalg.eigh(covariance)
        if not evals[0] > 1e-12 * evals[-1].abs().clamp_min(1e-300):
            raise ValueError(
                f"the covariance is singular (smallest eigenvalue {evals[0].item():.3g}, largest "
                f"{evals[-1].item():.3g}): some embedding directions carry no variance. Fit with "
                "shrinkage='auto' or a value in (0, 1]."
            )
        self.mean = mean
        self.covariance = covariance
        self.shrinkage = float(shrinkage)
        self.matrix = (evecs / evals.sqrt()) @ evecs.T
        self.precision = (evecs / evals) @ evecs.T
        self.half_logdet = 0.5 * evals.log().sum().item()

    @classmethod
    def fit(cls, reference_embeddings: torch.Tensor, *, shrinkage: Shrinkage = "auto") -> "Whitening":
        """Mean and covariance (1/N, the Gaussian maximum-likelihood fit) of reference rows (N, K).

        ``shrinkage``: "auto" (Ledoit–Wolf, positive definite whenever the embeddings vary at all),
        or α in [0, 1] for (1 - α)·S + α·(tr S / K)·I; 0 keeps the sample covariance and fails on
        a singular one. Rows with a non-finite entry are left out.
        """
        z = reference_embeddings
        if not isinstance(z, torch.Tensor) or z.ndim != 2:
            raise ValueError("reference_embeddings must be a (N, K) tensor; pool token outputs first.")
        z = z.detach().to(torch.float64)
        z = z[torch.isfinite(z).all(dim=1)]
        if z.shape[0] < 2:
            raise ValueError(f"Whitening.fit needs at least 2 finite reference rows; got {z.shape[0]}.")
        mean, cov, alpha = fit_gaussian(z, shrinkage)
        return cls(mean, cov, alpha)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _check(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (B, {self.dim}) to match the whitening; got {tuple(z.shape)}.")
        return z.to(dtype=torch.float64, device=self.mean.device) - self.mean

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """W(z - μ), float64 (B, K)."""
        self._check(z)
        return whiten(z.to(dtype=torch.float64, device=self.mean.device), self)

    def mahalanobis(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance (z - μ)ᵀΣ⁻¹(z - μ), float64 (B,)."""
        d = self._check(z)
        return ((d @ self.precision) * d).sum(-1)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """Isotropic Gaussian term of the whitened embedding: -½·mahalanobis - K/2·log 2π, float64."""
        return -0.5 * self.mahalanobis(z) - self.dim * HALF_LOG_2PI

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; μ, Σ), float64 (B,)."""
        return self.log_prior(z) - self.half_logdet

    def state_dict(self) -> Dict[str, Any]:
        return {"mean": self.mean.cpu(), "covariance": self.covariance.cpu(), "shrinkage": self.shrinkage}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "Whitening":
        return cls(state["mean"], state["covariance"], state["shrinkage"])


def whiten(z: torch.Tensor, whitening: Whitening) -> torch.Tensor:
    """W(z - μ) in z's dtype and device, differentiable in z: the one place the transform is applied
    to embeddings that are scored (the exact Jacobian stage and the cheap embedding stage alike)."""
    return (z - whitening.mean.to(z)) @ whitening.matrix.to(z)


class WhitenedEncoder(nn.Module):
    """``x -> W(f(x) - μ)``: the encoder followed by the whitening, to score with
    :func:`jepa_monitor.score_samples` (exact for any K and D, the only way when K > D).

    ``output`` and ``pool`` select and pool the encoder's output as in ``score_samples``; the
    wrapper returns a plain (B, K) tensor, so score it with the defaults.
    """

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], Any],
        whitening: Whitening,
        *,
        output: OutputSelector = None,
        pool: Pooling = "mean",
    ):
        super().__init__()
        self.encoder = encoder
        self.output = output
        self.pool = pool
        self.whitening = whitening

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return whiten(embed(self.encoder(x), self.output, self.pool, x.shape[0]), self.whitening)


def whitened_components(
    scores: "SampleScores", whitening: Whitening
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(jepa_score_w, log_prior_w, log_density_w), float32 (B,) each, from an isotropic scoring pass.

    jepa_score_w = jepa_score - ½·logdet Σ; log_prior_w = -½(z - μ)ᵀΣ⁻¹(z - μ) - K/2·log 2π;
    log_density_w = their sum = jepa_score + log N(z; μ, Σ). Only for K <= D (see the module
    docstring); when K > D score ``WhitenedEncoder(encoder, whitening)`` instead.
    """
    k, d = scores.embed_dim, scores.input_dim
    if k > d:
        raise ValueError(
            f"the embedding has K={k} > D={d} input features: whitening changes JEPA-SCORE by a "
            "sample-dependent amount there, which cannot be derived from the isotropic score. Score "
            "jepa_monitor.whitening.WhitenedEncoder(encoder, whitening) with score_samples instead."
        )
    device = scores.jepa_score.device
    jepa = scores.jepa_score.to(torch.float64) - whitening.half_logdet
    prior = whitening.log_prior(scores.embedding).to(device)
    return (
        jepa.to(torch.float32),
        prior.to(torch.float32),
        (jepa + prior).to(torch.float32),
    )
