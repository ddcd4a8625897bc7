"""Reading the held-out set once: the input rows, their ids and the encoder's side inputs; and which
rows of a training batch are scored as incoming.

The held-out set may be a DataLoader (or any iterable of batches laid out like training batches), a
tensor, or the path of a ``torch.save``-d tensor or dict batch (the form a YAML config can name).
Creating a DataLoader iterator draws a seed from the global RNG (and so would worker start-up):
the reading runs under a forked RNG so the training run's shuffling and augmentations are untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from jepa_monitor.batches import Key, get_ids, get_input
from jepa_monitor.diagnostics import trust_rows


@dataclass
class HeldoutSet:
    """CPU copies of the first rows of the held-out set."""

    x: torch.Tensor
    ids: List[str]
    side: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    def rows(self, index: torch.Tensor, device: Any) -> tuple:
        """(x, side) of the rows ``index``, on ``device``."""
        return self.x[index].to(device), {k: v[index].to(device) for k, v in self.side.items()}

    def embed_rest(self, z: torch.Tensor, scorer: Callable[[], Any], device: Any) -> torch.Tensor:
        """``z``, the embeddings of the first rows, completed with those of the other rows (one forward
        pass of ``scorer()``, built only when there are any)."""
        rest = torch.arange(z.shape[0], self.num_rows)
        if not rest.numel():
            return z
        x, side = self.rows(rest, device)
        with torch.inference_mode(False), torch.no_grad():
            return torch.cat([z, scorer().embed(x, **side).float().cpu()])


def load_heldout(source: Any, *, input_key: Key, id_key: Key, side_keys: Mapping[str, Key],
                 max_rows: int) -> HeldoutSet:
    """At most ``max_rows`` rows of ``source``; raises naming the problem when there are none."""
    if isinstance(source, (str, os.PathLike)):
        loaded = torch.load(source, map_location="cpu", weights_only=True)
        batches: Any = [loaded]
        if isinstance(loaded, torch.Tensor):
            input_key, id_key, side_keys = 0, None, {}
    elif isinstance(source, torch.Tensor):
        batches, input_key, id_key, side_keys = [source], 0, None, {}
    else:
        batches = source
    xs: List[torch.Tensor] = []
    ids: List[str] = []
    side: Dict[str, List[torch.Tensor]] = {k: [] for k in side_keys}
    have_ids = id_key is not None
    n = 0
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.no_grad():
        for batch in batches:
            x = get_input(batch, input_key)
            if have_ids:
                ids.extend(get_ids(batch, id_key, x.shape[0]))
            for name, key in side_keys.items():
                side[name].append(get_input(batch, key, param=f"encoder_kwargs_keys[{name!r}]").detach().cpu().clone())
            xs.append(x.detach().cpu().clone())
            n += x.shape[0]
            if n >= max_rows:
                break
    if n == 0:
        raise ValueError(
            "heldout yielded no samples; pass a non-empty DataLoader or tensor of held-out samples "
            "(check drop_last=True with a batch size larger than the held-out set)."
        )
    x = torch.cat(xs)[:max_rows]
    return HeldoutSet(
        x=x,
        ids=ids[: x.shape[0]] if have_ids else [str(i) for i in range(x.shape[0])],
        side={k: torch.cat(v)[: x.shape[0]] for k, v in side.items()},
    )


def trim_for_trust(data: HeldoutSet, embed_dim: int, jacobian_rows: int) -> HeldoutSet:
    """Keep the rows the monitor uses: the Jacobian-scored ones, and up to 4·K for the trust
    diagnostics (:func:`jepa_monitor.diagnostics.trust_rows`)."""
    keep = min(data.num_rows, max(jacobian_rows, trust_rows(embed_dim)))
    return HeldoutSet(data.x[:keep], data.ids[:keep], {n: v[:keep] for n, v in data.side.items()})


def pick_rows(n: int, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the incoming rows scored out of a training batch of ``n``: all of them, or a random
    subset of ``limit`` (in batch order) drawn from the monitor's private ``generator``."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def side_inputs(batch: Any, side_keys: Mapping[str, Key], rows: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The encoder's side inputs of a training batch (optionally only ``rows``)."""
    out = {}
    for name, key in side_keys.items():
        v = get_input(batch, key, param=f"encoder_kwargs_keys[{name!r}]")
        out[name] = v if rows is None else v[rows.to(v.device)]
    return out
