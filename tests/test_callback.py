"""JEPAScoreMonitor on tiny CPU runs: what it logs, and that it never changes the training run."""

import math
from dataclasses import replace
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jepa_monitor import score_samples
from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor, Outputs
from jepa_monitor.export import read_scores
from jepa_monitor.reading import cross_fitted_log_prior, fit_reading

D, K = 6, 3


class DictData(Dataset):
    """Dict samples with an id; noise augmentation from the global RNG (as torchvision transforms
    do), so any extra draw from the global RNG changes the training data."""

    def __init__(self, n=48, seed=0, augment=True, image=False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 2, 3, generator=g) if image else torch.randn(n, D, generator=g)
        self.augment = augment

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn_like(x)
        return {"x": x, "id": 1000 + i}


class TinyModule(pl.LightningModule):
    def __init__(self, dropout=0.2, image=False):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, K))
        self.head = nn.Linear(K, D)

    def training_step(self, batch, batch_idx):
        x = batch["x"].flatten(1)
        return ((self.head(self.encoder(x)) - x) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        x = batch["x"].flatten(1)
        return ((self.head(self.encoder(x)) - x) ** 2).mean()

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def heldout_loader(n=20, image=False):
    return DataLoader(DictData(n, seed=1, augment=False, image=image), batch_size=7, shuffle=True)


def train_loader(n=48, image=False):
    return DataLoader(DictData(n, seed=0, image=image), batch_size=8, shuffle=True)


def trainer(tmp_path, callbacks=(), logger=False, **kw):
    opts = dict(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, logger=logger,
                default_root_dir=str(tmp_path), callbacks=list(callbacks))
    opts.update(kw)
    return pl.Trainer(**opts)


#: The cadence of ``monitor()``: a held-out evaluation every 2 batches, 5 incoming rows every batch.
BASE_CADENCE = Cadence(every_n_batches=2, incoming_every_n_batches=1, incoming_rows=5)


def monitor(**kw):
    opts = dict(encoder="encoder", heldout=heldout_loader(), input_key="x", id_key="id", cadence=BASE_CADENCE)
    opts.update(kw)
    return JEPAScoreMonitor(**opts)


def tb_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "images": 0, "tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def csv_metrics(logger):
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as fh:
        return list(csv.DictReader(fh))


def direct_scores(module, x):
    return score_samples(module.encoder, x)


def test_reference_scalars_and_export_match_direct_scoring(tmp_path):
    pl.seed_everything(0)
    model = TinyModule()
    held = DictData(20, seed=1, augment=False)
    ref = direct_scores(model, held.x)  # the untrained model, exactly what fit start sees
    cb = monitor(heldout=held.x, cadence=replace(BASE_CADENCE, incoming_every_n_batches=None, every_n_batches=100), reading="isotropic")
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], logger=logger).fit(model, train_loader())
    for c in ("jepa_score", "log_prior", "log_density"):
        torch.testing.assert_close(cb.reference[c], getattr(ref, c), rtol=0, atol=0)
    assert (cb.reference["jepa_score"] != 0).all()
    row0 = next(r for r in csv_metrics(logger) if r.get("jepa/heldout/log_density/mean"))
    ld = ref.log_density.double().numpy()
    assert float(row0["jepa/heldout/log_density/mean"]) == pytest.approx(ld.mean(), rel=1e-6)
    assert float(row0["jepa/heldout/log_density/std"]) == pytest.approx(ld.std(ddof=1), rel=1e-6)
    assert float(row0["jepa/heldout/log_density/p5"]) == pytest.approx(np.quantile(ld, 0.05), rel=1e-6)
    assert float(row0["jepa/heldout/log_density/drift_ks"]) == 0.0
    assert float(row0["jepa/heldout/num_samples"]) == 20
    # No logger with a SummaryWriter: the export goes to the trainer's default_root_dir.
    assert cb.export_file == str(tmp_path / "jepa_monitor" / "jepa.csv")
    out = read_scores(cb.export_file)
    first = out["split"] == "heldout"
    np.testing.assert_array_equal(out["sample_id"][first][:20], [str(i) for i in range(20)])
    np.testing.assert_array_equal(out["jepa_score"][first][:20], ref.jepa_score.double().numpy())
    np.testing.assert_array_equal(out["n_floored"][first][:20], ref.n_floored.numpy())


