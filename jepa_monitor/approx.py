"""Stochastic Lanczos quadrature (SLQ) of JEPA-SCORE, for embeddings too wide for K backward passes.

½·logdet(G) = ½·tr(log G), with G = J Jᵀ (K <= D) or Jᵀ J (K > D), n = min(K, D). Hutchinson:
tr(log G) ≈ mean over Rademacher probes v of vᵀ log(G) v, and each vᵀ log(G) v is a Gauss
quadrature read off the Lanczos tridiagonal T of G started at v: ‖v‖²·Σⱼ τⱼ² log θⱼ (θ the Ritz
values, τ the first components of T's eigenvectors). Products with G never form J: one
vector-Jacobian product and one Jacobian-vector product per Lanczos step, both backward passes
over graphs retained from a single forward pass (see ``_GramProducts``). Cost per sample:
``num_probes · min(lanczos_steps, n)`` products of each kind, against K VJPs for the exact score, so it can pay off
only for K well above ``2·num_probes·lanczos_steps``.

The error has two sources. Hutchinson's probe noise, vᵀ(log G)v − tr(log G), comes from the
off-diagonal of log G and dominates on well-conditioned Jacobians: more probes reduce it, more
Lanczos steps do not. Sharing the probes across samples makes this noise common to all samples
only in part: it differs wherever the samples' log G differ. The second source is Lanczos itself
on ill-conditioned Jacobians: a fixed number of steps does not resolve a tail of tiny singular
values, and the estimate is biased upwards; more steps (up to n) reduce that. The float32 products
cannot resolve eigenvalues of G far below λ_max, which the exact path's float64 Gram still does.
Rankings can survive a bias that all samples share, so always check against the exact score with
:func:`jepa_monitor.evaluation.calibrate` (``python benchmarks/bench_scorer.py --sweep`` prints
Spearman and bias for several probe and step counts).

Probes are shared by all samples (same seed → the same probes for every sample in every
micro-batch), so a sample's score does not depend on its micro-batch and the part of the noise
common to all samples cancels in rankings.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .jacobian import _NOT_DIFFERENTIABLE, NotDifferentiableError, differentiable_forward
from .outputs import OutputSelector, Pooling, embed

# A Lanczos residual this small against the largest Ritz value seen means the Krylov space is
# exhausted (round-off after full reorthogonalisation is ~1e-16); any legitimate coupling this weak
# changes the quadrature by O(β²), far below the float32 matrix products' own noise.
_BREAKDOWN_REL_TOL = 1e-10


@contextlib.contextmanager
def _replace_output(module: Optional[nn.Module], value: torch.Tensor) -> Iterator[None]:
    if module is None:
        yield
        return
    handle = module.register_forward_hook(lambda _m, _i, _o: value)
    try:
        yield
    finally:
        handle.remove()


def _math_attention() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: nothing else to switch to
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class _GramProducts:
    """J·u and Jᵀ·v for a stacked batch of rows, from one retained forward graph.

    Jᵀv is one backward pass. J·u is the derivative of the linear map w ↦ Jᵀw, i.e. a backward
    pass through the graph of that first backward ("double backward"); it reuses the retained
    forward, where forward mode re-runs it. Ops without a double backward (the fused CPU
    attention kernel has none, nor a forward-mode rule) get the forward graph rebuilt with attention
    forced onto its composite "math" kernel, which computes the same function; failing that,
    forward mode (``torch.func.jvp``) re-runs the encoder for each product.
    """

    def __init__(self, encoder, x, output, pool, input_module):
        self._encoder, self._x, self._output, self._pool = encoder, x, output, pool
        self._input_module = input_module
        self._strategies = ["double_backward", "double_backward_math_attention", "forward_mode"]
        self._build(math_attention=False)

    def _build(self, math_attention: bool) -> None:
        encoder, x, input_module = self._encoder, self._x, self._input_module
        kernel = _math_attention() if math_attention else contextlib.nullcontext()
        with kernel:
            self.leaf, self.z = differentiable_forward(
                encoder, x, output=self._output, pool=self._pool, input_module=input_module
            )
        self._transpose_graph = None

    @property
    def strategy(self) -> str:
        return self._strategies[0]

    @property
    def embed_dim(self) -> int:
        return self.z.shape[1]

    @property
    def input_dim(self) -> int:
        return self.leaf[0].numel()

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        """(R, K) -> (R, D): Jᵀv, row by row."""
        (g,) = torch.autograd.grad(
            self.z, self.leaf, grad_outputs=v.to(self.z.dtype), retain_graph=True, allow_unused=True
        )
        if g is None:
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        return g.reshape(v.shape[0], -1)

    def jvp(self, u: torch.Tensor) -> torch.Tensor:
        """(R, D) -> (R, K): J·u, row by row."""
        tangent = u.to(self.leaf.dtype).reshape(self.leaf.shape)
        while True:
            try:
                return self._jvp(tangent).reshape(u.shape[0], -1)
            except torch.OutOfMemoryError:
                raise
            except (NotImplementedError, RuntimeError):
                if len(self._strategies) == 1:
                    raise
                self._strategies.pop(0)
                if self.strategy == "double_backward_math_attention":
                    self._build(math_attention=True)

    def _function(self, e: torch.Tensor) -> torch.Tensor:
        if self._input_module is None:
            return embed(self._encoder(e), self._output, self._pool, e.shape[0])
        with _replace_output(self._input_module, e):
            return embed(self._encoder(self._x), self._output, self._pool, self._x.shape[0])

    def _jvp(self, tangent: torch.Tensor) -> torch.Tensor:
        if self.strategy != "forward_mode":
            if self._transpose_graph is None:
                w = torch.zeros_like(self.z, requires_grad=True)
                (g,) = torch.autograd.grad(self.z, self.leaf, grad_outputs=w, create_graph=True)
                self._transpose_graph = (w, g)
            w, g = self._transpose_graph
            (out,) = torch.autograd.grad(g, w, grad_outputs=tangent, retain_graph=True)
            return out
        # Forward mode needs no tape: without no_grad the re-run would record one for the
        # parameters (which require grad) at every Lanczos step.
        with torch.no_grad(), _math_attention():
            _, out = torch.func.jvp(self._function, (self.leaf.detach(),), (tangent,))
        return out


def _rademacher(num: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (num, dim), generator=gen, dtype=torch.int64) * 2 - 1).to(
        device=device, dtype=torch.float64
    )


def lanczos_tridiagonal(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int):
    """Lanczos with full reorthogonalisation on R independent systems at once.

    ``start`` (R, n) are the starting vectors (normalised here); ``matvec`` maps (R, n) float64 to
    (R, n). Returns (alpha (R, m), beta (R, m - 1)) of each tridiagonal, m = min(steps, n). A row
    whose Krylov space is exhausted (breakdown) stops there: its remaining α, β are 0, which
    decouples a block that carries no quadrature weight. Rows with non-finite products stop too and
    keep the non-finite α.
    """
    r, n = start.shape
    m = min(steps, n)
    basis = start.new_zeros(m, r, n)
    alpha = start.new_zeros(m, r)
    beta = start.new_zeros(m, r)
    q = start / start.norm(dim=-1, keepdim=True)
    q_prev = torch.zeros_like(q)
    b_prev = start.new_zeros(r)
    scale = start.new_zeros(r)
    active = torch.ones(r, dtype=torch.bool, device=start.device)
    for j in range(m):
        basis[j] = q
        w = matvec(q)
        a = (w * q).sum(-1)
        alpha[j] = torch.where(active, a, torch.zeros_like(a))
        if j == m - 1:
            break
        w = w - a[:, None] * q - b_prev[:, None] * q_prev
        # Twice is enough (Kahan/Parlett): one pass leaves O(ε·κ) components behind.
        for _ in range(2):
            coeff = torch.einsum("jrn,rn->jr", basis[: j + 1], w)
            w = w - torch.einsum("jr,jrn->rn", coeff, basis[: j + 1])
        b = w.norm(dim=-1)
        scale = torch.maximum(scale, torch.maximum(a.abs(), b))
        active = active & (b > _BREAKDOWN_REL_TOL * scale)
        b = torch.where(active, b, torch.zeros_like(b))
        beta[j] = b
        q_prev, b_prev = q, b
        q = torch.where(active[:, None], w / b.clamp_min(torch.finfo(b.dtype).tiny)[:, None], torch.zeros_like(w))
        if not bool(active.any()):
            alpha, beta = alpha[: j + 1], beta[: j + 1]
            break
    return alpha.T.contiguous(), beta[: alpha.shape[0] - 1].T.contiguous()


def gauss_quadrature_nodes(alpha: torch.Tensor, beta: torch.Tensor):
    """Nodes θ (Ritz values) and weights τ² (Σ τ² = 1) of each tridiagonal's Gauss rule."""
    m = alpha.shape[-1]
    t = torch.diag_embed(alpha)
    if m > 1:
        t = t + torch.diag_embed(beta, offset=1) + torch.diag_embed(beta, offset=-1)
    theta, vecs = torch.linalg.eigh(t)
    return theta, vecs[..., 0, :].square()


