"""Data whose density is known, and small encoders trained the way the score assumes.

- :class:`GaussianMixture`: full-covariance mixtures with exact float64 ``log_prob``, sampled from a
  private generator; :func:`random_mixture` draws one.
- :class:`ProductMixture`: independent coordinates, each a 1-D Gaussian mixture; its
  :meth:`~ProductMixture.gaussianizer` is an exact Gaussianizing map (x ↦ Φ⁻¹(F(x)) per coordinate),
  on which ``log_density`` equals ``log_prob`` to float precision.
- :func:`train_sigreg_encoder`: an MLP trained with view invariance plus the SIGReg (Epps–Pulley)
  isotropic-Gaussian regulariser, deterministically and without touching the global RNG.

Used by the fidelity study (``benchmarks/fidelity.py``) and its small test version.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal, Normal

from jepa_monitor.epps_pulley import epps_pulley, random_directions

SQRT_HALF = math.sqrt(0.5)
Sampler = Callable[[int, torch.Generator], torch.Tensor]


def _check_weights(weights: torch.Tensor, n_components: int) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape[-1] != n_components or bool((weights < 0).any()):
        raise ValueError(f"weights must be {n_components} non-negative numbers per mixture; got {tuple(weights.shape)}.")
    return weights / weights.sum(-1, keepdim=True)


class GaussianMixture:
    """Σ_c w_c N(μ_c, L_c L_cᵀ) in D dimensions.

    Args:
        means: (C, D) component means.
        scale_trils: (C, D, D) lower-triangular covariance factors; identity when omitted.
        weights: (C,) mixing weights (normalised here); uniform when omitted.
    """

    def __init__(
        self, means: torch.Tensor, scale_trils: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None
    ) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (components, dim); got {tuple(self.means.shape)}.")
        c, d = self.means.shape
        if scale_trils is None:
            scale_trils = torch.eye(d, dtype=torch.float64).expand(c, d, d)
        self.scale_trils = torch.as_tensor(scale_trils, dtype=torch.float64)
        if self.scale_trils.shape != (c, d, d):
            raise ValueError(f"scale_trils must be ({c}, {d}, {d}); got {tuple(self.scale_trils.shape)}.")
        self.weights = _check_weights(torch.ones(c) if weights is None else weights, c)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, D) float32 samples drawn from ``generator`` only."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        x = self.means[comp] + (self.scale_trils[comp] @ eps).squeeze(-1)
        return x.to(torch.float32)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per row of (N, D), float64."""
        dist = MixtureSameFamily(Categorical(probs=self.weights), MultivariateNormal(self.means, scale_tril=self.scale_trils))
        return dist.log_prob(x.to(torch.float64))

    def shifted(self, offset: torch.Tensor) -> "GaussianMixture":
        """The same mixture translated by ``offset`` (D,): a far-shifted cluster for OOD tests."""
        return GaussianMixture(self.means + torch.as_tensor(offset, dtype=torch.float64), self.scale_trils, self.weights)


def random_mixture(
    dim: int, n_components: int, *, generator: torch.Generator, spread: float = 3.0, scale: float = 1.0
) -> GaussianMixture:
    """Means ~ N(0, spread²·I); covariances scale²·(0.3·I + AAᵀ/D) with A standard normal, so
    components are anisotropic and differently oriented; weights from a flat Dirichlet."""
    means = spread * torch.randn(n_components, dim, generator=generator, dtype=torch.float64)
    a = torch.randn(n_components, dim, dim, generator=generator, dtype=torch.float64)
    cov = scale**2 * (0.3 * torch.eye(dim, dtype=torch.float64) + a @ a.transpose(-1, -2) / dim)
    weights = -torch.rand(n_components, generator=generator, dtype=torch.float64).log()
    return GaussianMixture(means, torch.linalg.cholesky(cov), weights)


