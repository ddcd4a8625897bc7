"""Cheap typicality baselines in embedding space: Gaussian prior, Mahalanobis, k-nearest neighbour.

Every score is "higher = more typical", like JEPA-SCORE, so the same evaluation and curation code
reads all of them. Mahalanobis and kNN are fitted on a reference set of embeddings that must be
distinct from the samples scored (a reference point is its own nearest neighbour at distance 0).

Pure functions (:func:`gaussian_prior_score`, :func:`mahalanobis_fit`, :func:`mahalanobis_score`,
:func:`knn_score`) do the work; the classes only hold the fitted tensors so that a callback can
checkpoint them with ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch

from .gaussian import Shrinkage, fit_gaussian, gaussian_log_prior

DEFAULT_KNN_MEMORY = 64 * 2**20
SINGULAR_RTOL = 1e-12


def _check_embeddings(z: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{what} must be a (N, K) tensor of embeddings; got {shape}.")
    if not z.is_floating_point():
        raise TypeError(f"{what} has dtype {z.dtype}; embeddings must be floating point.")
    return z


def _finite_reference(reference: torch.Tensor, need: int, what: str) -> torch.Tensor:
    """Drop non-finite reference rows (one NaN would poison every score) and say so."""
    reference = _check_embeddings(reference, what)
    finite = torch.isfinite(reference).all(dim=1)
    n_bad = int((~finite).sum())
    if n_bad:
        warnings.warn(f"{what}: dropped {n_bad} of {reference.shape[0]} rows with NaN/Inf values.", stacklevel=3)
        reference = reference[finite]
    if reference.shape[0] < need:
        raise ValueError(
            f"{what} has {reference.shape[0]} finite rows; at least {need} are needed. "
            "Fit on a larger reference set."
        )
    return reference


def gaussian_prior_score(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) = -½‖z‖² - K/2·log 2π per row of (N, K), computed in float64, returned float32.

    The same number as ``SampleScores.log_prior``: the prior term of ``log_density`` on its own.
    """
    return gaussian_log_prior(_check_embeddings(z, "z"))


