"""Issue 17, item 4: a LeJEPA run written the way stable-pretraining writes it (multi-view dict batches,
SIGReg on the projector output, 10 % uniform-noise images), curated by ``Drop()`` at its defaults
through ``JEPAScoreMonitor`` at its defaults (only the layout keys given), keeps most junk out.

Both tests run ``examples/stable_pretraining_layout.py`` (seed 0, batches of 64, one intra-op thread)
and read the shares the example counts from what reached ``training_step`` and what the export says
was dropped: junk rows dropped / junk rows loaded, clean rows dropped / clean rows loaded.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stable_pretraining_layout.py"

# Tiny tensors: on a busy 2-core machine a second intra-op thread only spins (conftest.one_thread);
# the numbers below were measured with one thread (a second one changes float rounding, hence the run).
pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, steps):
    spec = importlib.util.spec_from_file_location("_example_stable_pretraining_lejepa", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = module.main(["--steps", str(steps), "--batch-size", "64", "--seed", "0", "--logdir", str(tmp_path)])
    counts = result["counts"]
    junk_total = counts["dropped"]["junk"] + counts["trained"]["junk"]
    clean_total = counts["dropped"]["clean"] + counts["trained"]["clean"]
    assert junk_total + clean_total == steps * 64  # every loaded row counted once: trained or dropped
    assert counts["dropped"]["junk"] + counts["dropped"]["clean"] == result["monitor"].policy.counts["rows_dropped"]
    assert result["monitor"].policy.counts["rows_not_applied"] == 0
    return result


def test_lejepa_run_keeps_noise_out_early(tmp_path):
    """150 batches (5-10 s): the policy acts from the first batch (trust passes at fit start) and the
    noise images are dropped far more often than clean digits, which lose little more than the
    policy's 5 % quantile."""
    result = run(tmp_path, 150)
    # measured (`OMP_NUM_THREADS=1 python examples/stable_pretraining_layout.py --steps 150`, seed 0):
    # junk 88.2 % (847/960), clean 2.9 % (250/8640), 30x the clean rate.
    assert result["junk_dropped"] >= 0.75, result["junk_dropped"]
    assert result["clean_dropped"] <= 0.15, result["clean_dropped"]
    assert result["junk_dropped"] >= 6 * result["clean_dropped"]
    assert result["first_drop"] is not None and result["first_drop"] < 10  # measured: batch 0


@pytest.mark.slow
def test_lejepa_run_1500_steps_keeps_most_junk_out(tmp_path):
    """The issue's configuration: 1500 batches of 64 (55-110 s on one thread on a shared 2-core machine)."""
    result = run(tmp_path, 1500)
    # measured (`OMP_NUM_THREADS=1 python examples/stable_pretraining_layout.py --seed S`): seed 0
    # junk 96.8 % (9322/9629), clean 2.9 % (2534/86371); seed 1: 96.6 % / 6.6 %; seed 2: 98.8 % / 5.5 %.
    assert result["junk_dropped"] >= 0.60, result["junk_dropped"]
    assert result["clean_dropped"] <= 0.10, result["clean_dropped"]
