"""When the monitor scores: the budget arithmetic on given numbers, and the monitor following its plan."""

import math
from dataclasses import replace

import pytest
import torch

from jepa_monitor.callbacks import Cadence
from jepa_monitor.export import read_scores
from jepa_monitor.callbacks._pacing import CurationPacer
from jepa_monitor.callbacks._schedule import MIN_HELDOUT_ROWS, MIN_INCOMING_ROWS, TARGET_GAP, WARMUP_BATCHES, Schedule
from test_callback import BASE_CADENCE, TinyModule, monitor, train_loader, trainer


def test_gap_keeps_evaluation_cost_within_the_budget():
    s = Schedule(Cadence())
    assert s.propose_gap(1.0) is None  # nothing counted yet
    for rows in (100, 300, 100, 120, 80):  # median training batch: 100 rows, 100 passes
        s.note_batch(rows, 0)
    # E / (budget * s) = 2000 / 5 = 400 batches: 2000 passes of evaluation per 40 000 of training = 5 %.
    assert s.propose_gap(2000) == 400
    assert s.propose_gap(2000) * 100 * 0.05 >= 2000
    assert s.propose_gap(1e-9) == 1


def test_evaluations_are_a_share_of_training_passes_curation_included():
    s = Schedule(Cadence(pass_share=0.2))
    for _ in range(WARMUP_BATCHES):
        s.note_batch(100, 20)  # curation (its own budget): 20 passes on every 100-row batch
    assert s.propose_gap(1000) == math.ceil(1000 / (0.2 * 120))


def test_early_evaluations_double_their_gap_up_to_the_plan():
    s = Schedule(Cadence())
    batch = 0
    seen = []
    for _ in range(6):
        s.plan(batch, 400, early=True)
        batch = s.next_heldout
        seen.append(batch)
    assert seen == [50, 100, 200, 400, 800, 1200]  # doubling while it is below the planned 400
    s.plan(0, 400)
    assert s.next_heldout == 400  # without a policy: the plan alone


def test_rows_shrink_before_the_gap_grows_past_the_target():
    s = Schedule(Cadence())
    assert s.propose_rows((2000, 128), (200, 16), (128, 16)) is None  # nothing counted yet
    for _ in range(WARMUP_BATCHES):
        s.note_batch(100, 0)  # room: 5 passes of evaluation per batch, 5000 per TARGET_GAP batches
    assert TARGET_GAP * 5 == 5000
    assert s.propose_rows((2000, 128), (200, 16), (128, 16)) == (128, 16)  # 2200 passes: within the target
    # 6050 passes at full rows: scaled by 5000 / 6050 (the cost at 64 held-out rows, per row)
    assert s.propose_rows((2750, 64), (550, 16), (128, 16)) == (int(128 * 5000 / 6050), int(16 * 5000 / 6050))
    assert s.propose_rows((20000, 128), (2000, 16), (128, 16)) == (MIN_HELDOUT_ROWS, MIN_INCOMING_ROWS)
    assert s.propose_rows((20000, 50), (2000, 4), (50, 4)) == (50, 4)  # maxima below the floors: kept
    assert s.propose_rows((8000, 128), (0, 0), (128, 16)) == (80, 10)  # no incoming evaluations: held-out alone


def test_monitor_scores_fewer_rows_when_evaluations_would_be_rare(tmp_path):
    from test_callback import heldout_loader

    torch.manual_seed(0)
    cb = monitor(cadence=replace(BASE_CADENCE, every_n_batches=None, pass_share=1e-6, incoming_every_n_batches="auto", incoming_rows=16), heldout=heldout_loader(n=200))
    trainer(tmp_path, [cb], max_epochs=2).fit(TinyModule(), train_loader())
    assert cb.schedule.rows == (MIN_HELDOUT_ROWS, MIN_INCOMING_ROWS)  # down from (128, 16)
    exported = read_scores(cb.export_file)
    first = (exported["split"] == "heldout") & (exported["step"] == 0)
    assert int(first.sum()) == 128  # the fit-start evaluation scored the configured rows
    state = cb.state_dict()["schedule"]
    assert tuple(state["rows"]) == cb.schedule.rows
    resumed = monitor(cadence=replace(BASE_CADENCE, every_n_batches=None, pass_share=1e-6))
    resumed.load_state_dict(cb.state_dict())
    assert resumed.schedule.rows == cb.schedule.rows


