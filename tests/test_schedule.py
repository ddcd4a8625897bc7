"""When the monitor scores: the budget arithmetic on given numbers, and the monitor following its plan."""

import math

import pytest
import torch

from jepa_monitor.callbacks._pacing import CurationPacer
from jepa_monitor.callbacks._schedule import MIN_HELDOUT_ROWS, MIN_INCOMING_ROWS, TARGET_GAP, WARMUP_BATCHES, Schedule
from test_callback import TinyModule, monitor, train_loader, trainer


def test_gap_keeps_evaluation_cost_within_the_budget():
    s = Schedule(None, "auto", budget=0.05)
    assert s.propose_gap(1.0) is None  # nothing timed yet
    for t in (0.10, 0.30, 0.10, 0.12, 0.08):  # median training batch: 0.10 s
        s.note_batch(t, 0.0)
    # E / (budget * s) = 2.0 / 0.005 = 400 batches: 2 s of evaluation per 40 s of training = 5 %.
    assert s.propose_gap(2.0) == 400
    assert s.propose_gap(2.0) * 0.10 * 0.05 >= 2.0
    assert s.propose_gap(1e-9) == 1


def test_evaluations_are_a_share_of_the_wall_time_curation_included():
    s = Schedule(None, "auto", budget=0.2)
    assert s.batch_seconds() is None
    for _ in range(WARMUP_BATCHES):
        s.note_batch(0.10, 0.02)  # curation (its own budget): 0.02 s of every 0.12 s batch
    assert s.batch_seconds() == pytest.approx(0.10)
    assert s.propose_gap(1.0) == math.ceil(1.0 / (0.2 * 0.12))


def test_rows_shrink_before_the_gap_grows_past_the_target():
    s = Schedule(None, "auto", budget=0.05)
    assert s.propose_rows((2.0, 128), (0.2, 16), (128, 16)) is None  # nothing timed yet
    for _ in range(WARMUP_BATCHES):
        s.note_batch(0.10, 0.0)  # room: 0.005 s of evaluation per batch, 5 s per TARGET_GAP batches
    assert TARGET_GAP * 0.005 == pytest.approx(5.0)
    assert s.propose_rows((2.0, 128), (0.2, 16), (128, 16)) == (128, 16)  # 2.2 s: within the target
    # 6.05 s at full rows: scaled by 5 / 6.05 (the cost measured at 64 held-out rows, per row)
    assert s.propose_rows((2.75, 64), (0.55, 16), (128, 16)) == (int(128 * 5 / 6.05), int(16 * 5 / 6.05))
    assert s.propose_rows((20.0, 128), (2.0, 16), (128, 16)) == (MIN_HELDOUT_ROWS, MIN_INCOMING_ROWS)
    assert s.propose_rows((20.0, 50), (2.0, 4), (50, 4)) == (50, 4)  # maxima below the floors: kept
    assert s.propose_rows((8.0, 128), (0.0, 0), (128, 16)) == (80, 10)  # no incoming evaluations: held-out alone


def test_monitor_scores_fewer_rows_when_evaluations_would_be_rare(tmp_path):
    from test_callback import heldout_loader

    torch.manual_seed(0)
    cb = monitor(every_n_steps=None, budget=1e-6, heldout=heldout_loader(n=200), incoming_every_n_steps="auto",
                 incoming_max_rows=16)
    trainer(tmp_path, [cb], max_epochs=2).fit(TinyModule(), train_loader())
    assert cb.schedule.rows == (MIN_HELDOUT_ROWS, MIN_INCOMING_ROWS)  # down from (128, 16)
    assert cb._scored_rows["heldout"] == 128  # the fit-start evaluation scored the configured rows
    state = cb.state_dict()["schedule"]
    assert tuple(state["rows"]) == cb.schedule.rows
    resumed = monitor(every_n_steps=None, budget=1e-6)
    resumed.load_state_dict(cb.state_dict())
    assert resumed.schedule.rows == cb.schedule.rows


def _paced_run(pacer, step, cost, batches, gate_budget=16):
    """Simulated curation: a batch costs cost(rows) seconds; returns the rows of every batch."""
    rows = []
    for _ in range(batches):
        cap = pacer.max_rows(step)
        r = gate_budget if cap is None else min(cap, gate_budget)
        pacer.spent(step, cost(r), r)
        rows.append(r)
    return rows


