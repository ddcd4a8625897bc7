"""Finding the input and the sample ids inside whatever a DataLoader yields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, List, Optional, Union

import torch

Key = Union[int, str, None]


def get_field(batch: Any, key: Key, what: str, param: str) -> Any:
    """``batch[key]`` for dicts and tuples/lists, ``getattr`` for objects, the batch itself for a bare
    tensor with key 0 or None. The error names the key, what the batch holds and the fix."""
    if isinstance(batch, torch.Tensor):
        if key in (0, None):
            return batch
        raise KeyError(
            f"{param}={key!r}: the batch is a bare tensor of shape {tuple(batch.shape)}, so the {what} "
            f"cannot be looked up by key; pass {param}=0 (or None)."
        )
    if key is None:
        return batch
    if isinstance(batch, Mapping):
        if key in batch:
            return batch[key]
        raise KeyError(
            f"{param}={key!r} is not in the batch; its keys are {list(batch.keys())}. "
            f"Pass {param}=<the key that holds the {what}>."
        )
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        if isinstance(key, int) and -len(batch) <= key < len(batch):
            return batch[key]
        raise KeyError(
            f"{param}={key!r} does not index the batch, a {type(batch).__name__} of {len(batch)} items. "
            f"Pass {param}=<the index (0..{len(batch) - 1}) of the {what}>."
        )
    if isinstance(key, str) and hasattr(batch, key):
        return getattr(batch, key)
    raise KeyError(
        f"{param}={key!r} cannot be looked up in a batch of type {type(batch).__name__}; pass the "
        f"dict key, tuple index or attribute name that holds the {what}."
    )


def get_input(batch: Any, key: Key) -> torch.Tensor:
    x = get_field(batch, key, "input", "input_key")
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"input_key={key!r} selects a {type(x).__name__}, not a tensor; point input_key at the "
            "input tensor of the encoder."
        )
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"input_key={key!r} selects a tensor of shape {tuple(x.shape)}, which has no rows.")
    return x


def get_ids(batch: Any, key: Key, n: int) -> Optional[List[str]]:
    if key is None:
        return None
    ids = get_field(batch, key, "sample ids", "id_key")
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"id_key={key!r} holds {len(ids)} ids for a batch of {n} rows.")
    return ids


def looks_like_images(x: torch.Tensor) -> bool:
    """(B, C, H, W) with 1 or 3 channels."""
    return x.ndim == 4 and x.shape[1] in (1, 3) and x.is_floating_point()
