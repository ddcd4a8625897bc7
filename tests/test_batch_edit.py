"""Editing batches in place as a curation decision says: every supported and unsupported layout."""

from __future__ import annotations

import warnings
from collections import namedtuple

import pytest
import torch

from jepa_monitor import batch_edit
from jepa_monitor.batch_edit import UneditableBatchWarning, apply_decision
from jepa_monitor.policies import Decision

Pair = namedtuple("Pair", ["a", "b"])
KEEP = [True, False, True, True, False]
IDX = [0, 2, 3]


@pytest.fixture(autouse=True)
def fresh_warnings():
    batch_edit._warned.clear()
    yield
    batch_edit._warned.clear()


def decision(keep=KEEP, weight=None, batch_weight=1.0):
    keep = torch.tensor(keep)
    w = keep.float() if weight is None else torch.tensor(weight)
    return Decision(keep, w * batch_weight, torch.zeros(len(keep)), batch_weight, True)


def x5(cols=3):
    return torch.arange(5 * cols, dtype=torch.float32).reshape(5, cols)


def test_drop_dict_batch_every_per_sample_field():
    x, y = x5(), torch.arange(5)
    shared = torch.ones(3)  # not per-sample: left alone
    batch = {"x": x, "y": y, "ids": ["a", "b", "c", "d", "e"], "shared": shared, "name": "run", "n": 5}
    before = id(batch)
    assert apply_decision(batch, decision(), input_key="x") == 3
    assert id(batch) == before
    assert torch.equal(batch["x"], x[IDX]) and torch.equal(batch["y"], y[IDX])
    assert batch["ids"] == ["a", "c", "d"]
    assert batch["shared"] is shared and batch["name"] == "run" and batch["n"] == 5
    assert "sample_weight" not in batch


def test_drop_list_batch_and_nested_containers():
    x = x5()
    meta = {"label": torch.arange(5), "views": [x5(2), x5(2) + 100], "pair": Pair(torch.arange(5), ("p",) * 5),
            "boxes": [torch.zeros(i + 1, 4) for i in range(5)]}
    batch = [x, meta, ("u", "v", "w", "x", "y")]
    assert apply_decision(batch, decision(), input_key=0) == 3
    assert torch.equal(batch[0], x[IDX])
    assert batch[1] is meta and torch.equal(meta["label"], torch.tensor(IDX))
    assert torch.equal(meta["views"][1], x5(2)[IDX] + 100)
    assert isinstance(meta["pair"], Pair) and torch.equal(meta["pair"].a, torch.tensor(IDX))
    assert meta["pair"].b == ("p",) * 3
    assert [b.shape[0] for b in meta["boxes"]] == [1, 3, 4]  # per-sample list of variable-size tensors
    assert batch[2] == ("u", "w", "x")


def test_keep_all_leaves_the_batch_untouched():
    x = x5()
    batch = {"x": x}
    assert apply_decision(batch, decision([True] * 5), input_key="x") == 5
    assert batch["x"] is x


def test_tuple_batch_falls_back_to_zero_weights_in_its_dict():
    x = x5()
    batch = (x, {"y": torch.arange(5)})
    with pytest.warns(UneditableBatchWarning, match="tuple"):
        assert apply_decision(batch, decision(), input_key=0) == 5
    assert batch[0] is x
    assert batch[1]["sample_weight"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_tuple_and_tensor_batches_without_dict_train_unfiltered_with_one_warning():
    x = x5()
    with pytest.warns(UneditableBatchWarning, match="unfiltered"):
        assert apply_decision((x, torch.arange(5)), decision(), input_key=0) == 5
    with pytest.warns(UneditableBatchWarning, match="Tensor"):
        assert apply_decision(x, decision(), input_key=0) == 5
    assert x.shape == (5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_decision((x, torch.arange(5)), decision(), input_key=0)  # warned once already


def test_reweight_writes_weights_into_dict_batches_only():
    w = [1.0, 0.2, 0.0, 1.0, 0.5]
    batch = {"x": x5()}
    assert apply_decision(batch, decision([True] * 5, w), input_key="x", weight_key="w", mode="reweight") == 5
    assert batch["w"].tolist() == pytest.approx(w) and batch["w"].dtype == torch.float32
    assert batch["x"].shape == (5, 3)
    listed = [x5(), {"meta": 1}]
    apply_decision(listed, decision([True] * 5, w), input_key=0, mode="reweight")
    assert listed[1]["sample_weight"].tolist() == pytest.approx(w)
    with pytest.warns(UneditableBatchWarning, match="weights"):
        apply_decision([x5(), torch.arange(5)], decision([True] * 5, w), input_key=0, mode="reweight")


def test_drop_with_batch_weight_writes_the_kept_rows_weights():
    batch = {"x": x5()}
    assert apply_decision(batch, decision(batch_weight=0.0), input_key="x") == 3
    assert batch["x"].shape == (3, 3) and batch["sample_weight"].tolist() == [0.0, 0.0, 0.0]


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        apply_decision({"x": x5()}, decision(), input_key="x", mode=None)
    with pytest.raises(ValueError, match="4 rows"):
        apply_decision({"x": x5()}, decision(KEEP[:4]), input_key="x")
    with pytest.raises(ValueError, match="never be emptied"):
        apply_decision({"x": x5()}, decision([False] * 5), input_key="x")
