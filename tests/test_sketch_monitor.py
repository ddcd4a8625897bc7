"""A K > 64 encoder inside the monitor: the policy's rows are sketched, the sketch's level is fitted on
the reference at each held-out evaluation and moved with it at each refresh, and pacing counts the
sketch's passes."""

import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from jepa_monitor.callbacks import JEPAScoreMonitor, Outputs
from jepa_monitor.policies import Drop

D, K = 32, 80


class Wide(pl.LightningModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(D, 96), nn.Tanh(), nn.Linear(96, K))
        with torch.no_grad():
            for p in self.encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def training_step(self, batch, i):
        return self.encoder(batch["x"]).pow(2).mean() * 1e-3

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def test_sketched_rows_inside_the_monitor(tmp_path):
    g = torch.Generator().manual_seed(1)
    heldout = torch.randn(4 * K, D, generator=g)
    stream = [{"x": torch.cat([torch.randn(28, D, generator=g), 6 * torch.randn(4, D, generator=g)]),
               "id": torch.arange(32) + 32 * i} for i in range(12)]
    policy = Drop(warmup=0, max_jacobian_rows=None, pass_share=None)  # every undecided row, sketched
    cb = JEPAScoreMonitor("encoder", heldout=heldout, input_key="x", id_key="id", policy=policy, outputs=Outputs(export=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path).fit(
            Wide(), DataLoader(stream, batch_size=None))
    assert cb.failures.total == 0 and cb.curation.failures.total == 0
    assert policy.sketch_dim == max(16, K // 8)
    a, b = policy.sketch_level
    assert a > 0  # the sketch ranks like the exact score on the reference
    c = policy.counts
    assert c["rows_sketched"] == c["rows_scored"] > 0
    refresh = cb.state_dict()["refresh"]  # the checkpointed state: refreshes moved both Jacobian columns
    assert refresh["count"] > 0 and set(refresh["columns"]) == {"jepa_score", "sketch_score"}
    dropped = c["rows_dropped"] / c["rows_seen"]
    assert 0 < dropped < 0.5
