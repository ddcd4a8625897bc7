"""Shared test references: an independent float64 brute-force JEPA-SCORE."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

# benchmarks/synthetic.py (known-density mixtures and SIGReg encoders) serves the fidelity tests too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def brute_force_scores(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    rel_floor: Optional[float] = 1e-6,
    abs_floor: Optional[float] = None,
):
    """Per-sample float64 Jacobian (torch.autograd.functional.jacobian) of the eval-mode function,
    then svdvals; σ clamped at ``rel_floor·σ_max`` (or ``abs_floor``), summed over min(K, D).

    ``head`` maps the model output (1, ...) to the (1, K) embedding (pooling, output selection).
    Returns (scores float64 (B,), n_floored int64 (B,), singular values list).
    """
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    head = head or (lambda out: out)
    scores, floored, svals = [], [], []
    for xi in x.to(torch.float64):

        def f(v: torch.Tensor) -> torch.Tensor:
            return head(m64(v.unsqueeze(0))).reshape(-1)

        jac = torch.autograd.functional.jacobian(f, xi).reshape(-1, xi.numel())
        s = torch.linalg.svdvals(jac)
        floor = abs_floor if abs_floor is not None else rel_floor * s.max()
        scores.append(s.clamp_min(floor).log().sum())
        floored.append((s < floor).sum())
        svals.append(s)
    return torch.stack(scores), torch.stack(floored), svals


@pytest.fixture
def brute_force():
    return brute_force_scores


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a busy 2-core machine a second thread only
    spin-waits for a taken core (4-20x slower measured in test_approx, test_fidelity_small)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
