"""A curated run is reproducible from its seed under any load: pacing and refreshes count passes,
they never time anything."""

import subprocess
import sys
import warnings

import torch

from jepa_monitor.demo.data import DigitStream, make_splits
from jepa_monitor.demo.run import DemoConfig, make_policy, train

STEPS, BATCH = 80, 64


def curated_run(tmp_path, name):
    torch.set_num_threads(1)
    config = DemoConfig(logdir=str(tmp_path / name), steps=STEPS, batch_size=BATCH, progress=False, threads=1)
    splits = make_splits(seed=0)
    stream = DigitStream(splits, STEPS * BATCH, seed=0)
    policy = make_policy(config.quantile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(config, splits, stream, device="cpu", policy=policy, version=name)
    monitor = next(c for c in run.module.trainer.callbacks if type(c).__name__ == "JEPAScoreMonitor")
    return run.module.seen_ids, dict(policy.counts), monitor.state_dict()["refresh"]


def test_the_same_seed_curates_the_same_rows_on_a_busy_machine(tmp_path):
    quiet_ids, quiet_counts, refresh = curated_run(tmp_path, "quiet")
    spin = "import time\nend = time.time() + 120\nwhile time.time() < end: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        busy_ids, busy_counts, _ = curated_run(tmp_path, "busy")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert quiet_counts["rows_dropped"] > 0 and quiet_counts["rows_scored"] + quiet_counts["rows_gated"] > 0
    assert quiet_counts == busy_counts
    # The reference was refreshed, and its Jacobian level measured only for rows scored with the
    # Jacobian (here none: the refreshes took the credit), never at the refreshes themselves.
    assert refresh["last"] > 0 and refresh["count"] <= quiet_counts["rows_scored"]
    assert len(quiet_ids) == len(busy_ids) == STEPS
    for a, b in zip(quiet_ids, busy_ids):
        assert torch.equal(a, b)
