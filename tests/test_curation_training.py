"""Curation inside a real Lightning run: which rows reach ``training_step``.

The encoder is an exact density model, stated plainly: the data are x = A·sinh(ε), ε ~ N(0, I₈),
and the encoder is its inverse z = asinh(A⁻¹x), which maps the data onto N(0, I) exactly. So
``log_density`` equals the true log p(x) = log N(z) - ½Σ log(1 + (A⁻¹x)²) - log|det A|, computed
here in closed form as the independent reference. A known 10% of the stream is shifted far off the
data (by 8 in every coordinate of sinh(ε)).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor, Outputs
from jepa_monitor.export import read_scores
from jepa_monitor.policies import Drop, Reweight

D = 8
N_STREAM = 640
BATCH = 64
SHIFT = 8.0
JUNK_FRACTION = 0.1


class AsinhWhitener(nn.Module):
    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a_inv", torch.linalg.inv(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.asinh(x @ self.a_inv.T)


def true_log_density(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    a64 = a.double()
    y = x.double() @ torch.linalg.inv(a64).T
    z = torch.asinh(y)
    log_prior = -0.5 * z.pow(2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    return log_prior - 0.5 * torch.log1p(y * y).sum(1) - torch.linalg.slogdet(a64)[1]


def make_world(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
    a = q * torch.linspace(0.5, 2.0, D)  # well conditioned, anisotropic
    eps = torch.randn(N_STREAM + 256, D, generator=gen)
    u = torch.sinh(eps)
    junk = torch.zeros(N_STREAM + 256, dtype=torch.bool)
    junk[torch.randperm(N_STREAM, generator=gen)[: int(JUNK_FRACTION * N_STREAM)]] = True
    u[junk] += SHIFT
    x = (u @ a.T).float()
    return a, x[:N_STREAM], junk[:N_STREAM], x[N_STREAM:]


class Stream(Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "id": i}


class Recorder(pl.LightningModule):
    """Records the ids (and weights) of every row that reaches training_step; trains a linear head
    with the per-sample weighted loss a Reweight user writes."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.encoder = AsinhWhitener(a)
        self.head = nn.Linear(D, 1)
        self.seen_ids: list = []
        self.seen_weights: list = []
        self.batch_sizes: list = []

    def training_step(self, batch, batch_idx):
        self.seen_ids.append(batch["id"].clone())
        self.batch_sizes.append(batch["x"].shape[0])
        per_sample = (self.head(self.encoder(batch["x"])).squeeze(-1) - 1.0).pow(2)
        weight = batch.get("sample_weight")
        if weight is None:
            return per_sample.mean()
        self.seen_weights.append(weight.clone())
        return (weight * per_sample).sum() / weight.sum().clamp_min(1e-12)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=1e-3)


def run(policy, tmp_path, export=False, pass_share=None, reading="isotropic"):
    # pass_share=None and the isotropic reading (the encoder maps the data exactly onto N(0, I)):
    # the decisions below are checked against the exact density row by row; the pacing (which decides
    # some rows from an estimate) and the fitted reading (an estimate of N(0, I)) have their own test.
    a, x, junk, heldout = make_world()
    model = Recorder(a)
    policy.pass_share = pass_share
    monitor = JEPAScoreMonitor(
        encoder="encoder", heldout=heldout, cadence=Cadence(heldout_rows=256, every_n_batches=10_000, incoming_every_n_batches=None), outputs=Outputs(export=export, num_images=0), input_key="x", id_key="id", policy=policy, reading=reading,
    )
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(Stream(x), batch_size=BATCH, shuffle=False))
    return model, monitor, a, x, junk


def test_drop_keeps_shifted_rows_out_of_training_step(tmp_path):
    policy = Drop(quantile=0.05)  # the defaults: no action until trust passes (the encoder is exact)
    model, monitor, a, x, junk = run(policy, tmp_path, export="csv")
    assert policy.warmup == "trust" and monitor.trust >= 0.5 and policy.counts["calibrations_refused"] == 0
    seen = torch.zeros(N_STREAM, dtype=torch.bool)
    seen[torch.cat(model.seen_ids)] = True

    assert len(model.batch_sizes) == N_STREAM // BATCH and min(model.batch_sizes) >= 1
    assert (~seen[junk]).float().mean() >= 0.90
    assert seen[~junk].float().mean() >= 0.85
    # Every row reached training_step exactly when its true log-density is above the threshold
    # calibrated on the held-out reference (rows within float32 rounding of it excepted).
    truth = true_log_density(x, a)
    clear = (truth - policy.threshold).abs() > 1e-3
    assert torch.equal(seen[clear], (truth >= policy.threshold)[clear])
    assert policy.counts["rows_dropped"] == N_STREAM - int(seen.sum())
    assert monitor.state_dict()["policy"]["threshold"] == policy.threshold
    # The per-sample export names every dropped row.
    rows = read_scores(monitor.export_file)
    dropped = (rows["split"] == "incoming") & (rows["kept"] == 0)
    assert sorted(int(i) for i in rows["sample_id"][dropped]) == (~seen).nonzero().reshape(-1).tolist()


