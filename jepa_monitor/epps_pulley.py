"""How far a set of embeddings is from the isotropic standard Gaussian.

The Epps–Pulley statistic compares the empirical characteristic function of 1-D projections with
exp(-t²/2). Averaged over random directions it is the SIGReg regulariser of LeJEPA; it is
differentiable, so the same function serves as a training loss and as a diagnostic.
"""

from __future__ import annotations

from typing import Optional

import torch


def random_directions(
    dim: int, num: int, *, generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """(dim, num) unit vectors, uniform on the sphere, drawn from ``generator`` (never the global RNG
    when a generator is given)."""
    gen_device = generator.device if generator is not None else device
    a = torch.randn(dim, num, generator=generator, device=gen_device, dtype=dtype)
    return (a / a.norm(dim=0, keepdim=True)).to(device)


def epps_pulley(
    z: torch.Tensor,
    directions: Optional[torch.Tensor] = None,
    *,
    num_directions: int = 256,
    generator: Optional[torch.Generator] = None,
    t_max: float = 3.0,
    num_points: int = 17,
) -> torch.Tensor:
    """Mean Epps–Pulley statistic of ``z`` (N, K) projected on ``directions`` (K, M), a scalar.

    For each projection s: N·∫ |φ̂(t) - e^{-t²/2}|² e^{-t²/2} dt over [-t_max, t_max] (trapezoid
    rule; the integrand is even, so [0, t_max] is doubled). Under H0 (s ~ N(0, 1)) its expectation
    is O(1) whatever N is; departures grow linearly in N. Differentiable in ``z``.
    """
    if z.ndim != 2:
        raise ValueError(f"z must be (N, K); got shape {tuple(z.shape)}")
    if directions is None:
        directions = random_directions(z.shape[1], num_directions, generator=generator, device=z.device, dtype=z.dtype)
    s = z @ directions.to(z.dtype)  # (N, M)
    t = torch.linspace(0.0, t_max, num_points, device=z.device, dtype=z.dtype)
    ts = s.unsqueeze(-1) * t  # (N, M, T)
    target = torch.exp(-0.5 * t**2)
    err = (ts.cos().mean(0) - target) ** 2 + ts.sin().mean(0) ** 2  # (M, T)
    integral = 2.0 * torch.trapezoid(err * target, t, dim=-1)
    return z.shape[0] * integral.mean()