def test_fitted_reading_reads_heldout_rows_cross_fitted_and_incoming_rows_through_the_fit(tmp_path):
    """The default reading: held-out rows get log N(z; μ, Σ) of a Gaussian fitted without their fold,
    incoming rows the Gaussian fitted on every held-out row; jepa_score is the plain score."""
    pl.seed_everything(0)
    model = TinyModule()
    held = DictData(20, seed=1, augment=False)
    ref = direct_scores(model, held.x)
    cb = monitor(heldout=held.x, cadence=replace(BASE_CADENCE, incoming_every_n_batches=None, every_n_batches=100))
    trainer(tmp_path, [cb], max_steps=1).fit(model, train_loader())
    prior = cross_fitted_log_prior(ref.embedding, 20).float()
    torch.testing.assert_close(cb.reference["jepa_score"], ref.jepa_score, rtol=0, atol=0)
    torch.testing.assert_close(cb.reference["log_prior"], prior, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cb.reference["log_density"], (ref.jepa_score.double() + prior.double()).float(),
                               rtol=1e-6, atol=1e-5)
    fitted = fit_reading(ref.embedding)
    scorer = cb.scorer(model)
    x = DictData(6, seed=3, augment=False).x
    torch.testing.assert_close(scorer.score(x).log_prior.double(), fitted.log_prob(scorer.embed(x)),
                               rtol=1e-6, atol=1e-5)


def test_zero_observer_effect_bitwise(tmp_path):
    """Dropout, shuffling and a global-RNG augmentation: any RNG draw, mode change or gradient
    left behind by the monitor would change the final weights."""

    def run(with_monitor, sub):
        pl.seed_everything(123)
        model = TinyModule(dropout=0.3)
        cbs = [monitor(cadence=replace(BASE_CADENCE, every_n_batches=2, incoming_every_n_batches=1))] if with_monitor else []
        logger = TensorBoardLogger(tmp_path / sub, name="tb")
        trainer(tmp_path / sub, cbs, logger=logger, max_epochs=2, accumulate_grad_batches=2).fit(model, train_loader())
        return model.state_dict(), cbs

    plain, _ = run(False, "a")
    watched, cbs = run(True, "b")
    assert len(cbs[0].history) >= 10  # it really measured, many times
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_gradient_accumulation_uses_own_batch_counter(tmp_path):
    cb = monitor(cadence=replace(BASE_CADENCE, every_n_batches=2, incoming_every_n_batches=3))
    trainer(tmp_path, [cb], accumulate_grad_batches=3).fit(TinyModule(), train_loader())
    held = [(h["batch"], h["step"]) for h in cb.history if h["split"] == "heldout"]
    # 6 batches, an optimizer step every 3: evaluations follow batches, not optimizer steps
    assert held == [(0, 0), (2, 0), (4, 1), (6, 2)]
    assert [h["batch"] for h in cb.history if h["split"] == "incoming"] == [0, 3]


