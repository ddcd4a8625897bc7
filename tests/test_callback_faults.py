"""JEPAScoreMonitor never costs a training run: misconfiguration fails before the first step,
faults during the run become warnings and skipped measurements."""

import warnings
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from jepa_monitor import Scorer
from jepa_monitor.callbacks import Alerts, Cadence, JEPAScoreMonitor, Outputs
from test_callback import BASE_CADENCE, DictData, TinyModule, heldout_loader, monitor, train_loader, trainer


class CountingModule(TinyModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


class DictOut(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, x):
        return {"z": self.enc(x)}


def _int_heldout():
    return torch.randint(0, 5, (6, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(encoder="backbone.trunk"), r"encoder='backbone.trunk'.*no attribute 'backbone'.*\['encoder', 'head'\]"),
        (dict(encoder="encoder.trunk"), r"CountingModule.encoder has no attribute 'trunk'"),
        (dict(input_key="image"), r"input_key='image': 'image' is not a key of the batch \(keys: \['x', 'id'\]\)\. "
                                  r"Tensors in this batch: x \(7, 6\), id \(7,\)"),
        (dict(id_key="uid"), r"id_key='uid': 'uid' is not a key of the batch"),
        (dict(heldout=DataLoader(DictData(3), batch_size=4, drop_last=True)), r"heldout yielded no samples"),
        (dict(heldout=torch.empty(0, 6)), r"heldout yielded no samples|has no rows"),
        (dict(encoder=lambda m: DictOut(m.encoder)), r"returned a dict with keys \['z'\]; pass output=<key>"),
        (dict(heldout=_int_heldout()), r"dtype torch.int64, which cannot carry gradients.*input_module"),
    ],
)
def test_misconfiguration_fails_before_the_first_training_step(tmp_path, kwargs, match):
    model = CountingModule()
    cb = monitor(**kwargs)
    with pytest.raises(MisconfigurationException, match=match) as info:
        trainer(tmp_path, [cb]).fit(model, train_loader())
    assert "JEPAScoreMonitor(name='jepa')" in str(info.value)
    assert model.steps == 0


def test_training_batch_checked_before_its_step(tmp_path):
    """The held-out loader is fine, the training batch lacks the key."""
    model = CountingModule()
    cb = monitor(heldout=DictData(6, augment=False).x, input_key="x")
    loader = DataLoader([{"inp": torch.zeros(6)}] * 4, batch_size=2)
    with pytest.raises(MisconfigurationException, match=r"training batch.*input_key='x': 'x' is not a key of the batch \(keys: \['inp'\]\)"):
        trainer(tmp_path, [cb]).fit(model, loader)
    assert model.steps == 0


class Flaky(nn.Module):
    """Wraps the encoder; raises on chosen calls (counted over every scoring pass)."""

    def __init__(self, enc, fail_calls):
        super().__init__()
        self.enc = enc
        self.fail_calls = fail_calls
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("simulated fault inside the encoder")
        return self.enc(x)


def _flaky_monitor(fail_calls, **kw):
    box = {}

    def resolve(module):
        if "flaky" not in box:
            box["flaky"] = Flaky(module.encoder, fail_calls)
        return box["flaky"]

    # score one row per forward pass, so that one call = one measurement chunk
    return monitor(encoder=resolve, scorer=Scorer(batch_size=64), **kw), box


def test_fault_becomes_warning_and_training_continues(tmp_path):
    # held-out has 20 rows scored in one pass (batch_size=64): call 1 is the reference, then one
    # call per measurement. Fail the 3rd call only.
    cb, box = _flaky_monitor({3})
    model = CountingModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb]).fit(model, train_loader())
    faults = [str(w.message) for w in caught if "simulated fault" in str(w.message)]
    assert len(faults) == 1 and "measurement is skipped and training continues (1/3 in a row)" in faults[0]
    assert model.steps == 6 and not cb.disabled
    # 1 reference + 3 held-out + 6 incoming measurements, one of them skipped
    assert len(cb.history) == 1 + 3 + 6 - 1
    assert cb.state_dict()["failures"] == {"consecutive": 0, "total": 1, "disabled": False}


