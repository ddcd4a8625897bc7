"""Soak: a long monitored and curated run at a dense cadence (marked slow; `python -m pytest -m slow`).

What must hold over thousands of steps: memory does not grow with the number of evaluations, no
measurement fails, every evaluation is exported, no batch reaches training_step empty, and the
model's parameters are only changed by its own optimizer (the monitor never calls backward).
"""

import resource
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor
from jepa_monitor.export import read_scores
from jepa_monitor.policies import Drop

D, K = 16, 4


class Stream(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, D, generator=g)
        self.x[::10] += 8.0  # 10% junk, far off the data

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "id": i}


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, K))
        self.smallest_batch = None

    def training_step(self, batch, batch_idx):
        n = batch["x"].shape[0]
        self.smallest_batch = n if self.smallest_batch is None else min(self.smallest_batch, n)
        z = self.encoder(batch["x"])
        return (z - z.mean(0)).pow(2).mean() + (1 - z.std(0)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_long_dense_run_is_stable(tmp_path):
    steps, every, incoming_every = 3000, 50, 5
    monitor = JEPAScoreMonitor(
        encoder="encoder", heldout=torch.randn(128, D, generator=torch.Generator().manual_seed(1)),
        input_key="x", id_key="id", cadence=Cadence(every_n_batches=every, incoming_every_n_batches=incoming_every), policy=Drop(quantile=0.05, warmup=0), max_failures=1,
    )
    model = Module()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[monitor])
    rss = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step % 500 == 0:
                rss.append(_rss_mib())

    trainer.callbacks.append(Probe())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(Stream(64 * 100, seed=0), batch_size=64))
    failures = [str(w.message) for w in caught if "skipped" in str(w.message) or "DISABLED" in str(w.message)]
    assert not failures, failures
    rows = read_scores(monitor.export_file)
    heldout_evals = (rows["split"] == "heldout").sum() / 128
    assert heldout_evals == 1 + steps // every
    assert model.smallest_batch >= 1
    # after warm-up, resident memory stays flat while 60 more evaluations happen
    assert rss[-1] - rss[1] < 64, rss
    curated = np.isfinite(rows["kept"].astype(float))
    assert curated.sum() > 0
    print(f"soak: {steps} steps, {int(heldout_evals)} held-out evaluations, max RSS every 500 steps "
          f"{[round(r) for r in rss]} MiB, {int((rows['kept'][curated] == 0).sum())} rows dropped")
