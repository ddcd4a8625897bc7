"""JEPA-SCORE and the change-of-variables log-density as plain functions of (encoder, x).

Thin wrappers over :class:`jepa_monitor.scorer.Scorer` for one-off calls; code that scores
repeatedly with the same options builds one Scorer and keeps it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .scorer import as_scorer
from .sample_scores import SampleScores


def score_samples(encoder: Callable[..., Any], x: torch.Tensor, **options: Any) -> SampleScores:
    """Score every sample of ``x`` with the encoder's own density estimate, all components at once.

    ``options`` are the fields of :class:`~jepa_monitor.scorer.Scorer` (``output``, ``pool``,
    ``method``, ``paper``, ``rel_floor``, ``batch_size``, ``memory_bytes``, ``input_module``,
    ``vectorize``, ``approx_options``, ``whitening``, ``mask_key``, ``progress``), documented
    there. ``encoder`` may also be a Scorer (the options then override its own). Side inputs of
    the encoder (e.g. ``attention_mask``) go through ``Scorer(encoder).score(x, attention_mask=m)``.
    """
    return as_scorer(encoder, **options).score(x)


def jepa_score(encoder: Callable[..., Any], x: torch.Tensor, **options: Any) -> torch.Tensor:
    """JEPA-SCORE(x) = Σₖ log σₖ(J_f(x)) over the rank, float32 (B,). Higher = more probable.

    ½·logdet(J Jᵀ) when K <= D, ½·logdet(Jᵀ J) when K > D (natural log). Options as in
    :func:`score_samples`.
    """
    return score_samples(encoder, x, **options).jepa_score


def log_density(encoder: Callable[..., Any], x: torch.Tensor, **options: Any) -> torch.Tensor:
    """Change-of-variables log-density: JEPA-SCORE - ½‖f(x)‖² - K/2·log 2π, float32 (B,).

    Equals log p(x) exactly when f maps the data bijectively onto a standard Gaussian (K = D).
    Options as in :func:`score_samples`.
    """
    return score_samples(encoder, x, **options).log_density