def test_repeated_faults_disable_the_monitor_loudly(tmp_path):
    cb, box = _flaky_monitor(set(range(2, 1000)), max_failures=3)
    model = CountingModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb]).fit(model, train_loader())
    msgs = [str(w.message) for w in caught]
    assert sum("simulated fault" in m and "in a row" in m for m in msgs) == 3
    assert sum("DISABLED after 3 consecutive scoring failures" in m for m in msgs) == 1
    assert cb.disabled and model.steps == 6
    assert box["flaky"].calls == 1 + 3  # nothing is scored once disabled
    assert cb.state_dict()["failures"]["disabled"]


def test_nonfinite_rows_are_counted_not_fatal(tmp_path):
    held = DictData(10, seed=1, augment=False).x.clone()
    held[3] = float("nan")
    cb = monitor(heldout=held, cadence=replace(BASE_CADENCE, incoming_every_n_batches=None))
    trainer(tmp_path, [cb]).fit(TinyModule(), train_loader())
    ref = cb.reference["log_density"]
    assert torch.isnan(ref[3]) and torch.isfinite(ref[torch.arange(10) != 3]).all()
    assert all(h["mean"] == h["mean"] for h in cb.history)  # finite summaries despite the NaN row


def test_data_shift_alert_on_shifted_incoming_data(tmp_path):
    pl.seed_everything(0)
    cb = monitor(cadence=replace(BASE_CADENCE, incoming_every_n_batches=1, incoming_rows=8), alerts=Alerts(threshold=0.5))
    shifted = DictData(48)
    shifted.x = shifted.x * 5 + 20  # far outside the held-out data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb]).fit(TinyModule(), DataLoader(shifted, batch_size=8))
    alerts = [str(w.message) for w in caught if "data shift alert" in str(w.message)]
    assert len(alerts) == 1  # raised when it turns on, not at every batch
    # Compared only where held-out scores of the same weights exist: batches 0, 2 and 4.
    compared = [h for h in cb.history if h["split"] == "incoming" and h["shift_ks"] is not None]
    assert [h["batch"] for h in compared] == [0, 2, 4] and all(h["shift_ks"] > 0.5 for h in compared)
    assert cb.state_dict()["tracker"]["alerts"]["data_shift"] is True


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="heldout"):
        JEPAScoreMonitor("encoder", None)
    with pytest.raises(TypeError, match="Scorer template without an encoder"):
        JEPAScoreMonitor("encoder", heldout_loader(), scorer=Scorer(torch.nn.Identity()))
    with pytest.raises(ValueError, match="reading= argument sets the prior"):
        JEPAScoreMonitor("encoder", heldout_loader(), scorer=Scorer(sketch=4))
    with pytest.raises(TypeError, match="cadence must be a jepa_monitor.callbacks.Cadence"):
        JEPAScoreMonitor("encoder", heldout_loader(), cadence={"every_n_batches": 2})
    with pytest.raises(ValueError, match="components"):
        JEPAScoreMonitor("encoder", heldout_loader(), outputs=Outputs(components=("score",)))
    with pytest.raises(ValueError, match="every_n_batches"):
        JEPAScoreMonitor("encoder", heldout_loader(), cadence=Cadence(every_n_batches=0))
    with pytest.raises(ValueError, match="export"):
        JEPAScoreMonitor("encoder", heldout_loader(), outputs=Outputs(export="xlsx"))


def test_policy_calibration_on_nonfinite_scores_does_not_raise():
    from jepa_monitor.callbacks import JEPAScoreMonitor
    from jepa_monitor.policies import Drop

    policy = Drop(warmup=0)
    mon = JEPAScoreMonitor("encoder", torch.zeros(4, 3), policy=policy)
    nan = torch.full((4,), float("nan"))
    with pytest.warns(UserWarning, match="calibration skipped"):
        mon._calibrate({"jepa_score": nan, "log_prior": nan, "log_density": nan}, trust=None)
    assert policy.threshold is None


def test_a_fault_while_reporting_is_a_warning_not_the_end_of_the_run(tmp_path, monkeypatch):
    # e.g. a full disk under the export: the measurement happened, writing it out failed
    from jepa_monitor.export import ScoreExporter

    def broken_write(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ScoreExporter, "write", broken_write)
    cb = monitor()
    model = CountingModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb]).fit(model, train_loader())
    msgs = [str(w.message) for w in caught if "No space left on device" in str(w.message)]
    assert model.steps == 6 and not cb.disabled
    # reference + 3 held-out + 6 incoming evaluations, each reported as failed, none fatal
    assert len(msgs) == 1 + 3 + 6 and all("training continues" in m for m in msgs)
    assert len(cb.history) == 1 + 3 + 6  # statistics were computed before the export failed


