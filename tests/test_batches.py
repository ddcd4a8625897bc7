"""Reading and editing batches: keys, paths and callables; every editable and uneditable layout,
including the real nested layouts of stable-pretraining and lightly (mirrored, not imported)."""

from __future__ import annotations

import types
import warnings
from collections import namedtuple

import pytest
import torch

from jepa_monitor import batches
from jepa_monitor.batches import (BatchEdit, UneditableBatchWarning, apply_decision, describe, get_ids, get_input,
                                  looks_like_images)
from jepa_monitor.policies import Decision

Pair = namedtuple("Pair", ["a", "b"])
KEEP = [True, False, True, True, False]
IDX = [0, 2, 3]
FIX = "return a list or dict from the collate_fn"


@pytest.fixture(autouse=True)
def fresh_warnings():
    batches._warned.clear()
    yield
    batches._warned.clear()


def decision(keep=KEEP, weight=None, batch_weight=1.0):
    keep = torch.tensor(keep)
    w = keep.float() if weight is None else torch.tensor(weight)
    return Decision(keep, w * batch_weight, torch.zeros(len(keep)), batch_weight, True)


def x5(cols=3):
    return torch.arange(5 * cols, dtype=torch.float32).reshape(5, cols)


def spt_batch(b=5, n_views=2):
    """stable-pretraining 0.1.8: a dict with a list of per-view dicts (each view its own crop)."""
    gen = torch.Generator().manual_seed(0)
    return {"views": [{"image": torch.randn(b, 3, 8, 8, generator=gen) + 10 * v, "label": torch.arange(b) % 3,
                       "sample_idx": torch.arange(100, 100 + b)} for v in range(n_views)]}


def lightly_views(b=5):
    return [x5(4)[:b], x5(4)[:b] + 100]  # two augmented views of the same rows


def filenames(b=5):
    return [f"img{i}.png" for i in range(b)]


# ------------------------------------------------------------------------------------ reading
def test_paths_into_stable_pretraining_batches():
    batch = spt_batch()
    x = get_input(batch, "views.0.image")
    assert x is batch["views"][0]["image"]
    assert get_input(batch, ("views", 1, "image")) is batch["views"][1]["image"]
    assert get_ids(batch, "views.0.sample_idx", 5) == [str(i) for i in range(100, 105)]
    assert get_ids(batch, ("views", -1, "sample_idx"), 5) == get_ids(batch, "views.0.sample_idx", 5)


@pytest.mark.parametrize("outer", [list, tuple])  # default collate gives a list, MultiViewCollate a tuple
def test_paths_into_lightly_batches(outer):
    views = lightly_views()
    batch = outer([views, torch.arange(5), filenames()])
    assert get_input(batch, (0, 0)) is views[0]
    assert get_input(batch, "0.1") is views[1]
    assert get_input(batch, "0.-1") is views[1]
    assert get_ids(batch, 2, 5) == filenames()
    assert get_ids(batch, "1", 5) == ["0", "1", "2", "3", "4"]


def test_top_level_keys_win_over_dotted_paths_and_digit_keys_match_ints():
    literal, nested = torch.zeros(2, 1), torch.ones(2, 1)
    batch = {"a.b": literal, "a": {"b": nested}, 0: nested}
    assert get_input(batch, "a.b") is literal
    assert get_input(batch, ("a", "b")) is nested
    assert get_input(batch, "0") is nested and get_input(batch, 0) is nested
    assert get_input(nested, 0) is nested and get_input(nested, None) is nested
    assert get_input(Pair(literal, nested), "b") is nested  # namedtuple fields by name


def test_callable_keys():
    batch = spt_batch()
    assert get_input(batch, lambda b: b["views"][1]["image"]) is batch["views"][1]["image"]
    assert get_ids(batch, lambda b: b["views"][0]["sample_idx"].tolist(), 5)[0] == "100"

    def broken(b):
        return b["pixels"]

    with pytest.raises(ValueError, match=r"input_key callable broken raised KeyError: 'pixels'") as err:
        get_input(batch, broken)
    assert isinstance(err.value.__cause__, KeyError) and "views.0.image (5, 3, 8, 8)" in str(err.value)
    with pytest.raises(TypeError, match=r"input_key callable <lambda> selects a list, not a tensor.*views.1.label"):
        get_input(batch, lambda b: b["views"])


