"""The trust indicator as the monitor computes it, at its default settings, on encoders of real
width (K = 256): one that maps its data exactly onto N(0, I) reads trusted; an L2-normalised and a
low-rank one read untrusted; too few held-out rows read unknown, never trusted."""

import csv
import math
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from jepa_monitor.callbacks import JEPAScoreMonitor, Outputs

K = 256


class Linear(nn.Module):
    def __init__(self, a_inv: torch.Tensor, kind: str):
        super().__init__()
        self.register_buffer("a_inv", a_inv)
        self.kind = kind

    def forward(self, x):
        z = x @ self.a_inv.T  # exactly N(0, I) for x = A·ε
        if self.kind == "l2":
            return nn.functional.normalize(z, dim=1)
        if self.kind == "low_rank":
            return torch.cat([z[:, : K // 4]] * 4, dim=1)  # rank K/4
        return z


class Module(pl.LightningModule):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def trust_at_fit_start(kind: str, heldout_rows: int, tmp_path, reading: str = "fitted") -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(K, K, generator=g) / math.sqrt(K) + torch.eye(K)
    x = torch.randn(heldout_rows, K, generator=g) @ a.T
    monitor = JEPAScoreMonitor("encoder", heldout=x, outputs=Outputs(export=False), reading=reading)  # the defaults otherwise
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=logger, enable_checkpointing=False, callbacks=[monitor],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(Linear(torch.linalg.inv(a), kind)), [x[:2]])
    logger.save()
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        embedded = {float(r["jepa/trust/n_samples"]) for r in csv.DictReader(f) if r.get("jepa/trust/n_samples")}
    assert embedded == {float(min(heldout_rows, 4 * K))}  # 4·K rows embedded for the diagnostics
    return monitor.trust


# Tiny tensors: on a busy 2-core machine a second intra-op thread only spins (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_gaussianizing_encoder_reads_trusted(tmp_path):
    assert trust_at_fit_start("gaussian", 4 * K, tmp_path) >= 0.9


@pytest.mark.parametrize("kind,reading", [("l2", "fitted"), ("l2", "isotropic"), ("low_rank", "isotropic")])
def test_l2_normalised_and_low_rank_encoders_read_untrusted(kind, reading, tmp_path):
    trust = trust_at_fit_start(kind, 4 * K, tmp_path, reading)
    assert not math.isnan(trust) and trust < 0.5


def test_low_rank_encoder_is_a_density_on_its_rank_under_the_fitted_reading(tmp_path):
    # The fitted Gaussian reads the directions no input moves as constants: the shape of the rest is
    # Gaussian, so the fitted reading is trusted (the rank deficiency is reported by systematic_floored).
    assert trust_at_fit_start("low_rank", 4 * K, tmp_path, "fitted") >= 0.5


def test_too_few_rows_read_unknown_not_trusted(tmp_path):
    # 200 rows for K = 256: nothing can be said (the old monitor read 0.998 here on a real encoder).
    assert math.isnan(trust_at_fit_start("l2", 200, tmp_path))
