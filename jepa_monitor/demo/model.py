"""A small LeJEPA-style encoder for 8×8 digits, in pure torch.

LeJEPA (Balestriero & LeCun, 2025) trains with two terms: view invariance (two augmented views of a
sample map to nearby embeddings) and SIGReg, which pushes the batch of embeddings toward an
isotropic standard Gaussian through the Epps–Pulley statistic on random 1-D projections. That second
term is what makes JEPA-SCORE readable as a density, so the demo scores the projector output.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..epps_pulley import epps_pulley, random_directions


class DigitEncoder(nn.Module):
    """x (B, 1, 8, 8) -> embedding (B, embed_dim). ``features(x)`` is the backbone representation
    (B, feature_dim) a linear probe reads; ``forward`` adds the projector, the output that is scored.

    No BatchNorm or dropout, so the scored function is the same in train and eval mode.
    """

    def __init__(self, *, width: int = 32, feature_dim: int = 64, embed_dim: int = 16):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
        )
        self.projector = nn.Sequential(
            nn.GELU(), nn.Linear(feature_dim, feature_dim), nn.GELU(), nn.Linear(feature_dim, embed_dim)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One random view of each image: a shift of up to one pixel, a contrast jitter of ±20 % and a
    little Gaussian pixel noise. Draws only from ``generator``."""
    n = x.shape[0]
    dev = x.device
    gdev = generator.device if generator is not None else dev
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    shifts = torch.randint(0, 3, (n, 2), generator=generator, device=gdev).to(dev)
    rows = (shifts[:, 0, None] + torch.arange(8, device=dev))[:, :, None]
    cols = (shifts[:, 1, None] + torch.arange(8, device=dev))[:, None, :]
    batch = torch.arange(n, device=dev)[:, None, None]
    view = padded[batch, 0, rows, cols].unsqueeze(1)
    scale = 1.0 + 0.2 * (2 * torch.rand(n, 1, 1, 1, generator=generator, device=gdev).to(dev) - 1)
    noise = 0.1 * torch.randn(x.shape, generator=generator, device=gdev).to(dev)
    return view * scale + noise


def lejepa_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    directions: torch.Tensor,
    *,
    sigreg_weight: float = 0.05,
    sample_weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, invariance, sigreg) for two views' embeddings (B, K).

    The invariance term is per sample (squared distance of each view to the pair's mean), so a
    per-sample ``sample_weight`` (B,) in [0, 1] turns its batch mean into a weighted mean; SIGReg is a
    statistic of the whole batch and stays unweighted.
    """
    centre = 0.5 * (z1 + z2)
    per_sample = 0.5 * ((z1 - centre).pow(2).sum(1) + (z2 - centre).pow(2).sum(1)) / z1.shape[1]
    if sample_weight is None:
        invariance = per_sample.mean()
    else:
        w = sample_weight.to(per_sample.dtype)
        invariance = (w * per_sample).sum() / w.sum().clamp_min(1e-12)
    sigreg = 0.5 * (epps_pulley(z1, directions) + epps_pulley(z2, directions))
    return (1 - sigreg_weight) * invariance + sigreg_weight * sigreg, invariance, sigreg


def sigreg_directions(embed_dim: int, generator: torch.Generator, *, num: int = 64, device=None) -> torch.Tensor:
    """Fresh random projection directions for one step's SIGReg term."""
    return random_directions(embed_dim, num, generator=generator, device=device)
