"""The demo, as a script to copy: a small JEPA on digits with junk mixed in, monitored and curated.

Run: python examples/demo_digits.py   then: tensorboard --logdir jepa_monitor_demo
(`jepa-monitor demo` does the same plus an unfiltered run for comparison.)
"""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from jepa_monitor.callbacks import JEPAScoreMonitor
from jepa_monitor.demo.data import KINDS, DigitStream, make_splits, normalise
from jepa_monitor.demo.lit import DigitJEPA
from jepa_monitor.demo.run import dropped_by_kind, evaluate_auroc, evaluate_probe
from jepa_monitor.policies import Drop

STEPS, BATCH = 1000, 128

# Data: clean digits, 16 % junk (noise images, noisy / occluded / pixel-shuffled digits), and the
# digit 9 held out of training until half-way through the stream.
splits = make_splits(novel_class=9)
stream = DigitStream(splits, STEPS * BATCH, junk_fraction=0.16, arrival=0.5)
loader = DataLoader(stream, batch_size=BATCH, shuffle=False)  # the stream's order is its schedule

# The monitor scores held-out digits (its reference) and incoming batches with JEPA-SCORE, and the
# policy drops incoming rows whose log-density is below the held-out 5 % quantile.
monitor = JEPAScoreMonitor(
    encoder="encoder",  # attribute of the LightningModule whose output is scored
    heldout=normalise(splits.reference[0]),
    heldout_max_samples=len(splits.reference[0]),
    every_n_steps=STEPS // 10,
    incoming_every_n_steps=STEPS // 25,
    input_key="x",
    id_key="id",
    policy=Drop(quantile=0.05, warmup=STEPS // 5),  # no filtering before the encoder learned something
)

# DigitJEPA reads batch.get("sample_weight") so that Reweight() would work too (see its training_step).
model = DigitJEPA()
trainer = L.Trainer(
    max_steps=STEPS,
    callbacks=[monitor],
    logger=TensorBoardLogger("jepa_monitor_demo", name="example"),
    enable_checkpointing=False,
)
trainer.fit(model, loader)

# What did the policy keep away from training_step, by kind of row?
dropped = dropped_by_kind(stream, model.seen_ids, STEPS * BATCH)
for kind in KINDS:
    print(f"{kind:<12} dropped {dropped[kind]:6.1%}")

# How well does each score separate clean test digits from each kind of junk?
encoder = model.encoder.eval()
for kind, row in evaluate_auroc(encoder, splits, "cpu", seed=0).items():
    print(f"{kind:<12} AUROC " + "  ".join(f"{name} {v:.3f}" for name, v in row.items()))
print(f"linear probe accuracy on clean test digits: {evaluate_probe(encoder, splits, 'cpu'):.3f}")
print(f"per-sample scores: {trainer.log_dir}/jepa_monitor/jepa.csv  (jepa-monitor report {trainer.log_dir})")
torch.save(encoder.state_dict(), f"{trainer.log_dir}/encoder.pt")