def test_bf16_mixed_scores_in_full_precision(tmp_path):
    pl.seed_everything(0)
    model = TinyModule()
    held = DictData(12, seed=1, augment=False).x
    ref = direct_scores(model, held)
    cb = monitor(heldout=held, cadence=replace(BASE_CADENCE, incoming_every_n_batches=2))
    trainer(tmp_path, [cb], precision="bf16-mixed").fit(model, train_loader())
    torch.testing.assert_close(cb.reference["jepa_score"], ref.jepa_score, rtol=0, atol=0)
    incoming = [h for h in cb.history if h["split"] == "incoming"]
    assert incoming and all(math.isfinite(h["mean"]) for h in incoming)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_under_inference_mode(tmp_path, stage):
    pl.seed_everything(0)
    model = TinyModule()
    held = DictData(10, seed=1, augment=False)
    expected = direct_scores(model, held.x).jepa_score
    cb = monitor(heldout=held.x)
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(tmp_path, [cb], logger=logger)
    assert t.validate_loop.inference_mode and t.test_loop.inference_mode
    getattr(t, stage)(model, DataLoader(DictData(8, seed=2, augment=False), batch_size=4))
    assert cb.export_file == f"{logger.log_dir}/jepa_monitor/jepa.csv"  # the TensorBoard logger's dir
    out = read_scores(cb.export_file)
    assert (out["split"] == stage).sum() == 10
    np.testing.assert_array_equal(out["jepa_score"], expected.double().numpy())
    assert (out["jepa_score"] != 0).all()
    tags = tb_tags(logger.log_dir).Tags()
    assert f"jepa/hist/{stage}/jepa_score" in tags["histograms"]
    assert cb.history[-1]["split"] == stage and cb.reference is None


def test_no_logger_warns_once_and_still_exports(tmp_path):
    cb = monitor(cadence=replace(BASE_CADENCE, every_n_batches=2, incoming_every_n_batches=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], logger=False).fit(TinyModule(), train_loader())
    nolog = [w for w in caught if "has no logger" in str(w.message)]
    assert len(nolog) == 1
    out = read_scores(tmp_path / "jepa_monitor" / "jepa.csv")
    assert (out["split"] == "heldout").sum() == 20 * 4 and (out["split"] == "incoming").sum() == 5 * 6
    assert set(out["sample_id"][out["split"] == "incoming"]) <= {str(1000 + i) for i in range(48)}


def documented_keys(doc: str) -> set:
    """Every key the monitor's docstring lists, in its generic form: within a bullet, a backticked
    ``<name>/...`` key sets the prefix that the bare names after it (``std``, ``p1``, ...) extend."""
    import re

    keys, bullet = set(), ""
    for line in doc.splitlines() + ["    -"]:
        if line.startswith("    - ") or line.strip() == "-" or not line.strip():
            prefix = None
            for token in re.findall(r"``([^`]+)``", bullet):
                if token.startswith("<name>/"):
                    keys.add(token)
                    prefix = token.rsplit("/", 1)[0]
                elif prefix is not None and re.fullmatch(r"[a-z0-9_<>]+", token):
                    keys.add(f"{prefix}/{token}")
            bullet = line
        else:
            bullet += " " + line.strip()
    return keys


def generic_forms(key: str) -> set:
    """The documented spellings a logged key may have (``<split>``, ``<c>``, ``<counter>``, ...)."""
    from jepa_monitor.diagnostics import REPORT_KEYS
    from jepa_monitor.policies import COUNT_KEYS

    name, *rest = key.split("/")
    parts = ["<name>", *("<c>" if r in ("jepa_score", "log_prior", "log_density") else r for r in rest)]
    forms = {"/".join(parts)}
    if parts[1] in ("heldout", "incoming", "validate", "test"):
        forms.add("/".join(["<name>", "<split>", *parts[2:]]))
    if parts[1] == "policy" and parts[-1].endswith("_total") and parts[-1][:-6] in COUNT_KEYS:
        forms.add("<name>/policy/<counter>_total")
    if parts[1] == "trust" and len(parts) == 3 and parts[2] in REPORT_KEYS:
        forms.add("<name>/trust/<diagnostic>")
    if "_vs_" in parts[-1]:
        forms.add("/".join([*parts[:-1], "<a>_vs_<b>"]))
    return forms