def test_paced_drop_still_keeps_shifted_rows_out(tmp_path):
    """The monitor's defaults: the fitted reading, and Jacobian rows per batch paced, the rest decided
    from the gate's estimate. The far-shifted rows are decided exactly by the gate (their prior alone
    puts them below the threshold), so pacing must not let them in; only rows near the threshold may
    differ from the exact density."""
    policy = Drop(quantile=0.05)
    model, monitor, a, x, junk = run(policy, tmp_path, pass_share=0.25, reading="fitted")
    pacer = monitor.curation.pacer
    assert pacer is not None and pacer.spent_total > 0  # it paid for refreshes (and any Jacobian rows)
    seen = torch.zeros(N_STREAM, dtype=torch.bool)
    seen[torch.cat(model.seen_ids)] = True
    assert (~seen[junk]).float().mean() >= 0.90
    assert seen[~junk].float().mean() >= 0.85
    truth = true_log_density(x, a)
    far = (truth - policy.threshold).abs() > 5.0  # 5 nats from the threshold: no estimate is that wrong
    assert far.sum() > N_STREAM // 2
    assert torch.equal(seen[far], (truth >= policy.threshold)[far])
    c = policy.counts
    assert c["rows_scored"] + c["rows_gated"] + c["rows_estimated"] == c["rows_seen"] - (c["batches"] - c["active_batches"]) * BATCH


def test_rows_scored_after_a_refresh_are_read_on_the_measured_reference_level(tmp_path):
    """The fitted reading unpaced: the reference is refreshed between evaluations and rows are scored
    with the Jacobian, so the reference's level is measured (at most once per refresh, only when rows
    are scored). The encoder is frozen: re-scored reference rows reproduce their evaluation's scores,
    the level does not move, and every decision clear of the threshold is the exact density's."""
    policy = Drop(quantile=0.05)
    model, monitor, a, x, junk = run(policy, tmp_path, reading="fitted")
    c, refresh = policy.counts, monitor.state_dict()["refresh"]
    assert refresh["last"] > 0 and c["rows_scored"] > 0
    assert 1 <= refresh["count"] <= c["active_batches"]
    assert abs(refresh["shift"]["jepa_score"]) < 1e-4  # float32 rounding of the same Jacobians
    seen = torch.zeros(N_STREAM, dtype=torch.bool)
    seen[torch.cat(model.seen_ids)] = True
    assert (~seen[junk]).float().mean() >= 0.90 and seen[~junk].float().mean() >= 0.85


def test_reweight_gives_shifted_rows_a_small_weight(tmp_path):
    model, monitor, a, x, junk = run(Reweight(), tmp_path)
    ids = torch.cat(model.seen_ids)
    weights = torch.cat(model.seen_weights)

    assert torch.equal(ids.sort().values, torch.arange(N_STREAM))  # reweighting never drops
    assert ((weights >= 0) & (weights <= 1)).all()
    w = torch.empty(N_STREAM)
    w[ids] = weights
    assert w[junk].mean() <= 0.2 * w[~junk].mean()
    assert w[~junk].median() == 1.0  # typical rows weigh exactly 1


@pytest.mark.parametrize("policy", [Drop(quantile=0.05, warmup=10_000)])
def test_no_filtering_before_warmup(policy, tmp_path):
    model, *_ = run(policy, tmp_path)
    assert torch.equal(torch.cat(model.seen_ids), torch.arange(N_STREAM))


def test_an_absolute_threshold_gets_its_reference_level_measured_at_every_refresh(tmp_path, monkeypatch):
    """An absolute threshold does not move with the reference, so the monitor measures the Jacobian
    level at every refresh and calibrates on the moved reference (``_refresh.py``, eager)."""
    refreshes = []
    original = JEPAScoreMonitor._refresh_reading

    def counted(self, pl_module):
        refreshes.append(self._batches)
        return original(self, pl_module)

    monkeypatch.setattr(JEPAScoreMonitor, "_refresh_reading", counted)
    a, _, _, heldout = make_world()
    threshold = float(true_log_density(heldout, a).quantile(0.05))
    policy = Drop(threshold=threshold)
    model, monitor, a, x, junk = run(policy, tmp_path, reading="fitted")
    refresh = monitor.state_dict()["refresh"]
    assert len(refreshes) >= 1 and refresh["count"] == len(refreshes) and refresh["level_due"] == []
    assert abs(refresh["shift"]["jepa_score"]) < 1e-4  # a frozen encoder: the level did not move
    assert policy.threshold == threshold
    seen = torch.zeros(N_STREAM, dtype=torch.bool)
    seen[torch.cat(model.seen_ids)] = True
    truth = true_log_density(x, a)
    far = (truth - threshold).abs() > 5.0
    assert far.sum() > N_STREAM // 2 and torch.equal(seen[far], (truth >= threshold)[far])
