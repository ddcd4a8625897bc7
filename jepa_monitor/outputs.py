"""From whatever the encoder returns to one embedding row per sample, shape (B, K)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

OutputSelector = Union[None, str, int, Callable[[Any], torch.Tensor]]
Pooling = Union[str, Callable[[torch.Tensor], torch.Tensor]]

POOLINGS = ("mean", "first", "flatten")


def select_output(out: Any, output: OutputSelector) -> torch.Tensor:
    """Pick the embedding from a tensor, dict, tuple/list or dataclass-like output."""
    if callable(output):
        out = output(out)
    elif output is not None:
        try:
            out = out[output]
        except (KeyError, IndexError, TypeError) as err:
            keys = list(out.keys()) if isinstance(out, dict) else None
            raise ValueError(
                f"output={output!r} does not select anything from the encoder's output of type "
                f"{type(out).__name__}" + (f" (keys: {keys})" if keys is not None else "")
                + "; pass a key of the dict, an index of the tuple, or a callable."
            ) from err
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        raise TypeError(
            f"the encoder returned a dict with keys {list(out.keys())}; pass output=<key> to say "
            "which entry is the embedding."
        )
    if isinstance(out, (tuple, list)):
        raise TypeError(
            f"the encoder returned a {type(out).__name__} of {len(out)} items; pass output=<index> "
            "to say which item is the embedding."
        )
    raise TypeError(
        f"the encoder returned {type(out).__name__}, not a tensor; pass output=<callable> that "
        "extracts the embedding tensor."
    )


def masked_mean(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, K) token outputs over the tokens where ``mask`` (B, T) is non-zero: padding
    must not count, or a short sentence's embedding depends on how much padding its batch had."""
    if mask.shape != z.shape[:2]:
        raise ValueError(
            f"the attention mask has shape {tuple(mask.shape)} but the encoder's token output is "
            f"{tuple(z.shape)}; mean pooling needs one mask entry per output token (B, T)."
        )
    w = (mask != 0).to(z.dtype).unsqueeze(-1)
    return (z * w).sum(1) / w.sum(1).clamp_min(1.0)


def pool_tokens(z: torch.Tensor, pool: Pooling, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K) stays; (B, T, K) token outputs are pooled (``mask`` (B, T) excludes padding from
    "mean"); anything wider is flattened."""
    if z.ndim == 2:
        return z
    if z.ndim < 2:
        raise ValueError(
            f"the encoder's output has shape {tuple(z.shape)}; expected (batch, K) or "
            "(batch, tokens, K)."
        )
    if callable(pool):
        pooled = pool(z)
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2:
            raise ValueError("the pool callable must map the encoder output to a (batch, K) tensor.")
        return pooled
    if pool == "flatten" or z.ndim > 3:
        return z.flatten(1)
    if pool == "mean":
        return z.mean(dim=1) if mask is None else masked_mean(z, mask)
    if pool == "first":
        return z[:, 0]
    raise ValueError(f"pool={pool!r} is not one of {POOLINGS} or a callable.")


def embed(out: Any, output: OutputSelector, pool: Pooling, batch_size: int,
          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (B, K) embedding of an encoder output: selected, pooled, checked."""
    z = pool_tokens(select_output(out, output), pool, mask)
    if z.shape[0] != batch_size:
        raise ValueError(
            f"the encoder's output has {z.shape[0]} rows for {batch_size} input samples; the "
            "first dimension of the output must be the batch."
        )
    if not z.is_floating_point():
        raise TypeError(f"the encoder's output has dtype {z.dtype}; an embedding must be floating point.")
    return z
