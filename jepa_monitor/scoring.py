"""JEPA-SCORE and the change-of-variables log-density: the public scoring functions."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from ._guards import scoring_context
from .jacobian import differentiation_point, embedding_and_jacobian
from .logdet import PAPER_ABS_FLOOR, gram, half_logdet
from .outputs import OutputSelector, Pooling, embed

if TYPE_CHECKING:
    from .whitening import Whitening

METHODS = ("exact", "slq")
DEFAULT_MEMORY_BUDGET = 256 * 2**20
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SampleScores:
    """Every per-sample component of one scoring pass (all tensors on the input's device).

    Attributes:
        jepa_score: Σ log σₖ(J_f(x)) over the rank, float32 (B,). Higher = more probable.
        log_prior: isotropic standard-Gaussian log-density of the embedding,
            -½‖f(x)‖² - K/2·log 2π, float32 (B,).
        log_density: ``jepa_score + log_prior``, float32 (B,): exactly log p(x) when f maps the
            data bijectively onto a standard Gaussian.
        n_floored: how many of the min(K, D) singular values were raised to the floor, int64 (B,).
            Non-zero means the Jacobian is (numerically) rank-deficient for that sample.
        embedding: f(x) after output selection and pooling, float32 (B, K), detached.
        input_dim: D, the number of input features differentiated against.
        method: "exact" or the approximation used.
    """

    jepa_score: torch.Tensor
    log_prior: torch.Tensor
    log_density: torch.Tensor
    n_floored: torch.Tensor
    embedding: torch.Tensor
    input_dim: int
    method: str

    @property
    def embed_dim(self) -> int:
        return self.embedding.shape[1]

    @property
    def rank_dim(self) -> int:
        """min(K, D): how many singular values each score sums."""
        return min(self.embed_dim, self.input_dim)


def _log_prior64(z: torch.Tensor) -> torch.Tensor:
    z64 = z.to(torch.float64)
    return -0.5 * z64.pow(2).sum(-1) - z.shape[-1] * HALF_LOG_2PI


def gaussian_log_prior(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per row of a (B, K) embedding, computed in float64, returned float32."""
    return _log_prior64(z).to(torch.float32)


def _check_input(x: Any, input_module: Optional[nn.Module]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (batch, ...); got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; it needs a batch dimension first, e.g. (batch, features). "
            "For a single sample use x.unsqueeze(0)."
        )
    if input_module is None and not x.is_floating_point():
        raise TypeError(
            f"x has dtype {x.dtype}, which cannot carry gradients. For token ids pass "
            "input_module=<the embedding layer>, and the score is taken with respect to the "
            "embedded tokens; otherwise convert x to a floating-point tensor."
        )
    return x


def _micro_batch(batch_size: Optional[int], memory_budget: int, k_dim: int, d_dim: int) -> int:
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        return batch_size
    n = min(k_dim, d_dim)
    # float32 Jacobian + its float64 copy + the Gram; activations are not counted.
    per_sample = k_dim * d_dim * 12 + n * n * 8
    return max(1, memory_budget // per_sample)


def _first_micro_batch(encoder, x1, *, output, pool, input_module, memory_budget) -> int:
    """Micro-batch size from one gradient-free forward pass of one sample (K and D are only known
    after a forward pass): fully scoring a first sample alone would cost a whole K-VJP loop."""
    with torch.no_grad(), differentiation_point(x1, input_module) as holder:
        raw = encoder(holder[0] if input_module is None else x1)
    if not holder:
        return 1  # the chunk path raises the explanatory error
    return _micro_batch(None, memory_budget, embed(raw, output, pool, 1).shape[1], holder[0][0].numel())


def _exact_chunk(encoder, x, *, output, pool, input_module, vectorize, rel_floor, abs_floor):
    z, jac = embedding_and_jacobian(
        encoder, x, output=output, pool=pool, input_module=input_module, vectorize=vectorize
    )
    d_dim = jac.shape[-1]
    s, floored = half_logdet(gram(jac), rel_floor=rel_floor, abs_floor=abs_floor)
    return z, s, floored, d_dim


def score_samples(
    encoder: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    output: OutputSelector = None,
    pool: Pooling = "mean",
    method: str = "exact",
    paper: bool = False,
    rel_floor: float = 1e-6,
    batch_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    input_module: Optional[nn.Module] = None,
    vectorize: Optional[int] = None,
    approx_options: Optional[dict] = None,
    whitening: Optional["Whitening"] = None,
) -> SampleScores:
    """Score every sample of ``x`` with the encoder's own density estimate, all components at once.

    Args:
        encoder: an ``nn.Module`` or any callable from a batch tensor to embeddings. Modules are
            scored in eval mode and every submodule's ``.training`` flag is restored afterwards.
        x: (B, ...) images, token sequences of vectors, or tabular rows; floating point unless
            ``input_module`` is given. Each sample is flattened to D features.
        output: which part of a dict/tuple output is the embedding (key, index or callable).
        pool: for (B, T, K) token outputs: "mean", "first" (CLS), "flatten" or a callable.
        method: "exact" (K input-VJPs per sample) or "slq" (stochastic Lanczos quadrature; see
            :mod:`jepa_monitor.approx` for when it ranks well).
        paper: reproduce the paper's listing: singular values clipped at an absolute 1e-6.
        rel_floor: otherwise, singular values below ``rel_floor·σ_max`` are raised to it and
            counted in ``n_floored``.
        batch_size: micro-batch size; by default chosen so one micro-batch's Jacobian fits in
            ``memory_budget`` bytes. Out of memory halves it and retries.
        input_module: differentiate with respect to this submodule's output instead of ``x``
            (e.g. the token embedding of a language model, so integer ids can be scored).
        vectorize: Jacobian rows per batched backward pass (GPU); None loops over rows.
        approx_options: keyword options of the approximate method.
        whitening: a :class:`jepa_monitor.whitening.Whitening` fitted on reference embeddings:
            score ``W(f(x) - μ)`` instead of f(x). JEPA-SCORE then shifts by -½·logdet Σ (K <= D),
            ``log_prior`` becomes the Mahalanobis term -½(z-μ)ᵀΣ⁻¹(z-μ) - K/2·log 2π and
            ``log_density`` is exact for encoders that map the data affinely onto any Gaussian.
            ``embedding`` is then the whitened embedding.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    x = _check_input(x, input_module)
    abs_floor = PAPER_ABS_FLOOR if paper else None
    rel = None if paper else rel_floor
    n = x.shape[0]
    device = x.device
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return SampleScores(
            empty, empty, empty, empty.long(), torch.empty(0, 0, dtype=torch.float32, device=device), 0, method
        )

    zs, ss, fs = [], [], []
    d_dim = None
    guarded = encoder  # eval mode and the other guards apply to the user's encoder itself
    if whitening is not None:
        from .whitening import WhitenedEncoder

        encoder = WhitenedEncoder(encoder, whitening, output=output, pool=pool).to(device)
        output, pool = None, "mean"
    with scoring_context(guarded, device):
        start, chunk = 0, batch_size
        while start < n:
            if chunk is None:
                chunk = _first_micro_batch(
                    encoder, x[:1], output=output, pool=pool, input_module=input_module,
                    memory_budget=memory_budget,
                )
            xc = x[start : start + chunk]
            try:
                if method == "exact":
                    z, s, floored, d_dim = _exact_chunk(
                        encoder, xc, output=output, pool=pool, input_module=input_module,
                        vectorize=vectorize, rel_floor=rel, abs_floor=abs_floor,
                    )
                else:
                    from .approx import slq_chunk

                    z, s, floored, d_dim = slq_chunk(
                        encoder, xc, output=output, pool=pool, input_module=input_module,
                        rel_floor=rel, abs_floor=abs_floor, **(approx_options or {}),
                    )
            except torch.OutOfMemoryError:
                if xc.shape[0] == 1:
                    raise
                chunk = max(1, xc.shape[0] // 2)
                warnings.warn(f"out of memory while scoring; retrying with micro-batch {chunk}", stacklevel=2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            zs.append(z)
            ss.append(s)
            fs.append(floored)
            start += xc.shape[0]
    # The prior is taken from the embedding in the encoder's own precision: a float64 encoder
    # (e.g. an exact Gaussianizing map) must give log_density to float64 accuracy before rounding.
    z = torch.cat(zs)
    score64 = torch.cat(ss)
    prior64 = _log_prior64(z)
    return SampleScores(
        jepa_score=score64.to(torch.float32),
        log_prior=prior64.to(torch.float32),
        log_density=(score64 + prior64).to(torch.float32),
        n_floored=torch.cat(fs),
        embedding=z.to(torch.float32),
        input_dim=d_dim,
        method=method,
    )


def jepa_score(encoder: Callable[[torch.Tensor], Any], x: torch.Tensor, **options: Any) -> torch.Tensor:
    """JEPA-SCORE(x) = Σₖ log σₖ(J_f(x)) over the rank, float32 (B,). Higher = more probable.

    ½·logdet(J Jᵀ) when K <= D, ½·logdet(Jᵀ J) when K > D (natural log). Options as in
    :func:`score_samples`.
    """
    return score_samples(encoder, x, **options).jepa_score


def log_density(encoder: Callable[[torch.Tensor], Any], x: torch.Tensor, **options: Any) -> torch.Tensor:
    """Change-of-variables log-density: JEPA-SCORE - ½‖f(x)‖² - K/2·log 2π, float32 (B,).

    Equals log p(x) exactly when f maps the data bijectively onto a standard Gaussian (K = D).
    Options as in :func:`score_samples`.
    """
    return score_samples(encoder, x, **options).log_density
