"""Rank-synchronous scoring, for training whose parameters are sharded across ranks (FSDP).

Under FSDP every forward and backward pass of the encoder gathers parameter shards from all ranks:
a rank that scores 6 rows while another scores 5 (one micro-batch more, or K backward passes more)
waits forever in a collective the other never reaches. The wrapper below makes every ``score``
call run the same passes on every rank: the ranks agree on the largest row count, each pads its
rows to it (repeating a filler row) and drops the padding from the result. Curation then scores
on every rank at every active batch, even a rank whose own rows needed no Jacobian.

The Jacobian rows must also come the same way on every rank: ``vectorize="auto"`` times the
candidates on each rank's own clock and may pick differently (a straggling rank does), so a synchronous scorer takes replicated rows instead of "auto": a fixed
count of passes for a given row count, and no graph retained across backward passes, which FSDP1
(Lightning's ``FSDPStrategy``) needs: it frees the gathered parameters after a backward pass, and
the row loop's second backward pass on the retained graph then fails. An explicit ``vectorize`` in
the monitor's ``Scorer`` is kept as given; ``"auto"`` is refused with the reason.

DDP does not need this (parameters are replicated; scoring makes no collective call), so the
monitor turns it on by default only for sharded strategies (``rank_synchronous="auto"``).
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Optional, Tuple

import torch

from jepa_monitor.batches import is_per_sample
from jepa_monitor.scorer import Scorer
from jepa_monitor.sample_scores import SampleScores

from ._distributed import gather_objects


def _sharded_strategies() -> tuple:
    """Lightning's strategies that shard parameters (FSDP, DeepSpeed, ModelParallel), from both
    namespaces (``lightning.pytorch`` and ``pytorch_lightning`` have distinct classes)."""
    classes = []
    for module in ("lightning.pytorch.strategies", "pytorch_lightning.strategies"):
        try:
            strategies = importlib.import_module(module)
        except ImportError:
            continue
        classes += [getattr(strategies, n) for n in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
                    if hasattr(strategies, n)]
    return tuple(classes)


def is_sharded(strategy: Any) -> bool:
    """FSDP, DeepSpeed and model-parallel strategies shard the module's parameters."""
    return isinstance(strategy, _sharded_strategies())


def synchronous_world(rank_synchronous: Any, strategy: Any, world_size: int) -> Optional[int]:
    """The world size every rank's rows are padded to (``rank_synchronous``), None when they need not be."""
    sync = rank_synchronous is True or (rank_synchronous == "auto" and is_sharded(strategy))
    return world_size if sync and world_size > 1 else None


class SynchronousScorer:
    """A :class:`~jepa_monitor.Scorer` whose every ``score`` call costs the same passes on every rank."""

    synchronized = True

    def __init__(self, scorer: Scorer, world_size: int, filler: Tuple[torch.Tensor, Dict[str, torch.Tensor]]) -> None:
        if scorer.vectorize is None:
            scorer = scorer.replace(vectorize="replicated")  # the same passes on every rank (module docstring)
        elif scorer.vectorize == "auto":
            raise ValueError("vectorize='auto' times the row modes on each rank's own clock and may pick differently "
                             "per rank, which hangs sharded training: leave vectorize unset (replicated rows are used) "
                             "or choose a mode explicitly.")
        self.scorer, self.world_size = scorer, world_size
        self.filler_x, self.filler_side = filler  # one row (1, ...) and its side inputs

    def embed(self, x: torch.Tensor, **side: Any) -> torch.Tensor:
        return self.scorer.embed(x, **side)  # one forward per call; every rank calls it alike

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.scorer.log_prior(z)  # no pass of the encoder

    def sketched(self, m: int) -> "SynchronousScorer":
        return SynchronousScorer(self.scorer.sketched(m), self.world_size, (self.filler_x, self.filler_side))

    def score(self, x: torch.Tensor, **side: Any) -> SampleScores:
        n = x.shape[0]
        target = max(gather_objects(n, self.world_size))
        if target == n:
            return self.scorer.score(x, **side)
        pad = target - n
        fx = self.filler_x.to(x.device, x.dtype) if n == 0 else x[-1:]
        xs = torch.cat([x, fx.expand(pad, *fx.shape[1:])])
        padded = {}
        for k, v in side.items():
            if is_per_sample(v, n):
                fv = self.filler_side[k].to(v.device, v.dtype) if n == 0 else v[-1:]
                v = torch.cat([v, fv.expand(pad, *fv.shape[1:])])
            padded[k] = v
        return self.scorer.score(xs, **padded).select(torch.arange(n, device=x.device))

    def __call__(self, x: torch.Tensor, **side: Any) -> SampleScores:
        return self.score(x, **side)

