"""The layout examples run end to end: stable-pretraining dict batches (lightning.pytorch), lightly's
list and tuple batches (pytorch_lightning), and what loggers without a SummaryWriter get."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from jepa_monitor.export import read_scores

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 12  # one epoch's worth of batches (no sample is loaded twice), a few seconds each
BATCH = 32


# Tiny tensors: on a busy 2-core machine a second intra-op thread only spins (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name, logdir, *extra):
    module = load_example(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trust / agreement warnings of a barely trained encoder
        result = module.main(["--steps", str(STEPS), "--batch-size", str(BATCH), "--logdir", str(logdir), *extra])
    return module, result


def tb_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "images": 0, "tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def curated_rows(export_file):
    rows = read_scores(export_file)
    curated = ~np.isnan(rows["kept"])
    return rows["sample_id"][curated], rows["kept"][curated], rows["weight"][curated], rows["split"][curated]


def check_consistent_drop(result, seen_ids, is_junk):
    """Training saw, at every step, equal row counts in every per-sample field; the rows missing from
    training are exactly the export's kept=0 rows; the injected junk is what was mostly dropped."""
    model, monitor = result["model"], result["monitor"]
    assert len(model.steps) == STEPS  # the run finished
    for step in model.steps:
        assert len(set(step["rows"])) == 1 and step["rows"][0] == len(step["ids"]), step["rows"]
        assert len(set(step["ids"])) == len(step["ids"])
    ids, kept, _, split = curated_rows(monitor.export_file)
    assert set(split) == {"incoming"}
    dropped = set(ids[kept == 0])
    assert dropped == {str(i) for i in result["dropped"]} and dropped  # something was dropped
    assert not dropped & seen_ids  # a dropped row never reached training_step
    assert len(seen_ids) + len(dropped) == STEPS * BATCH  # every loaded row is either seen or dropped
    assert monitor.policy.counts["rows_dropped"] == len(dropped)
    assert monitor.policy.counts["rows_not_applied"] == 0
    junk_seen = sum(map(is_junk, seen_ids))
    junk_dropped = sum(map(is_junk, dropped))
    assert junk_dropped > 0 and junk_dropped >= 2 * junk_seen, (junk_dropped, junk_seen)
    assert len(dropped) < 0.3 * STEPS * BATCH  # not everything else with it


# The LeJEPA example runs Drop() at its defaults (warm-up on trust), so it needs a few more batches than
# STEPS before its encoder puts the noise images below the clean ones: at 12 batches of 32 it dropped
# 8 of 29 noise rows, at 40 batches 104 of 133 (78 %) and 71 of 1147 clean rows (6.2 %), 2 s (one thread).
SP_STEPS = 40