def test_wrong_keys_name_the_failing_part_and_list_the_tensors():
    batch = spt_batch(b=64)
    with pytest.raises(KeyError) as err:
        get_input(batch, "views.0.img")
    msg = str(err.value)
    assert msg.startswith("input_key='views.0.img': 'img' is not a key of views.0 (keys: ['image', 'label', "
                          "'sample_idx']). Tensors in this batch: views.0.image (64, 3, 8, 8), views.0.label (64,), ")
    assert "views.1.sample_idx (64,)" in msg
    with pytest.raises(KeyError, match=r"index 2 is past the end of views, a list of 2 items"):
        get_input(batch, ("views", 2, "image"))
    with pytest.raises(KeyError, match=r"'x' is not an index of views, a list"):
        get_input(batch, "views.x.image")
    with pytest.raises(KeyError, match=r"views.0.image is a tensor of shape \(64, 3, 8, 8\); the path ends there"):
        get_input(batch, "views.0.image.0")
    with pytest.raises(KeyError, match=r"id_key='idx': 'idx' is not a key of the batch \(keys: \['views'\]\)"):
        get_ids(batch, "idx", 64)
    with pytest.raises(KeyError, match=r"input_key='x': the batch is a bare tensor of shape \(5, 3\).*pass 0"):
        get_input(x5(), "x")
    with pytest.raises(TypeError, match=r"input_key='views.0' selects a dict, not a tensor"):
        get_input(batch, "views.0")
    with pytest.raises(TypeError, match="path parts must be ints or strs"):
        get_input(batch, ("views", 0.0))
    with pytest.raises(ValueError, match="no rows"):
        get_input({"x": torch.zeros(0, 3)}, "x")


def test_ids_must_match_the_rows():
    batch = [lightly_views(), torch.arange(5), filenames()]
    with pytest.raises(ValueError, match=r"id_key=2 holds 5 ids for a batch of 4 rows.*2 \(list of 5 str\)"):
        get_ids(batch, 2, 4)
    with pytest.raises(TypeError, match="not one id per row"):
        get_ids({"name": "run"}, "name", 3)
    assert get_ids(batch, None, 5) is None
    assert get_ids({"i": [torch.tensor(7), torch.tensor(8)]}, "i", 2) == ["7", "8"]


def test_describe_lists_addressable_leaves():
    batch = spt_batch(b=4, n_views=1)
    batch["name"] = "run"
    assert describe(batch) == ["views.0.image (4, 3, 8, 8)", "views.0.label (4,)", "views.0.sample_idx (4,)"]
    assert describe((lightly_views(), torch.arange(5), filenames())) == [
        "0.0 (5, 4)", "0.1 (5, 4)", "1 (5,)", "2 (list of 5 str)"]
    assert describe(x5()) == ["<batch> (5, 3)"]
    assert describe([torch.zeros(1)] * 10, max_items=3) == ["0 (1,)", "1 (1,)", "2 (1,)", "..."]
    assert describe(object()) == []