def test_documented_keys_parser_is_strict():
    doc = JEPAScoreMonitor.__doc__
    keys = documented_keys(doc)
    assert "<name>/<split>/<c>/p95" in keys and "<name>/time/share" in keys
    assert not generic_forms("jepa/heldout/log_density/mean2") & keys  # a last word alone is not enough
    assert not generic_forms("jepa/time/mean") & keys


def test_csv_and_tensorboard_get_every_documented_key(tmp_path):
    from jepa_monitor.policies import Drop

    tb = TensorBoardLogger(tmp_path, name="tb")
    csvl = CSVLogger(tmp_path, name="csv")
    cb = monitor(heldout=heldout_loader(image=True), outputs=Outputs(num_images=3), policy=Drop(warmup=0))
    trainer(tmp_path, [cb], logger=[tb, csvl], log_every_n_steps=1).fit(TinyModule(image=True), train_loader(image=True))
    keys = {k for row in csv_metrics(csvl) for k, v in row.items() if v != "" and k != "step"}
    documented = documented_keys(JEPAScoreMonitor.__doc__)
    undocumented = sorted(k for k in keys if not generic_forms(k) & documented)
    assert not undocumented, undocumented
    assert {"jepa/policy/refresh_gap", "jepa/policy/stale_drop", "jepa/policy/rows_sketched_total"} <= keys
    comps = ("jepa_score", "log_prior", "log_density")
    stats = ("mean", "std", "p1", "p5", "p50", "p95")
    expected = {f"jepa/{s}/{c}/{st}" for s in ("heldout", "incoming") for c in comps for st in stats}
    expected |= {f"jepa/heldout/{c}/{d}_{m}" for c in comps for d in ("drift", "change") for m in ("ks", "w1")}
    expected |= {f"jepa/incoming/{c}/shift_{d}" for c in comps for d in ("ks", "w1")}
    expected |= {"jepa/incoming/data_shift_alert", "jepa/heldout/model_change_alert"}
    expected |= {f"jepa/{s}/{k}" for s in ("heldout", "incoming")
                 for k in ("floored_fraction", "num_samples", "nonfinite", "systematic_floored")}
    expected |= {"jepa/time/score_seconds", "jepa/time/total_score_seconds", "jepa/time/share",
                 "jepa/monitor/failures_total"}
    assert expected <= keys
    rows = [r for r in csv_metrics(csvl) if r.get("jepa/time/share")]
    share = [float(r["jepa/time/share"]) for r in rows]
    # The fit-start evaluation and the incoming rows scored with it are a burst outside the share:
    # the share logged at step 0 (inside that burst) is 0, then counts.
    assert [s for r, s in zip(rows, share) if r["step"] == "0"] and all(
        s == 0.0 for r, s in zip(rows, share) if r["step"] == "0")
    assert all(0 <= s < 1 for s in share) and share[-1] > 0
    fit_start = [float(r["jepa/time/fit_start_seconds"]) for r in rows]
    assert fit_start[-1] == pytest.approx(cb.clock.burst) and fit_start[-1] >= max(fit_start)
    assert cb.clock.burst >= cb.clock.evaluation["incoming"] > 0  # the incoming rows at batch 0 belong to it
    ea = tb_tags(tb.log_dir)
    tags = ea.Tags()
    assert {f"jepa/hist/{s}/{c}" for s in ("heldout", "incoming") for c in comps} <= set(tags["histograms"])
    assert {"jepa/images/heldout_lowest", "jepa/images/heldout_highest"} <= set(tags["images"])
    assert expected <= set(tags["scalars"])
    assert "custom_scalars__config__" in tags["tensors"]
    img = ea.Images("jepa/images/heldout_lowest")[0]
    assert (img.width, img.height) == (3 * (3 + 2) + 2, 2 + 2 * 2)


