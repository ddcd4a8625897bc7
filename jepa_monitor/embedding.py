"""The embedding alone: one forward pass, no Jacobian.

The Gaussian prior term of the log-density is a function of the embedding only, so it costs one
forward pass where the Jacobian term costs K backward passes. Curation uses it as a cheap first
stage (:mod:`jepa_monitor.policies`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from ._guards import scoring_context
from .outputs import OutputSelector, Pooling, embed
from .scoring import score_samples


def embed_only(
    encoder: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    output: OutputSelector = None,
    pool: Pooling = "mean",
) -> torch.Tensor:
    """f(x) as a detached (B, K) tensor in the encoder's dtype, under the same guards as scoring.

    The guards matter here too: a train-mode BatchNorm or dropout would give an embedding that the
    Jacobian stage, which runs in eval mode, does not see. Options mean what they mean in
    :func:`jepa_monitor.score_samples`.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("x must be a tensor of shape (batch, ...); for a single sample use x.unsqueeze(0).")
    with scoring_context(encoder, x.device), torch.no_grad():
        return embed(encoder(x), output, pool, x.shape[0]).detach()


def cheap_embedder(score_fn: Callable[[torch.Tensor], Any]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``x -> f(x)`` for a ``functools.partial(score_samples, encoder, **options)``, else None.

    That partial is how the monitor callback builds its scorer; any other callable is opaque, and a
    caller that wants the cheap stage passes its own embedding function instead.
    """
    if not (isinstance(score_fn, functools.partial) and score_fn.func is score_samples and len(score_fn.args) == 1):
        return None
    options = score_fn.keywords
    embed_fn = functools.partial(
        embed_only, score_fn.args[0], output=options.get("output"), pool=options.get("pool", "mean")
    )
    whitening = options.get("whitening")
    if whitening is None:
        return embed_fn
    # score_samples then reports the prior of the whitened embedding; the cheap stage must match it.
    def whitened(x: torch.Tensor) -> torch.Tensor:
        z = embed_fn(x)
        return (z - whitening.mean.to(z)) @ whitening.matrix.to(z)

    return whitened