def test_policy_options_live_on_the_policy_and_a_user_policy_must_meet_the_protocol():
    from jepa_monitor.policies import Reweight

    with pytest.raises(TypeError, match="weight_key"):
        monitor(policy=Reweight(), weight_key="w")  # one place only: the policy
    with pytest.raises(TypeError, match="pass_share"):
        monitor(policy=Reweight(), pass_share=0.1)

    class Partial:
        mode, score_key, weight_key, counts = "drop", "log_density", "w", {}

        def decide_batch(self, *args, **kwargs):
            raise AssertionError

    with pytest.raises(TypeError, match="does not implement .*missing: pass_share, calibrate"):
        monitor(policy=Partial())


def test_curation_warns_once_when_most_rows_are_decided_from_an_estimate():
    from types import SimpleNamespace

    from jepa_monitor.callbacks._curation import Curation
    from jepa_monitor.metrics import MetricKeys
    from jepa_monitor.policies import Decision

    class Blind:
        mode, score_key, weight_key, pass_share = "drop", "log_density", "sample_weight", None
        counts = {}

        def decide_batch(self, scorer, x, step, trust, side=None, max_scored=None):
            n = x.shape[0]
            return Decision(torch.ones(n, dtype=torch.bool), torch.ones(n), torch.full((n,), float("nan")), 1.0, True,
                            n_scored=1, n_estimated=n - 1, n_gated=0)

    cur = Curation(Blind(), MetricKeys("jepa"), "tag", input_key="x", id_key=None, side_keys={},
                   max_failures=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in range(3):
            cur.curate(SimpleNamespace(), {"x": torch.zeros(8, 2)}, batch_index=b, step=b, trust=None, passes_per_row=2)
    msgs = [str(w.message) for w in caught if "from an estimate" in str(w.message)]
    assert len(msgs) == 1 and "decided 7 of 8 rows" in msgs[0] and "max_jacobian_rows" in msgs[0]


def test_a_checkpoint_of_the_previous_release_resumes():
    """tests/data/monitor_state_v2.pt: the state_dict of release 2's monitor (Drop(warmup=0), 6 batches
    of a 6 -> 4 MLP, every_n_batches=2), written by that release's code."""
    import os

    import lightning.pytorch as lpl
    from torch.utils.data import DataLoader

    from jepa_monitor.callbacks import JEPAScoreMonitor
    from jepa_monitor.policies import Drop

    old = torch.load(os.path.join(os.path.dirname(__file__), "data", "monitor_state_v2.pt"), weights_only=False)
    assert old["version"] == 2 and "prior" not in old and "pacer" not in old
    policy = Drop(warmup=0)
    held = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    cb = JEPAScoreMonitor("encoder", heldout=held, input_key="x", id_key="id", cadence=Cadence(every_n_batches=2),
                          outputs=Outputs(export=False), policy=policy)
    cb.load_state_dict(old)
    assert cb.state_dict()["batches"] == 6 and len(cb.history) == len(old["history"])
    for new, before in zip(cb.history, old["history"]):  # incoming entries' KS renamed shift_ks (version 4)
        ks = "shift_ks" if before["split"] == "incoming" else "drift_ks"
        assert new[ks] == before["drift_ks"] and new["mean"] == before["mean"] and new["batch"] == before["batch"]
    assert policy.threshold == old["policy"]["threshold"] and policy.counts["rows_seen"] == old["policy"]["counts"]["rows_seen"]
    assert policy.counts["rows_sketched"] == 0 and policy.sketch_level is None

    class M(lpl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

        def training_step(self, batch, i):
            return self.encoder(batch["x"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(2)
    data = [{"x": torch.randn(16, 6, generator=g), "id": torch.arange(16)} for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lpl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[cb]).fit(M(), DataLoader(data, batch_size=None))
    assert cb.state_dict()["batches"] == 10 and cb.failures.total == 0 and policy.counts["rows_seen"] > old["policy"]["counts"]["rows_seen"]
    assert cb.state_dict()["version"] == 4
    with pytest.raises(ValueError, match="version 5 cannot be read"):
        cb.load_state_dict(dict(cb.state_dict(), version=5))
