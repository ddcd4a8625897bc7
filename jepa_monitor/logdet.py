"""Half log-determinant of Gram matrices, with an honest floor for tiny singular values.

Σₖ log σₖ(J) = ½·logdet(G) with G = J Jᵀ (or Jᵀ J, whichever is smaller). The Gram is formed in
float64 from the float32 Jacobian: this is rank-exact where an fp32 Gram is not, and far cheaper
than an SVD of J. Cholesky is the fast path; rows it cannot certify go to ``eigvalsh``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

PAPER_ABS_FLOOR = 1e-6
"""The absolute clip on singular values in the paper's reference listing."""


def gram(jacobian: torch.Tensor) -> torch.Tensor:
    """(b, K, D) Jacobian -> (b, n, n) float64 Gram, n = min(K, D)."""
    j = jacobian.to(torch.float64)
    if j.shape[-2] <= j.shape[-1]:
        return j @ j.mT
    return j.mT @ j


def half_logdet(
    g: torch.Tensor,
    rel_floor: Optional[float] = 1e-6,
    abs_floor: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Σ log max(σₖ, floor) over the n = min(K, D) singular values, from Grams ``g`` (b, n, n).

    The floor on σ is ``rel_floor·σ_max`` (default, scale-free) or the absolute ``abs_floor``
    (the paper's 1e-6); exactly one must be set. Returns (score float64 (b,), number of floored
    singular values int64 (b,)). Rows of ``g`` with a non-finite entry get NaN and 0; a row whose
    Jacobian is exactly zero gets -inf and n (nothing to measure).
    """
    if (rel_floor is None) == (abs_floor is None):
        raise ValueError("set exactly one of rel_floor and abs_floor")
    b, n = g.shape[0], g.shape[-1]
    score = torch.full((b,), float("nan"), dtype=torch.float64, device=g.device)
    floored = torch.zeros(b, dtype=torch.int64, device=g.device)
    finite = torch.isfinite(g).flatten(1).all(dim=1)
    if b == 0 or n == 0:
        return score.fill_(0.0) if n == 0 else score, floored
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)
    if abs_floor is not None:
        threshold = torch.full_like(trace, abs_floor**2)
    else:
        # trace >= λ_max, so a successful Cholesky of G - rel²·trace·I proves every eigenvalue is
        # above the floor rel²·λ_max: nothing to clamp and the fast logdet is the answer.
        threshold = rel_floor**2 * trace
    safe = torch.where(finite[:, None, None], g, eye)
    chol, info = torch.linalg.cholesky_ex(safe)
    _, info_shifted = torch.linalg.cholesky_ex(safe - threshold[:, None, None] * eye)
    fast = finite & (info == 0) & (info_shifted == 0) & (trace > 0)
    score[fast] = chol[fast].diagonal(dim1=-2, dim2=-1).log().sum(-1)
    slow = finite & ~fast
    if slow.any():
        eig = torch.linalg.eigvalsh(g[slow]).clamp_min(0.0)
        if abs_floor is not None:
            floor = torch.full_like(eig[:, -1], abs_floor**2)
        else:
            floor = rel_floor**2 * eig[:, -1]
        # An exactly zero Jacobian has a zero floor: count all n values as floored, not none.
        floored[slow] = ((eig < floor[:, None]) | (eig <= 0)).sum(-1)
        score[slow] = 0.5 * torch.maximum(eig, floor[:, None]).log().sum(-1)
    return score, floored