@pytest.fixture(scope="module")
def stable_pretraining_run(tmp_path_factory):
    module = load_example("stable_pretraining_layout")
    logdir = tmp_path_factory.mktemp("sp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trust / agreement warnings of a barely trained encoder
        result = module.main(["--steps", str(SP_STEPS), "--batch-size", str(BATCH), "--logdir", str(logdir)])
    return module, result


@pytest.fixture(scope="module")
def lightly_run(tmp_path_factory):
    return run_example("lightly_layout", tmp_path_factory.mktemp("lightly"))


@pytest.fixture(scope="module")
def lightly_tuple_run(tmp_path_factory):
    return run_example("lightly_layout", tmp_path_factory.mktemp("lightly_tuple"), "--collate", "multiview")


def test_stable_pretraining_layout_drops_rows_from_every_view(stable_pretraining_run):
    """Training saw, at every step, both views with the same rows (ids, labels, row counts); every
    loaded row was either trained on or dropped, a dropped row never reached that step, and the export,
    the policy's counters and the example's own counts agree; the noise images are what was dropped."""
    module, result = stable_pretraining_run
    dataset, model, monitor = result["dataset"], result["model"], result["monitor"]
    assert len(model.steps) == SP_STEPS  # the run finished
    for step in model.steps:
        assert len(set(step["rows"])) == 1 and step["rows"][0] == len(step["ids"]), step["rows"]
        assert len(set(step["ids"])) == len(step["ids"])
        assert all(v == step["ids"] for v in step["view_ids"])  # both views kept the same rows
        truth = dataset.labels[torch.tensor(step["ids"])].tolist()
        assert all(labels == truth for labels in step["labels"])  # labels still line up with their ids
    ids, kept, _, split = curated_rows(monitor.export_file)
    assert set(split) == {"incoming"}
    rows = read_scores(monitor.export_file)
    incoming = rows["split"] == "incoming"
    dropped_at = {}  # training batch -> ids dropped from it (the export's step is the batch here)
    for step, i, k in zip(rows["step"][incoming], rows["sample_id"][incoming], rows["kept"][incoming]):
        if k == 0:
            dropped_at.setdefault(int(step), []).append(int(i))
    for b, step in enumerate(model.steps):
        assert not set(dropped_at.get(b, ())) & set(step["ids"])  # a dropped row never reached training_step
        assert len(step["ids"]) + len(dropped_at.get(b, ())) == BATCH  # every loaded row: trained or dropped
    n_dropped = sum(map(len, dropped_at.values()))
    assert n_dropped == (kept == 0).sum() == monitor.policy.counts["rows_dropped"] > 0
    assert monitor.policy.counts["rows_not_applied"] == 0
    assert sorted({i for v in dropped_at.values() for i in v}) == result["dropped"]
    counts = result["counts"]
    assert counts["dropped"]["junk"] + counts["dropped"]["clean"] == n_dropped
    assert sum(counts["trained"].values()) == sum(len(s["ids"]) for s in model.steps)
    # measured (40 x 32, one thread): noise 78 % dropped (104/133), clean digits 6.2 % (71/1147)
    assert result["junk_dropped"] >= 0.5 and result["clean_dropped"] <= 0.15, (result["junk_dropped"], result["clean_dropped"])
    assert result["junk_dropped"] >= 4 * result["clean_dropped"]
    assert type(result["trainer"]).__module__.startswith("lightning.pytorch")
    assert Path(monitor.export_file).parent.parent == Path(result["logger"].log_dir)


def test_lightly_layout_drops_rows_and_writes_tensorboard_under_pytorch_lightning(lightly_run):
    module, result = lightly_run
    dataset, model, logger = result["dataset"], result["model"], result["logger"]
    assert type(result["trainer"]).__module__.startswith("pytorch_lightning")
    assert type(logger).__module__.startswith("pytorch_lightning")
    for step in model.steps:
        index = torch.tensor([int(name[len("digit_"):-len(".png")]) for name in step["ids"]])
        assert step["targets"] == dataset.labels[index].tolist()  # targets still line up with filenames
    seen = {name for step in model.steps for name in step["ids"]}
    check_consistent_drop(result, seen, lambda name: bool(dataset.junk[int(name[len("digit_"):-len(".png")])]))
    assert Path(result["monitor"].export_file).parent.parent == Path(logger.log_dir)

    ea = tb_events(logger.log_dir)
    tags = ea.Tags()
    assert {"jepa/hist/heldout/log_density", "jepa/hist/incoming/log_density", "jepa/hist/policy/weight"} <= set(tags["histograms"])
    assert {"jepa/images/heldout_lowest", "jepa/images/heldout_highest"} <= set(tags["images"])
    assert "custom_scalars__config__" in tags["tensors"]
    image = ea.Images("jepa/images/heldout_lowest")[0]
    assert image.height == 8 + 2 * 2 and image.width == 8 * (8 + 2) + 2  # 8 images of 8x8, padded
    dropped = [e.value for e in ea.Scalars("jepa/policy/rows_dropped_total")]
    assert dropped[-1] > 0 and dropped == sorted(dropped)


def test_lightly_tuple_batch_with_a_bare_tensor_trains_every_row(lightly_tuple_run):
    """MultiViewCollate's (views_list, targets_tensor, filenames_list): the targets tensor sits in the
    tuple itself and cannot be rebound, so nothing is dropped and the monitor says so."""
    module, result = lightly_tuple_run
    model, monitor, logger = result["model"], result["monitor"], result["logger"]
    assert len(model.steps) == STEPS
    assert all(step["rows"] == [BATCH] * 4 for step in model.steps)  # training saw every row
    assert len({name for step in model.steps for name in step["ids"]}) == STEPS * BATCH
    ea = tb_events(logger.log_dir)
    not_applied = [e.value for e in ea.Scalars("jepa/policy/rows_not_applied_total")]
    assert not_applied[-1] > 0
    assert all(v == 0 for v in (e.value for e in ea.Scalars("jepa/policy/rows_dropped_total")))
    assert monitor.policy.counts["rows_dropped"] == 0
    assert monitor.policy.counts["rows_not_applied"] >= not_applied[-1]
    ids, kept, _, _ = curated_rows(monitor.export_file)
    assert len(kept) == monitor.policy.counts["rows_not_applied"] and (kept == 1).all()
    assert result["dropped"] == []


def test_not_applied_rows_are_exported_with_the_weight_training_used(lightly_tuple_run):
    _, result = lightly_tuple_run
    _, kept, weight, _ = curated_rows(result["monitor"].export_file)
    assert len(weight) and (weight == 1).all(), sorted(set(weight.tolist()))


# ------------------------------------------------------------------ loggers without a SummaryWriter
def test_loggers_without_a_summary_writer_are_warned_once_and_the_export_follows_the_writer(tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
    from torch import nn
    from torch.utils.data import DataLoader

    from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor

    class ScalarsOnly(Logger):
        """A minimal custom logger: scalars only, no experiment object."""

        def __init__(self):
            super().__init__()
            self.metrics = []

        @property
        def name(self):
            return "scalars_only"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            return self.encoder(batch["image"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 4, 4, generator=g), "id": i} for i in range(32)]

    def fit(loggers, root):
        monitor = JEPAScoreMonitor(encoder="encoder", heldout=torch.randn(24, 1, 4, 4, generator=g), input_key="image",
                                   id_key="id", cadence=Cadence(every_n_batches=2, incoming_every_n_batches=1, incoming_rows=4))
        trainer = L.Trainer(max_steps=4, logger=loggers, callbacks=[monitor], default_root_dir=str(root),
                            log_every_n_steps=1, accelerator="cpu", devices=1, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Tiny(), DataLoader(data, batch_size=8))
        return monitor, [str(w.message) for w in caught if "cannot take histograms" in str(w.message)]

    what = "cannot take histograms, images or a custom-scalars layout"
    csv, custom, tb = CSVLogger(tmp_path / "csv"), ScalarsOnly(), TensorBoardLogger(tmp_path / "tb")
    monitor, messages = fit([csv, custom, tb], tmp_path / "root")
    assert sum("CSVLogger" in m for m in messages) == 1 and sum("ScalarsOnly" in m for m in messages) == 1
    assert len(messages) == 2 and all(what in m for m in messages)
    assert not any("TensorBoardLogger" in m.split(" cannot ")[0] for m in messages)
    assert any("jepa/heldout/log_density/mean" in m for m in custom.metrics)  # scalars still arrive
    assert Path(monitor.export_file).parent.parent == Path(tb.log_dir)  # first logger with a writer
    tags = tb_events(tb.log_dir).Tags()
    assert "jepa/hist/heldout/log_density" in tags["histograms"] and "custom_scalars__config__" in tags["tensors"]

    # no logger with a SummaryWriter at all: the export falls back to default_root_dir
    monitor, messages = fit([CSVLogger(tmp_path / "csv2")], tmp_path / "root2")
    assert len(messages) == 1 and "CSVLogger" in messages[0]
    assert Path(monitor.export_file).parent.parent == tmp_path / "root2"
    assert math.isfinite(float(read_scores(monitor.export_file)["log_density"][0]))