def mahalanobis_fit(
    reference: torch.Tensor, *, shrinkage: Shrinkage = 0.0, ridge: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision (inverse covariance) of (N, K) reference embeddings, both float64.

    The covariance is the maximum-likelihood one (divided by N), shrunk towards its average
    variance: Σ = (1 - s)·S + s·(tr S / K)·I, with s = ``shrinkage`` in [0, 1] or
    ``"ledoit_wolf"`` (estimated from the data). ``ridge`` then adds ridge·(tr S / K)·I, a
    scale-free guard that keeps Σ invertible when the reference has fewer rows than dimensions
    or a collapsed direction.
    """
    reference = _finite_reference(reference, 2, "reference embeddings")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; got {ridge}.")
    mean, cov, _ = fit_gaussian(reference, shrinkage)
    avg_var = torch.diagonal(cov).mean()
    k_dim = cov.shape[0]
    cov = cov + ridge * avg_var * torch.eye(k_dim, dtype=torch.float64, device=cov.device)
    eig = torch.linalg.eigvalsh(cov)
    # float64 round-off leaves a collapsed direction with a tiny positive variance that Cholesky
    # accepts; its inverse would then dominate every distance.
    if not bool(eig[0] > SINGULAR_RTOL * eig[-1]):
        raise ValueError(
            "the reference covariance is singular (the embeddings are collapsed onto fewer than "
            f"K={k_dim} directions); fit with shrinkage > 0 or a larger ridge."
        )
    return mean, torch.cholesky_inverse(torch.linalg.cholesky(cov))


def mahalanobis_score(z: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """-½ (z - μ)ᵀ P (z - μ) per row of (N, K), computed in float64, returned float32 (N,).

    Higher = closer to the reference. ``mean`` (K,) and ``precision`` (K, K) come from
    :func:`mahalanobis_fit`. Non-finite rows score NaN.
    """
    z = _check_embeddings(z, "z")
    if mean.shape != (z.shape[1],) or precision.shape != (z.shape[1], z.shape[1]):
        raise ValueError(
            f"z has K={z.shape[1]} columns but the fit has mean {tuple(mean.shape)} and precision "
            f"{tuple(precision.shape)}; fit on embeddings of the same encoder output."
        )
    d = z.to(torch.float64) - mean.to(device=z.device, dtype=torch.float64)
    q = ((d @ precision.to(device=z.device, dtype=torch.float64)) * d).sum(-1)
    return (-0.5 * q).to(torch.float32)


def knn_score(
    z: torch.Tensor, reference: torch.Tensor, k: int = 5, *, memory_bytes: int = DEFAULT_KNN_MEMORY
) -> torch.Tensor:
    """Minus the Euclidean distance from each row of z (N, K) to its k-th nearest reference row.

    Distances are computed in float64 (the matrix-product form of ``cdist`` loses small distances
    in float32) in chunks of rows so that one chunk's distance matrix fits ``memory_bytes``
    bytes. Returns float32 (N,); higher = more typical; non-finite rows score NaN.
    """
    z = _check_embeddings(z, "z")
    reference = _check_embeddings(reference, "reference")
    if z.shape[1] != reference.shape[1]:
        raise ValueError(
            f"z has K={z.shape[1]} columns and the reference {reference.shape[1]}; they must come "
            "from the same encoder output."
        )
    if not 1 <= k <= reference.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of reference rows ({reference.shape[0]}).")
    ref = reference.to(device=z.device, dtype=torch.float64)
    rows = max(1, memory_bytes // (8 * ref.shape[0]))
    out = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[0], rows):
        dist = torch.cdist(z[start : start + rows].to(torch.float64), ref)
        out[start : start + rows] = dist.topk(k, dim=1, largest=False).values[:, -1]
    out[~torch.isfinite(z).all(dim=1)] = float("nan")
    return (-out).to(torch.float32)


class _Fitted:
    """State held as named tensors, so ``state_dict`` round-trips through ``torch.save``."""

    _state: Tuple[str, ...] = ()

    def _require_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call .fit(reference_embeddings) first.")

    @property
    def fitted(self) -> bool:
        return all(getattr(self, name, None) is not None for name in self._state)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._state if getattr(self, name) is not None}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = [name for name in self._state if name not in state]
        if missing:
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing {missing}.")
        for name in self._state:
            setattr(self, name, state[name])


class GaussianPriorScore(_Fitted):
    """log N(z; 0, I): the isotropic prior the anti-collapse objective aims for. Needs no fit;
    ``fit`` exists so every baseline is used the same way."""

    name = "log_prior"

    def fit(self, reference: Optional[torch.Tensor] = None) -> "GaussianPriorScore":
        return self

    def score(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_prior_score(z)


class MahalanobisScore(_Fitted):
    """-½ Mahalanobis² to the reference mean under the reference covariance (see
    :func:`mahalanobis_fit` for ``shrinkage`` and ``ridge``)."""

    name = "mahalanobis"
    _state = ("mean", "precision")

    def __init__(self, *, shrinkage: Shrinkage = 0.0, ridge: float = 1e-6) -> None:
        self.shrinkage = shrinkage
        self.ridge = ridge
        self.mean: Optional[torch.Tensor] = None
        self.precision: Optional[torch.Tensor] = None

    def fit(self, reference: torch.Tensor) -> "MahalanobisScore":
        self.mean, self.precision = mahalanobis_fit(reference, shrinkage=self.shrinkage, ridge=self.ridge)
        return self

    def score(self, z: torch.Tensor) -> torch.Tensor:
        self._require_fit()
        return mahalanobis_score(z, self.mean, self.precision)


class KNNScore(_Fitted):
    """Minus the distance to the k-th nearest reference embedding (see :func:`knn_score`)."""

    name = "knn"
    _state = ("reference",)

    def __init__(self, k: int = 5, *, memory_bytes: int = DEFAULT_KNN_MEMORY) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}.")
        self.k = k
        self.memory_bytes = memory_bytes
        self.reference: Optional[torch.Tensor] = None

    def fit(self, reference: torch.Tensor) -> "KNNScore":
        self.reference = _finite_reference(reference, self.k, "reference embeddings").detach().clone()
        return self

    def score(self, z: torch.Tensor) -> torch.Tensor:
        self._require_fit()
        return knn_score(z, self.reference, self.k, memory_bytes=self.memory_bytes)