def slq_chunk(
    encoder: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    output: OutputSelector = None,
    pool: Pooling = "mean",
    input_module: Optional[nn.Module] = None,
    rel_floor: Optional[float] = 1e-6,
    abs_floor: Optional[float] = None,
    num_probes: int = 8,
    lanczos_steps: int = 24,
    seed: int = 0,
):
    """SLQ estimate of JEPA-SCORE for one micro-batch; same contract as the exact chunk.

    Call inside ``scoring_context``. Returns (z detached (b, K), score float64 (b,), n_floored
    int64 (b,), D). ``n_floored`` is the quadrature's estimate of how many eigenvalues of G lie
    below the floor (rounded). The floor follows the exact path: eigenvalues of G (here: Ritz
    values) below ``rel_floor²·λ_max`` (λ_max estimated by the largest Ritz value over all probes
    of the sample) or ``abs_floor²`` are raised to it. All probes of all samples run as one stacked
    batch of ``num_probes·b`` rows through the encoder (memory: ``num_probes`` × activations).
    """
    if num_probes < 1 or lanczos_steps < 1:
        raise ValueError(f"num_probes and lanczos_steps must be >= 1; got {num_probes}, {lanczos_steps}.")
    if (rel_floor is None) == (abs_floor is None):
        raise ValueError("set exactly one of rel_floor and abs_floor")
    b = x.shape[0]
    stacked = x.repeat(num_probes, *([1] * (x.ndim - 1)))
    ops = _GramProducts(encoder, stacked, output, pool, input_module)
    k_dim, d_dim = ops.embed_dim, ops.input_dim
    n = min(k_dim, d_dim)
    if k_dim <= d_dim:
        def matvec(v):
            return ops.jvp(ops.vjp(v)).to(torch.float64)
    else:
        def matvec(v):
            return ops.vjp(ops.jvp(v)).to(torch.float64)

    probes = _rademacher(num_probes, n, seed, ops.z.device)
    start = probes[:, None, :].expand(num_probes, b, n).reshape(num_probes * b, n)
    alpha, beta = lanczos_tridiagonal(matvec, start, lanczos_steps)
    finite = torch.isfinite(alpha).all(-1) & torch.isfinite(beta).all(-1)
    alpha = torch.where(finite[:, None], alpha, torch.ones_like(alpha))
    beta = torch.where(finite[:, None], beta, torch.zeros_like(beta))
    theta, weight = gauss_quadrature_nodes(alpha, beta)
    theta = theta.clamp_min(0.0).reshape(num_probes, b, -1)
    weight = weight.reshape(num_probes, b, -1)
    if abs_floor is not None:
        floor = torch.full((b,), abs_floor**2, dtype=theta.dtype, device=theta.device)
    else:
        floor = rel_floor**2 * theta.amax(dim=(0, 2))
    floor = floor[None, :, None]
    # Weightless nodes (the decoupled block after a breakdown) must not turn 0·log 0 into NaN.
    log_nodes = torch.where(weight > 0, torch.maximum(theta, floor).log(), torch.zeros_like(theta))
    # ‖v‖² = n for a Rademacher probe.
    score = 0.5 * n * (weight * log_nodes).sum(-1).mean(0)
    # As on the exact path, an exactly zero Jacobian (floor 0) counts all its values as floored.
    below = n * (weight * ((theta < floor) | (theta <= 0))).sum(-1).mean(0)
    sample_finite = finite.reshape(num_probes, b).all(0)
    score = torch.where(sample_finite, score, torch.full_like(score, float("nan")))
    n_floored = torch.where(sample_finite, below.round(), torch.zeros_like(below)).to(torch.int64)
    return ops.z[:b].detach(), score, n_floored, d_dim