def test_pacer_keeps_curation_within_its_share_of_the_training_batch():
    # The demo's shape: 30 ms batches, 5 ms embedding forward, Jacobian rows 3 ms + 1.1 ms per row.
    cost = lambda r: 0.005 + (0.003 + 0.0011 * r if r else 0.0)  # noqa: E731
    pacer = CurationPacer(0.25)
    rows = _paced_run(pacer, 0.030, cost, 400)
    spent = sum(cost(r) for r in rows)
    assert rows[0] == 16  # not paced before a batch with Jacobian rows was measured
    assert spent <= 0.25 * 0.030 * 400 + 4 * 0.25 * 0.030 + cost(16)  # the share, the burst, the first batch
    assert spent >= 0.9 * 0.25 * 0.030 * 400  # ... and the allowance is used, not wasted
    assert 0 < sum(rows[50:]) / 350 < 16 and not pacer.over_budget()
    # Saving up: the fixed cost is paid by few batches, each scoring several rows.
    assert max(rows[50:]) >= 8 and sum(r > 0 for r in rows[50:]) < 350 / 4
    assert pacer.row_cost()[1] == pytest.approx(0.0011 + 0.003 / max(rows[50:]), rel=1e-6)
    # A one-off cost at the first batch (the scorer's "auto" timing: 0.2 s) does not stop the pacing.
    first = {"done": False}

    def once(r):
        extra = 0.2 if r and not first["done"] else 0.0
        first["done"] = first["done"] or r > 0
        return cost(r) + extra

    # A batch slowed by something else on the machine (1 s) is charged its modelled cost.
    spiky = CurationPacer(0.25)
    rows = _paced_run(spiky, 0.030, cost, 100)
    spiky.spent(0.030, 1.0, 0)
    assert sum(_paced_run(spiky, 0.030, cost, 40)) > 0
    warm = CurationPacer(0.25)
    rows = _paced_run(warm, 0.030, once, 400)
    assert sum(rows[100:]) >= 0.5 * sum(r for r in _paced_run(CurationPacer(0.25), 0.030, cost, 400)[100:]) > 0
    # A budget below the embedding's cost: no Jacobian rows after the first, and it says so.
    poor = CurationPacer(0.05)
    rows = _paced_run(poor, 0.030, cost, 100)
    assert sum(rows[1:]) == 0 and poor.over_budget()
    early = CurationPacer(0.25)
    _paced_run(early, 0.030, cost, 3)  # the first, unpaced batch costs 4 allowances: not a verdict yet
    assert early.spent_total > 1.5 * early.earned_total and not early.over_budget()
    assert CurationPacer(0.25).max_rows(None) is None
    with pytest.raises(ValueError, match="curation_budget"):
        CurationPacer(0.0)


def test_fixed_cadence_and_incoming_modes():
    fixed = Schedule(10, 3, budget=0.05)
    assert not fixed.budgeted and [b for b in range(25) if fixed.heldout_due(b)] == [0, 10, 20]
    assert [b for b in range(10) if fixed.incoming_due(b, latest_heldout_batch=0)] == [0, 3, 6, 9]
    auto = Schedule(None, "auto", budget=0.05)
    assert auto.incoming_due(7, latest_heldout_batch=7) and not auto.incoming_due(8, latest_heldout_batch=7)
    assert not Schedule(10, None, budget=None).incoming_due(0, 0)
    assert not auto.needs_plan() and not auto.heldout_due(10 ** 6)  # no plan before batches are timed
    with pytest.raises(ValueError, match="budget"):
        Schedule(None, "auto", budget=1.5)
    with pytest.raises(ValueError, match="every_n_steps"):
        Schedule(None, "auto", budget=None)
    with pytest.raises(ValueError, match="incoming_every_n_steps"):
        Schedule(None, 0, budget=0.05)


def test_monitor_follows_its_budget_plan(tmp_path):
    torch.manual_seed(0)
    cb = monitor(every_n_steps=None, budget=0.5, incoming_every_n_steps="auto")
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
