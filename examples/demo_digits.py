"""The demo, as a script to copy: a small LeJEPA on digits with junk mixed in, monitored and curated.

    python examples/demo_digits.py [--steps 1000] [--batch-size 128] [--logdir jepa_monitor_demo]
    tensorboard --logdir jepa_monitor_demo

The monitor and the ``Drop`` policy run with the library's defaults (``jepa-monitor demo`` does the
same, plus an unfiltered run for comparison).
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from jepa_monitor.callbacks import JEPAScoreMonitor
from jepa_monitor.demo.data import KINDS, DigitStream, make_splits, normalise
from jepa_monitor.demo.lit import DigitJEPA
from jepa_monitor.demo.run import dropped_by_kind, evaluate_auroc, evaluate_probe
from jepa_monitor.policies import Drop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--logdir", default="jepa_monitor_demo")
    args = parser.parse_args(argv)
    steps, batch = args.steps, args.batch_size

    # Data: clean digits, 16 % junk (noise images, noisy / occluded / pixel-shuffled digits), and the
    # digit 9 held out of training until half-way through the stream.
    splits = make_splits(novel_class=9)
    stream = DigitStream(splits, steps * batch, junk_fraction=0.16, arrival=0.5)
    loader = DataLoader(stream, batch_size=batch, shuffle=False)  # the stream's order is its schedule

    # The monitor scores held-out digits (its reference) and incoming rows; the policy drops incoming
    # rows whose log_density is below the held-out 5 % quantile, once trust has passed.
    monitor = JEPAScoreMonitor(
        encoder="encoder",  # attribute of the LightningModule whose output SIGReg shapes
        heldout=normalise(splits.reference[0]),
        input_key="x",
        id_key="id",
        policy=Drop(),
    )
    model = DigitJEPA()  # its training_step reads batch.get("sample_weight"), so Reweight() works too
    trainer = L.Trainer(max_steps=steps, callbacks=[monitor], enable_checkpointing=False,
                        logger=TensorBoardLogger(args.logdir, name="example"), enable_progress_bar=False)
    trainer.fit(model, loader)

    # What did the policy keep away from training_step, by kind of row?
    dropped = dropped_by_kind(stream, model.seen_ids, steps * batch)
    for kind in KINDS:
        print(f"{kind:<12} dropped {dropped[kind]:6.1%}")
    # How well does each score separate clean test digits from each kind of junk?
    encoder = model.encoder.eval()
    auroc = evaluate_auroc(encoder, splits, "cpu", seed=0)
    for kind, row in auroc.items():
        print(f"{kind:<12} AUROC " + "  ".join(f"{name} {v:.3f}" for name, v in row.items()))
    probe = evaluate_probe(encoder, splits, "cpu")
    print(f"linear probe accuracy on clean test digits: {probe:.3f}")
    print(f"per-sample scores: {monitor.export_file}  (jepa-monitor report {trainer.log_dir})")
    torch.save(encoder.state_dict(), f"{trainer.log_dir}/encoder.pt")
    return {"dropped": dropped, "auroc": auroc, "probe": probe, "monitor": monitor}


if __name__ == "__main__":
    main()