def test_two_instances_coexist(tmp_path):
    a = monitor(name="a", outputs=Outputs(components=("jepa_score",)))
    b = monitor(name="b", encoder=lambda m: m.encoder[:3], cadence=replace(BASE_CADENCE, every_n_batches=3))
    assert a.state_key != b.state_key
    csvl = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [a, b], logger=csvl, enable_checkpointing=True)
    t.fit(TinyModule(), train_loader())
    keys = {k for row in csv_metrics(csvl) for k in row}
    assert "a/heldout/jepa_score/mean" in keys and "a/heldout/log_density/mean" not in keys
    assert "b/heldout/log_density/mean" in keys
    ckpt = torch.load(t.checkpoint_callback.best_model_path, weights_only=False)
    assert {a.state_key, b.state_key} <= set(ckpt["callbacks"])
    assert ckpt["callbacks"][a.state_key]["batches"] == 6
    assert len(ckpt["callbacks"][b.state_key]["history"]) == len(b.history) != len(a.history)
    # A CSVLogger has no SummaryWriter: the exports go to the trainer's default_root_dir.
    assert (tmp_path / "jepa_monitor" / "a.csv").exists()
    assert (tmp_path / "jepa_monitor" / "b.csv").exists()


def test_resume_continues_the_same_series(tmp_path):
    """Reference, counters, drift history, the private row generator and the policy threshold come
    back from the checkpoint: the resumed run measures and curates exactly as the uninterrupted one."""
    from jepa_monitor.policies import Drop

    def make():
        pl.seed_everything(0)
        stream = DictData(48, augment=False)
        stream.x[::5] += 4.0  # some rows for the policy to drop
        cb = monitor(cadence=replace(BASE_CADENCE, every_n_batches=4, incoming_every_n_batches=3, incoming_rows=3), policy=Drop(quantile=0.1, warmup=0))
        return IdRecorder(), DataLoader(stream, batch_size=8), cb

    model, data, full = make()
    trainer(tmp_path / "full", [full], max_epochs=2).fit(model, data)
    full_seen = model.seen

    model, data, first = make()
    t = trainer(tmp_path / "first", [first], max_epochs=1, enable_checkpointing=True)
    t.fit(model, data)
    ckpt = t.checkpoint_callback.best_model_path
    first_seen = model.seen

    model, data, resumed = make()  # fresh weights and state: the checkpoint restores them
    trainer(tmp_path / "resumed", [resumed], max_epochs=2).fit(model, data, ckpt_path=ckpt)

    assert resumed.state_dict()["batches"] == full.state_dict()["batches"] == 12
    for c in full.reference:
        assert torch.equal(resumed.reference[c], full.reference[c])
    assert len(resumed.history) == len(full.history)
    for r, f in zip(resumed.history, full.history):
        assert (r["batch"], r["step"], r["split"]) == (f["batch"], f["step"], f["split"])
        assert r["mean"] == pytest.approx(f["mean"], rel=1e-6, abs=1e-6)
        ks = "shift_ks" if f["split"] == "incoming" else "drift_ks"
        assert (r[ks] is None) == (f[ks] is None)
        if f[ks] is not None:
            assert r[ks] == pytest.approx(f[ks], abs=1e-9)
    assert resumed.policy.threshold == pytest.approx(full.policy.threshold, rel=1e-6)
    assert len(full_seen) < 96  # the policy dropped rows ...
    assert first_seen + model.seen == full_seen  # ... and the same ones after the resume


def test_image_grid_layout():
    from jepa_monitor.callbacks._tensorboard import image_grid

    imgs = torch.stack([torch.full((1, 2, 3), float(v)) for v in range(3)])
    imgs[:, :, 0, 0] = -1.0  # min-max per image: the corner is 0, the rest 1 (or 0 for the constant)
    grid = image_grid(imgs, pad=1)
    assert grid.shape == (3, 4, 3 * 4 + 1)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 2] == 1 and grid[0, 0, 0] == 1
    assert torch.equal(grid[0], grid[2])


