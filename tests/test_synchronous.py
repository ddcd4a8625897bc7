"""Which strategies get rank-synchronous scoring, and what a synchronous scorer accepts."""

import pytest
import torch
from torch import nn

from jepa_monitor import Scorer
from jepa_monitor.callbacks._synchronous import SynchronousScorer, is_sharded, synchronous_world


def test_sharded_strategies_are_recognised_by_class_in_both_namespaces():
    import lightning.pytorch.strategies as lps
    import pytorch_lightning.strategies as pls

    for module in (lps, pls):
        assert is_sharded(module.FSDPStrategy())
        assert not is_sharded(module.DDPStrategy())
        assert not is_sharded(module.SingleDeviceStrategy(device=torch.device("cpu")))

    class MyFSDPLikeName:  # a name is not a contract
        pass

    assert not is_sharded(MyFSDPLikeName())
    assert synchronous_world("auto", lps.FSDPStrategy(), 2) == 2
    assert synchronous_world("auto", lps.DDPStrategy(), 2) is None
    assert synchronous_world(True, lps.DDPStrategy(), 2) == 2 and synchronous_world(True, lps.DDPStrategy(), 1) is None


def test_synchronous_scorer_takes_replicated_rows_and_refuses_an_explicit_auto():
    filler = (torch.zeros(1, 3), {})
    enc = nn.Linear(3, 2)
    assert SynchronousScorer(Scorer(enc), 2, filler).scorer.vectorize == "replicated"
    assert SynchronousScorer(Scorer(enc, vectorize=0), 2, filler).scorer.vectorize == 0  # explicit: kept
    with pytest.raises(ValueError, match="vectorize='auto'"):
        SynchronousScorer(Scorer(enc, vectorize="auto"), 2, filler)
