"""A LeJEPA run written the way stable-pretraining writes it, curated by JEPAScoreMonitor + Drop().

    python examples/stable_pretraining_layout.py [--steps 1500] [--batch-size 64] [--logdir runs/stable_pretraining] [--seed 0]

stable-pretraining (0.1.8) hands ``training_step`` dict batches whose augmented views sit in a list:

    {"views": [{"image": (B, 1, 8, 8), "label": (B,), "sample_idx": (B,)},   # view 1
               {"image": (B, 1, 8, 8), "label": (B,), "sample_idx": (B,)}]}  # view 2

This script builds exactly that layout from the digits shipped with jepa-monitor (a dataset whose
items are ``{"views": [view_dict, view_dict]}``, batched by the default collate; each view is an
independent random augmentation of the image) without importing stable_pretraining. The model is
LeJEPA in stable-pretraining's shape: a small conv ``backbone``, an MLP ``projector``
(Linear-BatchNorm1d-ReLU-Linear, as ``spt.backbone.MLP``), and the loss
``(1 - λ)·invariance + λ·SIGReg`` (λ = 0.05) with both terms on the projector output: invariance
between the two views, SIGReg (Epps–Pulley over fresh random directions each step) on each view.

10 % of the training images (a fixed random subset, 90 of 898) are replaced by uniform-noise images,
every pixel uniform over the normalised pixel range, so there is something to drop. The monitor is
attached with every argument at its default except the batch layout::

    JEPAScoreMonitor(encoder=projector_output,  # module -> nn.Sequential(module.backbone, module.projector)
                     heldout=<loader of the same layout: unseen digits of all ten classes, augmented alike>,
                     input_key="views.0.image", id_key="views.0.sample_idx", policy=Drop())

``Drop()`` with its defaults waits until the trust indicator passes (``warmup="trust"``; here it
passes at the fit-start evaluation already, so curation starts with the first batch), then drops
rows below the held-out 5 % quantile of log_density, read through a Gaussian fitted to held-out
embeddings. It removes each dropped row from *every* view (image, label, sample_idx of both views),
so ``training_step`` sees views that still line up row for row (it asserts so at every step) and
records the ``sample_idx`` it received; the script then counts how many noise and clean rows
were dropped before reaching ``training_step`` and prints both shares, the trust indicator at the
end and the policy's counters.

The tensors are tiny: on a busy 2-core CPU, ``torch.set_num_threads(1)`` ran the 1500 steps in
55-110 s where two intra-op threads took about 950 s (tests/test_stable_pretraining_lejepa.py).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jepa_monitor.callbacks import JEPAScoreMonitor
from jepa_monitor.demo.data import PIXEL_MAX, make_splits, normalise
from jepa_monitor.demo.model import augment, lejepa_loss, sigreg_directions
from jepa_monitor.export import read_scores
from jepa_monitor.policies import Drop

JUNK_FRACTION = 0.10  # of the training images replaced by uniform-noise images
SIGREG_WEIGHT = 0.05  # λ of LeJEPA


class MultiViewDigits(Dataset):
    """Items ``{"views": [{"image", "label", "sample_idx"}, ...]}``: stable-pretraining's per-sample layout.

    Each view is :func:`jepa_monitor.demo.model.augment` of the image (a shift of up to one pixel,
    ±20 % contrast, a little pixel noise), drawn from a private generator. With ``junk_fraction``,
    that fraction of the images (a random subset) is replaced by uniform noise over the normalised
    pixel range; ``junk`` (bool, per sample_idx) marks them.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, n_views: int = 2,
                 junk_fraction: float = 0.0, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        raw = images.to(torch.float32)
        self.junk = torch.zeros(len(raw), dtype=torch.bool)
        self.junk[torch.randperm(len(raw), generator=gen)[:int(round(junk_fraction * len(raw)))]] = True
        raw[self.junk] = torch.rand(raw[self.junk].shape, generator=gen) * PIXEL_MAX  # uniform over 0..16
        self.x, self.labels = normalise(raw), labels
        self.n_views, self.gen = n_views, gen

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"views": [{"image": augment(self.x[i:i + 1], self.gen)[0], "label": self.labels[i], "sample_idx": i}
                          for _ in range(self.n_views)]}