def test_looks_like_images():
    assert looks_like_images(torch.zeros(2, 3, 8, 8)) and looks_like_images(torch.zeros(2, 1, 8, 8))
    assert not looks_like_images(torch.zeros(2, 4, 8, 8))
    assert not looks_like_images(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    assert not looks_like_images([torch.zeros(2, 3, 8, 8)])


# ------------------------------------------------------------------------------------ editing
def test_drop_dict_batch_every_per_sample_field():
    x, y = x5(), torch.arange(5)
    shared = torch.ones(3)  # not per-sample: left alone
    batch = {"x": x, "y": y, "ids": ["a", "b", "c", "d", "e"], "shared": shared, "name": "run", "n": 5}
    before = id(batch)
    assert apply_decision(batch, decision(), input_key="x") == BatchEdit(3, 2, 0, False, None)
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
    assert apply_decision(batch, decision(), input_key=0).rows == 3
    assert torch.equal(batch[0], x[IDX])
    assert batch[1] is meta and torch.equal(meta["label"], torch.tensor(IDX))
    assert torch.equal(meta["views"][1], x5(2)[IDX] + 100)
    assert isinstance(meta["pair"], Pair) and torch.equal(meta["pair"].a, torch.tensor(IDX))
    assert meta["pair"].b == ("p",) * 3
    assert [b.shape[0] for b in meta["boxes"]] == [1, 3, 4]  # per-sample list of variable-size tensors
    assert batch[2] == ("u", "w", "x")


@pytest.mark.parametrize("b, n_views", [(5, 2), (2, 2), (3, 3)])  # B == number of views must not confuse it
def test_drop_stable_pretraining_batch_edits_every_view(b, n_views):
    batch = spt_batch(b, n_views)
    original = [dict(view) for view in batch["views"]]
    views = batch["views"]
    keep = [i != 1 for i in range(b)]
    rows = [i for i in range(b) if i != 1]
    edit = apply_decision(batch, decision(keep), input_key="views.0.image")
    assert edit == BatchEdit(b - 1, 1, 0, False, None)
    assert batch["views"] is views and len(views) == n_views
    for view, before in zip(views, original):
        for field in ("image", "label", "sample_idx"):
            assert torch.equal(view[field], before[field][rows]), field


def test_drop_lightly_list_batch_edits_views_targets_and_filenames():
    views = lightly_views()
    v0, v1 = views[0], views[1]
    batch = [views, torch.arange(5) + 10, filenames()]
    assert apply_decision(batch, decision(), input_key=(0, 0)) == BatchEdit(3, 2, 0, False, None)
    assert batch[0] is views and torch.equal(views[0], v0[IDX]) and torch.equal(views[1], v1[IDX])
    assert batch[1].tolist() == [10, 12, 13]
    assert batch[2] == ["img0.png", "img2.png", "img3.png"]


def test_tuple_batch_of_mutable_containers_is_edited_in_place():
    views, targets, names = lightly_views(), [0, 1, 2, 3, 4], filenames()
    v1 = views[1]
    batch = (views, targets, names, {"crop": torch.arange(5)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edit = apply_decision(batch, decision(), input_key="0.0")
    assert edit == BatchEdit(3, 2, 0, False, None)
    assert batch[0] is views and torch.equal(views[1], v1[IDX])
    assert batch[1] is targets and targets == [0, 2, 3]
    assert names == ["img0.png", "img2.png", "img3.png"]
    assert batch[3]["crop"].tolist() == IDX


def test_tuple_batch_with_a_tensor_item_is_left_whole():
    """lightly MultiViewCollate: (views list, targets tensor, filenames). The targets cannot be
    rebound, so editing the views alone would misalign them: nothing is edited."""
    views, targets, names = lightly_views(), torch.arange(5), filenames()
    v0 = views[0]
    batch = (views, targets, names)
    held = r"field 1 \(a tensor of shape \(5,\)\) is held by the tuple batch itself"
    with pytest.warns(UneditableBatchWarning, match=rf"tuple batch.*{held}.*{FIX}") as record:
        edit = apply_decision(batch, decision(), input_key=(0, 0))
    assert record[0].filename == __file__  # points at the caller, not at batches.py
    assert edit.rows == 5 and edit.removed == 0 and edit.not_applied == 2 and not edit.weights_written
    assert "tuple batch cannot be edited in place" in edit.reason and FIX in edit.reason
    assert views[0] is v0 and len(views) == 2 and batch[1] is targets and len(names) == 5


def test_tuple_nested_in_a_tuple_batch_blocks_the_edit():
    names = filenames()
    batch = ([x5()], ("a", "b", "c", "d", "e"), names)
    with pytest.warns(UneditableBatchWarning, match="field 1 \\(a tuple of 5 items\\)"):
        assert apply_decision(batch, decision(), input_key="0.0").not_applied == 2
    assert batch[0][0].shape == (5, 3) and len(names) == 5


def test_read_only_mapping_inside_a_dict_batch_blocks_the_edit():
    x = x5()
    batch = {"x": x, "meta": types.MappingProxyType({"y": torch.arange(5)})}
    with pytest.warns(UneditableBatchWarning, match=r"meta.y \(a tensor of shape \(5,\)\) is held by a mappingproxy"):
        edit = apply_decision(batch, decision(), input_key="x")
    assert edit.not_applied == 2 and edit.weights_written and batch["x"] is x
    assert batch["sample_weight"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_aliases_stay_aliases():
    x = x5()
    batch = {"x": x, "again": x, "views": [x, x5() + 1]}
    apply_decision(batch, decision(), input_key="x")
    assert batch["x"] is batch["again"] is batch["views"][0]
    assert torch.equal(batch["x"], x[IDX])


def test_keep_all_leaves_the_batch_untouched():
    x = x5()
    batch = {"x": x}
    assert apply_decision(batch, decision([True] * 5), input_key="x").rows == 5
    assert batch["x"] is x


def test_tuple_batch_falls_back_to_zero_weights_in_its_dict():
    x = x5()
    batch = (x, {"y": torch.arange(5)})
    with pytest.warns(UneditableBatchWarning, match="tuple"):
        assert apply_decision(batch, decision(), input_key=0).rows == 5
    assert batch[0] is x
    assert batch[1]["sample_weight"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert batch[1]["y"].shape == (5,)  # no half edit: the dict's own rows stay with the tuple's


def test_tuple_and_tensor_batches_without_dict_train_unfiltered_with_one_warning():
    x = x5()
    with pytest.warns(UneditableBatchWarning, match="unfiltered"):
        assert apply_decision((x, torch.arange(5)), decision(), input_key=0).rows == 5
    with pytest.warns(UneditableBatchWarning, match="Tensor") as record:
        edit = apply_decision(x, decision(), input_key=0)
    assert FIX in str(record[0].message)
    assert edit == BatchEdit(5, 0, 2, False, edit.reason) and "bare Tensor batch" in edit.reason
    assert x.shape == (5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_decision((x, torch.arange(5)), decision(), input_key=0)  # warned once already


def test_object_batches_are_not_looked_into():
    Batch = types.SimpleNamespace
    batch = Batch(x=x5(), y=torch.arange(5))
    with pytest.warns(UneditableBatchWarning, match="SimpleNamespace batch cannot be edited"):
        assert apply_decision(batch, decision(), input_key="x").not_applied == 2
    assert batch.x.shape == (5, 3)


def test_reweight_writes_weights_into_dict_batches_only():
    w = [1.0, 0.2, 0.0, 1.0, 0.5]
    batch = {"x": x5()}
    assert apply_decision(batch, decision([True] * 5, w), input_key="x", weight_key="w", mode="reweight").rows == 5
    assert batch["w"].tolist() == pytest.approx(w) and batch["w"].dtype == torch.float32
    assert batch["x"].shape == (5, 3)
    listed = [x5(), {"meta": 1}]
    apply_decision(listed, decision([True] * 5, w), input_key=0, mode="reweight")
    assert listed[1]["sample_weight"].tolist() == pytest.approx(w)
    with pytest.warns(UneditableBatchWarning, match="weights") as record:
        edit = apply_decision([x5(), torch.arange(5)], decision([True] * 5, w), input_key=0, mode="reweight")
    assert record[0].filename == __file__
    assert edit == BatchEdit(5, 0, 0, False, edit.reason) and "collate_fn" in edit.reason


def test_reweight_goes_to_the_top_level_dict_not_into_views():
    batch = spt_batch()
    w = [1.0, 0.2, 0.0, 1.0, 0.5]
    edit = apply_decision(batch, decision([True] * 5, w), input_key="views.0.image", mode="reweight")
    assert edit.weights_written and batch["sample_weight"].tolist() == pytest.approx(w)
    assert all("sample_weight" not in view for view in batch["views"])


def test_drop_with_batch_weight_writes_the_kept_rows_weights():
    batch = {"x": x5()}
    assert apply_decision(batch, decision(batch_weight=0.0), input_key="x") == BatchEdit(3, 2, 0, True, None)
    assert batch["x"].shape == (3, 3) and batch["sample_weight"].tolist() == [0.0, 0.0, 0.0]


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        apply_decision({"x": x5()}, decision(), input_key="x", mode=None)
    with pytest.raises(ValueError, match="4 rows"):
        apply_decision({"x": x5()}, decision(KEEP[:4]), input_key="x")
    with pytest.raises(ValueError, match="4 rows"):
        apply_decision(spt_batch(), decision(KEEP[:4]), input_key="views.1.image")
    with pytest.raises(ValueError, match="never be emptied"):
        apply_decision({"x": x5()}, decision([False] * 5), input_key="x")
