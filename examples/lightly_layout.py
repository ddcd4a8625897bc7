"""JEPAScoreMonitor + Drop on lightly's batch layout, with ``pytorch_lightning`` (as lightly's examples).

    python examples/lightly_layout.py [--steps 60] [--logdir runs/lightly] [--collate default|multiview]

lightly (1.6.0) datasets yield ``(views, target, filename)`` per sample, ``views`` a list of augmented
view tensors. The default collate turns a batch of them into the *list*

    [views, targets, filenames]    # views: [(B, 1, 8, 8), (B, 1, 8, 8)], targets: (B,), filenames: B strings

and lightly's ``MultiViewCollate`` into the *tuple* ``(views, targets, filenames)``. This script builds
both from the digits shipped with jepa-monitor, without importing lightly, and attaches the monitor
unchanged::

    JEPAScoreMonitor(encoder="backbone", heldout=<loader of the same layout>,
                     input_key="0.0",      # or (0, 0): first view of the views list
                     id_key=2,             # the filenames
                     policy=Drop(quantile=0.05, warmup=0))

``--collate default``: Drop removes each low-density row from both views, the targets and the
filenames, in place. ``--collate multiview``: a top-level tuple holding a bare tensor (the targets)
cannot be edited from a callback (Lightning passes that same tuple on, and a tuple slot cannot be
rebound), so nothing is dropped: training sees every row, the monitor warns once and counts those rows
in ``<name>/policy/rows_not_applied_total``, and the export marks them ``kept=1``. Fix: collate to a
list or dict, or use ``Reweight`` with a dict batch.

Every ``JUNK_EVERY``-th image is stored unscaled (0..255 instead of 0..16, a classic data bug), so
there is something to drop. ``warmup=0`` acts from the first batch, on a barely trained encoder (the
default ``warmup="trust"`` waits until the scores read as a density).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor
from jepa_monitor.demo.data import make_splits, normalise
from jepa_monitor.demo.model import lejepa_loss, sigreg_directions
from jepa_monitor.export import read_scores
from jepa_monitor.policies import Drop

JUNK_EVERY = 16  # images 0, 16, 32, ... of the training set are stored unscaled (0..255)


class LightlyStyleDigits(Dataset):
    """Items ``(views, target, filename)`` as a lightly dataset with a multi-view transform yields them.

    Each view is a random shift (up to one pixel) plus a little pixel noise, from a private generator.
    ``junk`` marks the indices of the unscaled images.
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
        dy, dx = torch.randint(-1, 2, (2,), generator=self.gen).tolist()
        return torch.roll(self.x[i], (dy, dx), dims=(1, 2)) + 0.1 * torch.randn(self.x[i].shape, generator=self.gen)

    def __getitem__(self, i: int):
        return [self.view(i) for _ in range(self.n_views)], int(self.labels[i]), filename(i)


def filename(i: int) -> str:
    return f"digit_{i:04d}.png"


def multiview_collate(items):
    """lightly's ``MultiViewCollate``: the tuple ``(views, targets, filenames)``."""
    views, targets, names = zip(*items)
    return [torch.stack(v) for v in zip(*views)], torch.tensor(targets), list(names)


class TwoViewJEPA(pl.LightningModule):
    """A tiny JEPA-style model (a shared backbone on both views, view invariance + SIGReg), reading
    lightly's ``views, targets, filenames = batch``.

    ``training_step`` records, per step, the filenames it received and the row count of both views,
    the targets and the filenames (``self.steps``), so curation can be checked afterwards.
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
        views, targets, filenames = batch
        self.steps.append({
            "ids": list(filenames),
            "rows": [int(v.shape[0]) for v in views] + [int(targets.shape[0]), len(filenames)],
            "targets": targets.tolist(),
        })
        rows = self.steps[-1]["rows"]
        assert len(set(rows)) == 1, rows  # both views, the targets and the filenames line up
        z1, z2 = self.backbone(views[0]), self.backbone(views[1])
        loss, _, _ = lejepa_loss(z1, z2, sigreg_directions(z1.shape[1], self.directions))
        self.log("train/loss", loss, batch_size=len(filenames))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (batches of --batch-size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--logdir", default="runs/lightly")
    parser.add_argument("--collate", choices=("default", "multiview"), default="default",
                        help="default: [views, targets, filenames] (list); multiview: MultiViewCollate's tuple")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    splits = make_splits(seed=0)
    train = LightlyStyleDigits(*splits.train, junk_every=JUNK_EVERY, seed=1)
    heldout = LightlyStyleDigits(*splits.reference, seed=2)  # clean, augmented like the training views
    collate = default_collate if args.collate == "default" else multiview_collate

    monitor = JEPAScoreMonitor(
        encoder="backbone",
        heldout=DataLoader(heldout, batch_size=64, collate_fn=collate),  # same layout as training batches
        input_key="0.0",                    # batch[0][0]: the first view; (0, 0) is the same path
        id_key=2,                           # batch[2]: the filenames
        cadence=Cadence(every_n_batches=5, incoming_every_n_batches=10, heldout_rows=64),
        policy=Drop(quantile=0.05, warmup=0),
    )
    logger = TensorBoardLogger(args.logdir, name=f"lightly_{args.collate}")
    trainer = pl.Trainer(max_steps=args.steps, logger=logger, callbacks=[monitor], log_every_n_steps=5,
                         accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False)
    model = TwoViewJEPA()
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate))

    # The export has one row per dropped row (kept=0), filenames included; a file can repeat across epochs.
    rows = read_scores(monitor.export_file)
    dropped_rows = [str(i) for i, k in zip(rows["sample_id"], rows["kept"]) if k == 0]
    trained_rows = [name for step in model.steps for name in step["ids"]]
    junk = {filename(i) for i in train.junk.nonzero().reshape(-1).tolist()}
    print(f"\n{'rows':<16}{'dropped':>8}{'trained':>8}")
    for kind, is_junk in (("unscaled images", True), ("clean digits", False)):
        print(f"{kind:<16}{sum((n in junk) == is_junk for n in dropped_rows):>8}"
              f"{sum((n in junk) == is_junk for n in trained_rows):>8}")
    dropped = sorted(set(dropped_rows))
    print(f"dropped files: {', '.join(dropped[:6])}{' ...' if len(dropped) > 6 else ''}")
    counts = monitor.policy.counts
    print(f"policy counters: rows_dropped={counts['rows_dropped']}, rows_not_applied={counts['rows_not_applied']} "
          "(dropped by the policy but left in a batch that cannot be edited)")
    print(f"per-sample export: {monitor.export_file}\nTensorBoard run: {logger.log_dir}")
    return {"monitor": monitor, "model": model, "trainer": trainer, "logger": logger, "dataset": train,
            "dropped": dropped}


if __name__ == "__main__":
    main()
