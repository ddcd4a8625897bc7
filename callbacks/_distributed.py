"""Gathering per-rank results of different lengths without hanging.

``all_gather`` needs the same shape on every rank, so each rank first shares its row count, pads
its rows to the largest count, gathers, and every rank trims the padding away. A rank whose
measurement failed sends -1 as its count, so all ranks agree to skip the measurement together
instead of one rank waiting forever in a collective the others never reach.
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist


def is_distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _all_gather(t: torch.Tensor, world_size: int) -> torch.Tensor:
    # Plain torch.distributed: Lightning's all_gather goes through the autograd-aware
    # torch.distributed.nn variant, which monitoring never needs.
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def gather_rows(strategy: Any, rows: Optional[torch.Tensor], world_size: int) -> Optional[torch.Tensor]:
    """Concatenate every rank's (n_r, C) float64 rows in rank order, on every rank (CPU).

    ``rows=None`` marks a failed measurement on this rank; then every rank gets None.
    """
    if not is_distributed(world_size):
        return None if rows is None else rows.cpu()
    device = strategy.root_device
    n = -1 if rows is None else rows.shape[0]
    width = -1 if rows is None else rows.shape[1]
    meta = _all_gather(torch.tensor([n, width], dtype=torch.int64, device=device), world_size).cpu()
    if (meta[:, 0] < 0).any():
        return None
    width = int(meta[:, 1].max())
    longest = int(meta[:, 0].max())
    padded = torch.zeros(longest, width, dtype=torch.float64, device=device)
    padded[: rows.shape[0]] = rows.to(device=device, dtype=torch.float64)
    gathered = _all_gather(padded, world_size).cpu()
    return torch.cat([gathered[r, : int(meta[r, 0])] for r in range(world_size)])


def compute_and_gather(compute: Callable[[], torch.Tensor], strategy: Any, world_size: int
                       ) -> Tuple[Optional[torch.Tensor], Optional[BaseException], float]:
    """(every rank's rows of ``compute()``, this rank's error, seconds): the rows are None when any rank
    failed. Every rank reaches the same collectives whether or not it failed."""
    start, rows, err = time.perf_counter(), None, None
    try:
        rows = compute()
    except Exception as e:  # a fault inside scoring must never end the training run
        err = e
    gathered = gather_rows(strategy, rows, world_size)
    return gathered, err, time.perf_counter() - start


def gather_objects(obj: Any, world_size: int) -> List[Any]:
    """Every rank's picklable ``obj`` (e.g. string ids), in rank order."""
    if not is_distributed(world_size):
        return [obj]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