class ProductMixture:
    """Independent coordinates, coordinate i a 1-D mixture Σ_c w_ic N(μ_ic, σ_ic²).

    Args:
        means, stds, weights: (D, C) each; weights are normalised per coordinate.
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if self.means.ndim != 2 or self.stds.shape != self.means.shape or bool((self.stds <= 0).any()):
            raise ValueError("means and stds must both be (dim, components), with stds > 0.")
        self.weights = _check_weights(torch.ones_like(self.means) if weights is None else weights, self.means.shape[1])

    @property
    def dim(self) -> int:
        return self.means.shape[0]

    def _components(self) -> Normal:
        return Normal(self.means, self.stds)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, D) float32 samples drawn from ``generator`` only."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator).T  # (n, D)
        rows = torch.arange(self.dim).expand_as(comp)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[rows, comp] + self.stds[rows, comp] * eps).to(torch.float32)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per row of (N, D), float64."""
        lp = self._components().log_prob(x.to(torch.float64).unsqueeze(-1)) + self.weights.log()
        return torch.logsumexp(lp, dim=-1).sum(-1)

    def gaussianizer(self) -> nn.Module:
        """The exact map onto N(0, I): z_i = Φ⁻¹(F_i(x_i)), differentiable, float64 inside."""
        return _MarginalGaussianizer(self)


class _MarginalGaussianizer(nn.Module):
    def __init__(self, density: ProductMixture) -> None:
        super().__init__()
        self.register_buffer("means", density.means.clone())
        self.register_buffer("stds", density.stds.clone())
        self.register_buffer("weights", density.weights.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.to(torch.float64).unsqueeze(-1) - self.means) / self.stds
        # Φ via erfc: torch's ndtr goes through erf and underflows to 0 below -8.
        lower = (self.weights * 0.5 * torch.special.erfc(-u * SQRT_HALF)).sum(-1)
        upper = (self.weights * 0.5 * torch.special.erfc(u * SQRT_HALF)).sum(-1)
        # Invert the smaller tail: Φ⁻¹ of a CDF near 1 loses every digit, and a where() between
        # ndtri(F) and -ndtri(1-F) would send 0·∞ = NaN gradients through the unused branch.
        t = torch.special.ndtri(torch.minimum(lower, upper))
        return torch.where(lower <= upper, t, -t).to(x.dtype)


def mlp_encoder(in_dim: int, out_dim: int, *, hidden: int = 64, depth: int = 2) -> nn.Module:
    """A smooth MLP (GELU), so that its Jacobian, hence its score, varies smoothly with x."""
    layers, width = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def train_sigreg_encoder(
    data_sampler: Sampler,
    in_dim: int,
    out_dim: int,
    steps: int,
    seed: int,
    *,
    hidden: int = 64,
    depth: int = 2,
    batch_size: int = 256,
    view_noise: float = 0.1,
    sigreg_weight: float = 0.5,
    num_directions: int = 64,
    lr: float = 3e-3,
) -> nn.Module:
    """Train an MLP encoder with a LeJEPA-style objective and return it in eval mode.

    Each step draws ``batch_size`` samples, makes two views by adding N(0, view_noise²) noise and
    minimises  mean‖f(v₁) - f(v₂)‖²  +  sigreg_weight · (EP(f(v₁)) + EP(f(v₂))) / 2,  EP being the
    Epps–Pulley statistic on ``num_directions`` fresh random directions. The regulariser pulls the
    embeddings towards N(0, I), the state in which JEPA-SCORE reads as a density.

    ``data_sampler(n, generator)`` returns (n, in_dim) samples. Everything random (initialisation,
    data, views, directions) derives from ``seed``; the global RNG state is left as it was.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = mlp_encoder(in_dim, out_dim, hidden=hidden, depth=depth)
    opt = torch.optim.Adam(encoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    encoder.train()
    for _ in range(steps):
        x = data_sampler(batch_size, gen)
        v1 = x + view_noise * torch.randn(x.shape, generator=gen)
        v2 = x + view_noise * torch.randn(x.shape, generator=gen)
        z1, z2 = encoder(v1), encoder(v2)
        dirs = random_directions(out_dim, num_directions, generator=gen)
        invariance = (z1 - z2).pow(2).sum(-1).mean()
        sigreg = 0.5 * (epps_pulley(z1, dirs) + epps_pulley(z2, dirs))
        loss = invariance + sigreg_weight * sigreg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return encoder.eval()
