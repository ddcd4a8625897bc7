"""JEPAScoreMonitor + Drop on stable-pretraining's batch layout, with plain ``lightning.pytorch``.

    python examples/stable_pretraining_layout.py [--steps 60] [--logdir runs/stable_pretraining]

stable-pretraining (0.1.8) hands ``training_step`` dict batches whose augmented views sit in a list:

    {"views": [{"image": (B, 1, 8, 8), "label": (B,), "sample_idx": (B,)},   # view 1
               {"image": (B, 1, 8, 8), "label": (B,), "sample_idx": (B,)}]}  # view 2

This script builds exactly that layout from the digits shipped with jepa-monitor (a dataset whose
items are ``{"views": [view_dict, view_dict]}``, batched by the default collate) without importing
stable_pretraining, and attaches the monitor unchanged::

    JEPAScoreMonitor(encoder="backbone", heldout=<loader of the same layout>,
                     input_key="views.0.image", id_key="views.0.sample_idx",
                     policy=Drop(quantile=0.05, warmup=0))

Drop removes each low-density row from *every* view (image, label, sample_idx of both views), so
``training_step`` sees views that still line up row for row (it asserts so at every step).
Every ``JUNK_EVERY``-th image is stored unscaled (0..255 instead of 0..16, a classic data bug), so
there is something to drop. ``warmup=0`` acts from the first batch, on a barely trained encoder (the
default ``warmup="trust"`` waits until the scores read as a density).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jepa_monitor.callbacks import JEPAScoreMonitor
from jepa_monitor.demo.data import make_splits, normalise
from jepa_monitor.demo.model import lejepa_loss, sigreg_directions
from jepa_monitor.export import read_scores
from jepa_monitor.policies import Drop

JUNK_EVERY = 16  # images 0, 16, 32, ... of the training set are stored unscaled (0..255)


class MultiViewDigits(Dataset):
    """Items ``{"views": [{"image", "label", "sample_idx"}, ...]}``: stable-pretraining's per-sample layout.

    Each view is a random shift (up to one pixel) plus a little pixel noise, drawn from a private
    generator. ``junk`` marks the sample indices of the unscaled images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, n_views: int = 2,
                 junk_every: Optional[int] = None, seed: int = 0):
        raw = images.to(torch.float32)
        self.junk = torch.zeros(len(raw), dtype=torch.bool)
        if junk_every:
            self.junk[::junk_every] = True
            raw[self.junk] *= 255.0 / 16.0
        self.x, self.labels = normalise(raw), labels
        self.n_views, self.gen = n_views, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x)

    def view(self, i: int) -> torch.Tensor:
        x = self.x[i]
        dy, dx = torch.randint(-1, 2, (2,), generator=self.gen).tolist()
        return torch.roll(x, (dy, dx), dims=(1, 2)) + 0.1 * torch.randn(x.shape, generator=self.gen)

    def __getitem__(self, i: int) -> dict:
        return {"views": [{"image": self.view(i), "label": self.labels[i], "sample_idx": i}
                          for _ in range(self.n_views)]}


class TwoViewJEPA(pl.LightningModule):
    """A tiny JEPA-style model (a shared backbone on both views, view invariance + SIGReg), reading
    ``batch["views"]`` as a stable-pretraining module does.

    ``training_step`` records, per step, the sample ids it received and the row count of every
    per-sample field of every view (``self.steps``), so curation can be checked afterwards.
    """

    def __init__(self, embed_dim: int = 8, lr: float = 3e-3):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.GELU(),
            nn.Linear(32, embed_dim),
        )
        self.directions = torch.Generator().manual_seed(0)  # SIGReg's random projections
        self.lr = lr
        self.steps: List[Dict[str, object]] = []

    def training_step(self, batch, batch_idx):
        views = batch["views"]
        ids = views[0]["sample_idx"]
        self.steps.append({
            "ids": ids.tolist(),
            "rows": [int(v[k].shape[0]) for v in views for k in ("image", "label", "sample_idx")],
            "labels": [v["label"].tolist() for v in views],
            "view_ids": [v["sample_idx"].tolist() for v in views],
        })
        rows = self.steps[-1]["rows"]
        assert len(set(rows)) == 1 and all(torch.equal(v["sample_idx"], ids) for v in views), rows
        z1, z2 = self.backbone(views[0]["image"]), self.backbone(views[1]["image"])
        loss, _, _ = lejepa_loss(z1, z2, sigreg_directions(z1.shape[1], self.directions))
        self.log("train/loss", loss, batch_size=len(ids))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (batches of --batch-size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--logdir", default="runs/stable_pretraining")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    splits = make_splits(seed=0)
    train = MultiViewDigits(*splits.train, junk_every=JUNK_EVERY, seed=1)
    heldout = MultiViewDigits(*splits.reference, seed=2)  # clean, augmented like the training views

    monitor = JEPAScoreMonitor(
        encoder="backbone",
        heldout=DataLoader(heldout, batch_size=64),     # same layout as training batches
        input_key="views.0.image",                      # the first view's image
        id_key="views.0.sample_idx",                    # dataset indices in the export
        every_n_steps=5,
        incoming_every_n_steps=10,
        heldout_max_samples=64,
        policy=Drop(quantile=0.05, warmup=0),
    )
    logger = TensorBoardLogger(args.logdir, name="stable_pretraining")
    trainer = pl.Trainer(max_steps=args.steps, logger=logger, callbacks=[monitor], log_every_n_steps=5,
                         accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False)
    model = TwoViewJEPA()
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True))

    # The export has one row per dropped row (kept=0), ids included; an id can repeat across epochs.
    rows = read_scores(monitor.export_file)
    dropped_rows = [int(i) for i, k in zip(rows["sample_id"], rows["kept"]) if k == 0]
    trained_rows = [i for step in model.steps for i in step["ids"]]
    print(f"\n{'rows':<16}{'dropped':>8}{'trained':>8}")
    for kind, is_junk in (("unscaled images", True), ("clean digits", False)):
        print(f"{kind:<16}{sum(bool(train.junk[i]) == is_junk for i in dropped_rows):>8}"
              f"{sum(bool(train.junk[i]) == is_junk for i in trained_rows):>8}")
    dropped = sorted(set(dropped_rows))
    print(f"dropped sample_idx: {dropped[:16]}{' ...' if len(dropped) > 16 else ''}")
    counts = monitor.policy.counts
    print(f"policy counters: rows_dropped={counts['rows_dropped']}, rows_not_applied={counts['rows_not_applied']} "
          "(dropped by the policy but left in a batch that cannot be edited)")
    print(f"per-sample export: {monitor.export_file}\nTensorBoard run: {logger.log_dir}")
    return {"monitor": monitor, "model": model, "trainer": trainer, "logger": logger, "dataset": train,
            "dropped": dropped}


if __name__ == "__main__":
    main()
