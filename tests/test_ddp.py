"""DDP on CPU (gloo, 2 processes): uneven shards are gathered, rank 0 writes, a fault on one rank
is skipped on all ranks, nothing hangs (the run has a hard timeout)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from jepa_monitor import score_samples
from jepa_monitor.export import read_scores

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from jepa_monitor.callbacks import JEPAScoreMonitor

    out_dir = sys.argv[1]

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = make_model()

        def training_step(self, batch, batch_idx):
            x, _ = batch
            return self.encoder(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class FailOnRank1(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc, self.calls = enc, 0

        def forward(self, x):
            self.calls += 1
            if int(os.environ.get("LOCAL_RANK", 0)) == 1 and self.calls == 3:
                raise RuntimeError("fault on rank 1 only")
            return self.enc(x)

    box = {}
    def encoder(module):
        box.setdefault("enc", FailOnRank1(module.encoder))
        return box["enc"]

    g = torch.Generator().manual_seed(1)
    heldout = torch.randn(11, 5, generator=g)          # 6 rows on rank 0, 5 on rank 1
    train = TensorDataset(torch.randn(14, 5, generator=g), torch.arange(14))
    cb = JEPAScoreMonitor(encoder, heldout, every_n_steps=2, input_key=0, id_key=1,
                          incoming_every_n_steps=1, incoming_max_rows=3, score_options={"batch_size": 64})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=out_dir, callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), DataLoader(train, batch_size=3))
    rank = trainer.global_rank
    faults = [str(w.message) for w in caught if "fault on rank 1 only" in str(w.message)
              or "failed on another rank" in str(w.message)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"reference": cb.reference["jepa_score"].tolist(), "history": cb.history,
                   "faults": faults, "export": cb.export_file, "batches": cb.state_dict()["batches"]}, fh)
    """
)


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    heldout = torch.randn(11, 5, generator=torch.Generator().manual_seed(1))
    expected = score_samples(enc, heldout).jepa_score
    # both ranks hold the full, gathered reference in held-out order
    np.testing.assert_allclose(r0["reference"], expected.numpy(), rtol=1e-6)
    assert r0["reference"] == r1["reference"]
    # 14 rows / 2 ranks / batch 3 -> 3 batches per rank (3, 3, 1 rows); held-out after batch 2;
    # the 3rd encoder call (incoming at batch 1) fails on rank 1 only and is skipped on both ranks.
    assert r0["batches"] == r1["batches"] == 3
    expected_history = [(0, "heldout"), (0, "incoming"), (2, "heldout"), (2, "incoming")]
    assert [(h["batch"], h["split"]) for h in r0["history"]] == expected_history
    assert r0["history"] == r1["history"]
    assert any("fault on rank 1 only" in f for f in r1["faults"])
    assert any("failed on another rank" in f for f in r0["faults"])
    # rank 0 alone wrote one export, with every rank's rows
    assert r1["export"] is None and r0["export"] is not None
    files = list((tmp_path / "jepa_monitor").iterdir())
    assert len(files) == 1
    out = read_scores(r0["export"])
    held = out["split"] == "heldout"
    assert held.sum() == 22
    np.testing.assert_array_equal(out["sample_id"][held][:11], [str(i) for i in range(11)])
    np.testing.assert_allclose(out["jepa_score"][held][:11], expected.numpy(), rtol=1e-6)
    incoming = out["split"] == "incoming"
    assert incoming.sum() == (3 + 3) + (1 + 1)  # batch 0: 3 rows per rank, batch 2: 1 row per rank
    assert len(set(out["sample_id"][incoming])) == 8
