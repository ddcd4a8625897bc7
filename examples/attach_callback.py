"""Attach JEPAScoreMonitor to a small LightningModule and look at what it wrote.

    python examples/attach_callback.py [--steps 200] [--logdir runs/attach]
    tensorboard --logdir runs/attach     # histograms, scalars, image grids, custom-scalars layout

The model is a tiny two-view (JEPA-style) encoder on 8x8 images. Rows 600-899 of the (unshuffled)
training stream are a shifted cluster: whenever it passes (batches ~37-56 of every 75-batch epoch)
the incoming rows scored there (batches 40, 50, 120, 130 and 190) differ from the held-out rows
scored with the same weights, which their KS statistic (``shift_ks``, the data-shift alert) shows.
With 16 incoming rows the KS statistic is coarse: a clean batch can pass the alert's 0.5 too.
"""

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor
from jepa_monitor.export import read_scores


class TwoView(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.GELU(), nn.Linear(32, 8)
        )

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        a, b = self.encoder(x + 0.1 * torch.randn_like(x)), self.encoder(x + 0.1 * torch.randn_like(x))
        loss = (a - b).pow(2).mean() + torch.relu(1 - torch.cat([a, b]).std(0)).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def dict_batches(x):
    """A dataset of dict samples {"image", "id"}: the monitor finds the input by key."""
    return [{"image": x[i], "id": i} for i in range(len(x))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/attach")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    stream = torch.randn(1200, 1, 8, 8, generator=g)
    stream[600:900] = 3 + 2 * stream[600:900]  # a shifted cluster, arriving mid-run (no shuffling)
    heldout = torch.randn(128, 1, 8, 8, generator=g)

    monitor = JEPAScoreMonitor(
        encoder="encoder",                 # dotted attribute path, or a callable module -> encoder
        heldout=DataLoader(dict_batches(heldout), batch_size=64),  # same batch layout as training
        cadence=Cadence(every_n_batches=10), # held-out evaluation cadence (default: spaced by a 5 % budget);
                                           # the training batch's rows are scored right after each one
        input_key="image", id_key="id",    # where the input and the ids sit in a training batch
    )
    logger = TensorBoardLogger(args.logdir, name="attach")
    trainer = pl.Trainer(max_steps=args.steps, logger=logger, callbacks=[monitor], log_every_n_steps=10,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         accelerator="cpu")
    trainer.fit(TwoView(), DataLoader(dict_batches(stream), batch_size=16, shuffle=False))

    print(f"\nTensorBoard run: {logger.log_dir}\nper-sample export: {monitor.export_file}")
    # KS: held-out against the fit-start reference; incoming against the latest held-out scores
    print(f"{'batch':>6} {'split':>9} {'mean log_density':>17} {'KS':>6}")
    for h in monitor.history:
        value = h["shift_ks"] if h["split"] == "incoming" else h["drift_ks"]
        ks = "-" if value is None else f"{value:.2f}"
        print(f"{h['batch']:>6} {h['split']:>9} {h['mean']:>17.2f} {ks:>6}")
    rows = read_scores(monitor.export_file)
    incoming = rows["split"] == "incoming"
    order = rows["log_density"][incoming].argsort()
    print("least probable incoming ids:", ", ".join(rows["sample_id"][incoming][order[:8]]))
    return {"monitor": monitor, "trainer": trainer, "rows": rows}


if __name__ == "__main__":
    main()