def _paced_run(pacer, batches, batch_rows=128, passes_per_row=16, max_jacobian_rows=16):
    """Simulated curation: every batch may score its undecided rows (at most max_jacobian_rows) within the
    pacer's cap; returns the rows of every batch."""
    rows = []
    for _ in range(batches):
        r = min(pacer.max_rows(batch_rows, passes_per_row), max_jacobian_rows)
        pacer.spent(batch_rows, r, passes_per_row)
        rows.append(r)
    return rows


def test_pacer_keeps_curation_within_its_share_of_the_training_batch():
    # The demo's shape: 128-row batches, K = 16 passes per Jacobian row, 0.2 of a batch's passes.
    pacer = CurationPacer(0.2)
    rows = _paced_run(pacer, 400)
    allowance = 0.2 * 128
    spent = 16 * sum(rows)
    assert spent <= allowance * 400 + 4 * allowance  # the share, and at most the burst beyond it
    assert spent >= allowance * 400 - 4 * allowance - 16  # ... and the allowance is used, not wasted
    assert pacer.spent_total == spent and pacer.earned_total == pytest.approx(allowance * 400)
    # Saving up: rows come in whole bursts of the credit (4 allowances: 6-7 rows), not 1-2 every batch.
    assert set(rows) == {0, 6, 7} and sum(r > 0 for r in rows) == pytest.approx(16 * sum(rows) / 16 / 6.4, abs=3)
    # Other curation work (a refresh) is paid from the same credit: the next rows wait.
    pacer.charge(10 * 16 * 6)
    assert _paced_run(pacer, 30) == [0] * 30
    # The same counts give the same rows: nothing measured enters.
    assert _paced_run(CurationPacer(0.2), 400) == rows
    # A cap below one row's cost still allows one row per burst.
    assert set(_paced_run(CurationPacer(0.01), 200)) <= {0, 1}
    with pytest.raises(ValueError, match="pass_share"):
        CurationPacer(0.0)
    resumed = CurationPacer(0.2)
    resumed.load_state_dict(pacer.state_dict())
    assert _paced_run(resumed, 50) == _paced_run(pacer, 50)


def test_fixed_cadence_and_incoming_modes():
    fixed = Schedule(Cadence(every_n_batches=10, incoming_every_n_batches=3))
    assert not fixed.budgeted and [b for b in range(25) if fixed.heldout_due(b)] == [0, 10, 20]
    assert [b for b in range(10) if fixed.incoming_due(b, latest_heldout_batch=0)] == [0, 3, 6, 9]
    auto = Schedule(Cadence())
    assert auto.incoming_due(7, latest_heldout_batch=7) and not auto.incoming_due(8, latest_heldout_batch=7)
    assert not Schedule(Cadence(every_n_batches=10, incoming_every_n_batches=None, pass_share=None)).incoming_due(0, 0)
    assert not auto.needs_plan() and not auto.heldout_due(10 ** 6)  # no plan before batches are timed
    with pytest.raises(ValueError, match="pass_share"):
        Cadence(pass_share=1.5)
    with pytest.raises(ValueError, match="every_n_batches"):
        Cadence(pass_share=None)
    with pytest.raises(ValueError, match="incoming_every_n_batches"):
        Cadence(incoming_every_n_batches=0)


def test_monitor_follows_its_budget_plan(tmp_path):
    torch.manual_seed(0)
    cb = monitor(cadence=replace(BASE_CADENCE, every_n_batches=None, pass_share=0.5, incoming_every_n_batches="auto"))
    trainer(tmp_path, [cb], max_epochs=4).fit(TinyModule(), train_loader())
    held = [h["batch"] for h in cb.history if h["split"] == "heldout"]
    incoming = [h["batch"] for h in cb.history if h["split"] == "incoming"]
    assert held[0] == 0 and cb.schedule.gap is not None and cb.schedule.gap >= 1
    # After the plan, evaluations are spaced by the planned gaps, and incoming rows are scored right
    # after each held-out evaluation that training continued past (same weights).
    assert all(b > a for a, b in zip(held, held[1:]))
    assert set(incoming) <= set(held) and incoming[0] == 0
    state = cb.state_dict()["schedule"]
    assert state["next_heldout"] == held[-1] + state["gap"]  # every plan starts at the latest evaluation