def test_heldout_from_a_saved_file(tmp_path):
    held = DictData(9, seed=1, augment=False)
    torch.save({"x": held.x, "id": torch.arange(9) + 50}, tmp_path / "held.pt")
    pl.seed_everything(0)
    model = TinyModule()
    expected = direct_scores(model, held.x).log_density
    cb = monitor(heldout=str(tmp_path / "held.pt"), cadence=replace(BASE_CADENCE, incoming_every_n_batches=None), reading="isotropic")
    trainer(tmp_path, [cb]).fit(model, train_loader())
    torch.testing.assert_close(cb.reference["log_density"], expected, rtol=0, atol=0)
    out = read_scores(cb.export_file)
    assert out["sample_id"][:9].tolist() == [str(50 + i) for i in range(9)]


def test_trust_diagnostics_logged_and_match_the_core(tmp_path):
    from jepa_monitor.diagnostics import REPORT_KEYS, gaussianity_report, trust_score

    pl.seed_everything(0)
    model = TinyModule()
    held = DictData(40, seed=1, augment=False).x
    ref = direct_scores(model, held)
    csvl = CSVLogger(tmp_path, name="csv")
    cb = monitor(heldout=held, cadence=replace(BASE_CADENCE, incoming_every_n_batches=None, every_n_batches=100))
    trainer(tmp_path, [cb], logger=csvl).fit(model, train_loader())
    row = next(r for r in csv_metrics(csvl) if r.get("jepa/trust/score"))
    report = gaussianity_report(ref.embedding)
    assert float(row["jepa/trust/score"]) == pytest.approx(trust_score(report, "fitted"), rel=1e-6)
    for key in REPORT_KEYS:
        assert float(row[f"jepa/trust/{key}"]) == pytest.approx(report[key], rel=1e-6, abs=1e-12), key
    assert "jepa/trust/agreement/jepa_score_vs_log_density" in row


class IdRecorder(TinyModule):
    def __init__(self):
        super().__init__(dropout=0.0)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["id"].tolist())
        return super().training_step(batch, batch_idx)


def test_policy_wiring_logs_and_exports_dropped_rows(tmp_path):
    from jepa_monitor.policies import Drop

    pl.seed_everything(0)
    stream = DictData(48, augment=False)
    stream.x[1::3] = stream.x[1::3] * 4 + 6  # a third of the rows far from the held-out data
    policy = Drop(quantile=0.05, warmup=0)  # the tiny encoder never reaches trust: opt out of the trust warm-up
    cb = monitor(policy=policy, cadence=replace(BASE_CADENCE, incoming_every_n_batches=None, every_n_batches=3))
    csvl = CSVLogger(tmp_path, name="csv")
    model = IdRecorder()
    trainer(tmp_path, [cb], logger=csvl, log_every_n_steps=1).fit(model, DataLoader(stream, batch_size=8))
    dropped = sorted(set(range(1000, 1048)) - set(model.seen))
    assert len(dropped) == policy.counts["rows_dropped"] > 0
    assert {i - 1000 for i in dropped} >= set(range(1, 48, 3))  # every shifted row is dropped
    out = read_scores(cb.export_file)
    gone = out["kept"] == 0
    assert sorted(int(i) for i in out["sample_id"][gone]) == dropped
    assert (out["weight"][gone] == 0).all() and (out["split"][gone] == "incoming").all()
    rows = csv_metrics(csvl)
    frac = [float(r["jepa/policy/fraction_dropped"]) for r in rows if r.get("jepa/policy/fraction_dropped")]
    assert len(frac) == 6 and sum(frac) * 8 == pytest.approx(len(dropped))
    last = [r for r in rows if r.get("jepa/policy/rows_dropped_total")][-1]
    assert float(last["jepa/policy/rows_dropped_total"]) == len(dropped)
    assert float(last["jepa/policy/rows_seen_total"]) == 48
    assert cb.state_dict()["policy"]["threshold"] == policy.threshold