class LeJEPA(pl.LightningModule):
    """LeJEPA as stable-pretraining composes it: ``backbone`` -> ``projector``, view invariance +
    SIGReg on the projector output, reading ``batch["views"]``.

    ``training_step`` records, per step, the sample ids it received and the row count of every
    per-sample field of every view (``self.steps``), so curation can be checked afterwards.
    """

    def __init__(self, *, feature_dim: int = 64, embed_dim: int = 16, lr: float = 3e-3,
                 sigreg_weight: float = SIGREG_WEIGHT, seed: int = 0):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 16, feature_dim),
        )
        self.projector = nn.Sequential(  # spt.backbone.MLP(feature_dim, [feature_dim], embed_dim)
            nn.Linear(feature_dim, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(),
            nn.Linear(feature_dim, embed_dim),
        )
        self.directions = torch.Generator().manual_seed(seed + 11)  # SIGReg's random projections
        self.lr, self.sigreg_weight = lr, sigreg_weight
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
        z1, z2 = (self.projector(self.backbone(v["image"])) for v in views[:2])
        loss, invariance, sigreg = lejepa_loss(z1, z2, sigreg_directions(z1.shape[1], self.directions),
                                               sigreg_weight=self.sigreg_weight)
        self.log_dict({"train/loss": loss, "train/invariance": invariance, "train/sigreg": sigreg},
                      batch_size=len(ids))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)


def projector_output(module: LeJEPA) -> nn.Module:
    """The monitored encoder: backbone then projector, the output SIGReg shapes (same parameters)."""
    return nn.Sequential(module.backbone, module.projector)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batches of --batch-size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--logdir", default="runs/stable_pretraining")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    splits = make_splits(seed=args.seed)
    train = MultiViewDigits(*splits.train, junk_fraction=JUNK_FRACTION, seed=args.seed + 1)
    # Held out: clean digits of all ten classes never trained on (probe + test splits), augmented
    # like the training views, so that incoming rows are compared like with like.
    heldout = MultiViewDigits(torch.cat([splits.probe[0], splits.test[0]]),
                              torch.cat([splits.probe[1], splits.test[1]]), seed=args.seed + 2)

    monitor = JEPAScoreMonitor(
        encoder=projector_output,                       # the projector output, which SIGReg shapes
        heldout=DataLoader(heldout, batch_size=256),    # same layout as training batches
        input_key="views.0.image",                      # the first view's image
        id_key="views.0.sample_idx",                    # dataset indices in the export
        policy=Drop(),
    )
    logger = TensorBoardLogger(args.logdir, name="stable_pretraining")
    trainer = pl.Trainer(max_steps=args.steps, logger=logger, callbacks=[monitor], log_every_n_steps=25,
                         accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False)
    model = LeJEPA(seed=args.seed)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True))
    seconds = time.perf_counter() - start

    # The export has one row per dropped row (kept=0), ids included; an id repeats across epochs.
    rows = read_scores(monitor.export_file)
    dropped_rows = [int(i) for i, k in zip(rows["sample_id"], rows["kept"]) if k == 0]
    trained_rows = [i for step in model.steps for i in step["ids"]]
    counts: Dict[str, Counter] = {"dropped": Counter(), "trained": Counter()}
    for what, ids in (("dropped", dropped_rows), ("trained", trained_rows)):
        counts[what].update("junk" if train.junk[i] else "clean" for i in ids)
    rates = {}
    print(f"\n{len(model.steps)} steps x {args.batch_size} rows in {seconds:.1f} s")
    print(f"{'rows':<22}{'dropped':>9}{'of':>8}{'share':>8}")
    for kind, name in (("junk", "uniform-noise images"), ("clean", "clean digits")):
        total = counts["dropped"][kind] + counts["trained"][kind]
        rates[kind] = counts["dropped"][kind] / max(total, 1)
        print(f"{name:<22}{counts['dropped'][kind]:>9}{total:>8}{rates[kind]:>8.1%}")
    first = next((b for b, step in enumerate(model.steps) if len(step["ids"]) < args.batch_size), None)
    trust = "unknown" if monitor.trust is None else f"{monitor.trust:.3f}"
    print(f"first batch with a dropped row: {first}; trust at the end: {trust}")
    policy_counts = {k: round(v, 1) if isinstance(v, float) else v for k, v in monitor.policy.counts.items()}
    print(f"policy counts: {policy_counts}")
    print(f"per-sample export: {monitor.export_file}\nTensorBoard run: {logger.log_dir}")
    return {"monitor": monitor, "model": model, "trainer": trainer, "logger": logger, "dataset": train,
            "dropped": sorted(set(dropped_rows)), "junk_dropped": rates["junk"], "clean_dropped": rates["clean"],
            "counts": counts, "first_drop": first, "seconds": seconds}


if __name__ == "__main__":
    main()
