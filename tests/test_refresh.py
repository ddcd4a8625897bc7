"""The refresh of a policy's fitted reading: ``stale_drop`` measures the encoder's move, not the fit's
optimism, and the gap between refreshes follows it; the reference's Jacobian level is measured only
when a row is scored with the Jacobian, and such rows are read on it."""

import pytest
import torch

from callbacks._refresh import MAX_GAP, REFRESH_ROWS, STALE_QUANTILE, OnReferenceLevel, ReadingRefresh
from jepa_monitor.policies import Drop
from jepa_monitor.reading import fit_reading
from jepa_monitor.sample_scores import SampleScores


def _reference(n: int = 200, k: int = 6, extra: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3, 0.1])[:k]
    z = torch.randn(n + extra, k, generator=g, dtype=torch.float64) * scale + 1.0
    jepa = torch.randn(n, generator=g, dtype=torch.float64)
    return z, jepa


def _started(z, jepa):
    refresh = ReadingRefresh()
    gaussian = fit_reading(z)
    refresh.reset({"jepa_score": jepa, "log_density": jepa, "embedding": z}, batch=0, gaussian=gaussian)
    return refresh, gaussian


def test_an_encoder_that_did_not_move_reads_the_quantile_itself():
    # Fresh embeddings equal to those the previous Gaussian was fitted on: the paired in-sample
    # readings agree row by row, so exactly the rows below the 5 % quantile of 200 (10 of them) count.
    # The old comparison (in-sample reading against a cross-fitted cut) read about 0.01 here.
    z, jepa = _reference()
    refresh, gaussian = _started(z, jepa)
    _, new = refresh.update(8, z, gaussian)
    assert refresh.stale_drop == 10 / 200 == STALE_QUANTILE
    assert refresh.gap == 2  # below 1.5 times the quantile: the gap doubles
    assert torch.allclose(new.mean, gaussian.mean)


def test_a_move_along_a_narrow_direction_halves_the_gap_and_no_move_doubles_it():
    z, jepa = _reference()
    refresh, gaussian = _started(z, jepa)
    refresh.gap = 8
    moved = z.clone()
    moved[:, 5] += 0.3  # three standard deviations of the narrowest direction
    _, new = refresh.update(8, moved, gaussian)
    # Brute force: every reference row read through the previous Gaussian, float64, against the
    # 5 % quantile of the same rows as it read them before the move.
    diff = moved[:200] - gaussian.mean.double()
    before = z[:200] - gaussian.mean.double()
    precision = torch.linalg.inv(gaussian.covariance.double())
    maha_after = (diff @ precision * diff).sum(1)
    maha_before = (before @ precision * before).sum(1)
    cut = torch.quantile(jepa - 0.5 * maha_before, STALE_QUANTILE)
    expected = float(((jepa - 0.5 * maha_after) < cut).double().mean())
    assert abs(refresh.stale_drop - expected) < 1e-12 and refresh.stale_drop > 2 * STALE_QUANTILE
    assert refresh.gap == 4
    # The new reading is the moved one: read again without a further move, the gap grows back.
    refresh.update(16, moved, new)
    assert refresh.stale_drop == STALE_QUANTILE and refresh.gap == 8
    refresh.inside = refresh.inside - 1.0  # rows that read better than before: fewer below the cut
    refresh.update(24, moved, new)
    assert refresh.stale_drop < STALE_QUANTILE and refresh.gap == 16


class _Rows:
    """A scorer of rows whose Jacobian term moved by ``moved[i]`` since the reference was scored; it
    counts its calls."""

    synchronized = False

    def __init__(self, jepa, moved):
        self.jepa, self.moved, self.calls = jepa, moved, []

    def score(self, rows, **side):
        self.calls.append(rows.numel())
        j = (self.jepa[rows] + self.moved[rows]).float()
        prior = torch.full_like(j, -3.0)
        return SampleScores(j, prior, j + prior, torch.zeros_like(rows), torch.zeros(rows.numel(), 2), 4, "exact")


def test_rows_scored_between_refreshes_are_read_on_the_reference_level_measured_once_per_refresh():
    z, jepa = _reference()
    refresh, gaussian = _started(z, jepa)
    moved = torch.linspace(0.5, 1.5, jepa.numel(), dtype=torch.float64)
    rows = _Rows(jepa, moved)
    charged = []
    scorer = OnReferenceLevel(rows, refresh, lambda r: (r, {}), charged.append, passes_per_row=6)
    x = torch.tensor([3, 150])
    # Right after the evaluation the reference's level is current: nothing re-scored, nothing shifted.
    s = scorer.score(x)
    assert rows.calls == [2] and charged == [] and torch.equal(s.jepa_score, (jepa + moved)[x].float())
    # A refresh reads the embeddings again and leaves the Jacobian columns as evaluated.
    reference, gaussian = refresh.update(8, z, gaussian)
    assert torch.equal(reference["jepa_score"], jepa.float())
    # The next scored rows first measure the level: REFRESH_ROWS reference rows re-scored and paid for,
    # their median paired change subtracted from the rows' jepa_score and log_density.
    s = scorer.score(x)
    first = torch.arange(REFRESH_ROWS)
    shift = float(moved[first].median())
    assert rows.calls == [2, REFRESH_ROWS, 2] and charged == [REFRESH_ROWS * 6]
    assert torch.allclose(s.jepa_score.double(), (jepa + moved)[x] - shift, atol=1e-5)
    assert torch.allclose(s.log_density - s.jepa_score, torch.full((2,), -3.0))
    # Measured once per refresh: the next call reuses it; the next refresh rotates to the next rows.
    scorer.score(x)
    assert rows.calls == [2, REFRESH_ROWS, 2, 2]
    refresh.update(16, z, gaussian)
    scorer.score(x)
    assert abs(refresh.shift["jepa_score"] - float(moved[first + REFRESH_ROWS].median())) < 1e-6  # float32 scores
    copy = ReadingRefresh()
    copy.load_state_dict(refresh.state_dict())
    assert copy.shift == refresh.shift and copy.level_due == set() and copy.count == 2
    assert copy.gap == refresh.gap and torch.equal(copy.inside, refresh.inside)
    assert 1 <= refresh.gap <= MAX_GAP


def test_a_checkpoint_of_the_eager_refresh_measures_the_level_before_its_next_jacobian_row():
    z, jepa = _reference()
    refresh, _ = _started(z, jepa)
    state = refresh.state_dict()
    del state["shift"], state["level_due"]  # what the previous release wrote
    copy = ReadingRefresh()
    copy.load_state_dict(state)
    assert copy.shift == {"jepa_score": 0.0} and copy.level_due == {"jepa_score"}


class _Encoder:
    """A RowScorer over rows named by their index (x[:, 0]): fixed embeddings ``z``, the prior
    -½‖z‖², and a Jacobian term ``base + moved`` (the encoder's Jacobian term moved since the
    reference was scored)."""

    synchronized = False

    def __init__(self, z, base, moved):
        self.z, self.base, self.moved = z, base, moved

    def embed(self, x, **side):
        return self.z[x[:, 0].long()]

    def log_prior(self, z):
        return -0.5 * z.double().pow(2).sum(1)

    def sketched(self, m):
        raise AssertionError("not sketched here")

    def score(self, x, **side):
        i = x[:, 0].long()
        j = (self.base[i] + self.moved).float()
        prior = self.log_prior(self.z[i]).float()
        return SampleScores(j, prior, j + prior, torch.zeros_like(i), self.z[i], 4, "exact")


def _world(seed=0, n_ref=200, n_in=512):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_ref + n_in, 3, generator=g) * 1.3
    base = torch.randn(n_ref + n_in, generator=g, dtype=torch.float64) * 2.0
    prior = -0.5 * z.double().pow(2).sum(1)
    ref = torch.arange(n_ref)
    reference = {"jepa_score": base[ref].float(), "log_prior": prior[ref].float(),
                 "log_density": (base[ref] + prior[ref]).float(), "embedding": z[ref]}
    return z, base, reference, torch.arange(n_ref, n_ref + n_in).float()[:, None]


def _decide(policy, scorer, x):
    return policy.decide_batch(scorer, x, batch=1, trust=1.0, max_scored=None).keep


@pytest.mark.parametrize("moved", [0.0, 1.7, -2.3])
def test_a_common_jacobian_move_leaves_every_quantile_decision_as_an_eager_recalibration_makes_it(moved):
    # Lazy: the policy stays calibrated on the evaluation's reference; rows scored with the Jacobian
    # are read on its level (minus the measured move). Eager (the old refresh): the reference moved by
    # the measured move and recalibrated; rows scored as they are. Same decisions, row for row, for
    # rows decided by the gate, by the estimate (max_jacobian_rows caps the Jacobian rows) and exactly.
    z, base, reference, x = _world()
    encoder = _Encoder(z, base, moved)
    refresh = ReadingRefresh()
    refresh.reset(reference, batch=0, gaussian=None)
    refresh.level_due = {"jepa_score"}
    lazy, eager = Drop(quantile=0.05, warmup=0), Drop(quantile=0.05, warmup=0)
    lazy.calibrate(reference, batch=0)
    keep_lazy = _decide(lazy, OnReferenceLevel(encoder, refresh, lambda r: (r.float()[:, None], {}), lambda p: None, 3), x)
    assert abs(refresh.shift["jepa_score"] - moved) < 1e-5
    eager.calibrate(refresh.on_level(reference), batch=0)
    keep_eager = _decide(eager, encoder, x)
    assert torch.equal(keep_lazy, keep_eager)
    assert lazy.counts["rows_scored"] > 0 and lazy.counts["rows_estimated"] > 0 and lazy.counts["rows_gated"] > 0
    assert 0 < int((~keep_lazy).sum()) < x.shape[0]


def test_an_absolute_threshold_needs_the_level_for_every_row():
    # The reason the monitor measures the level at every refresh for an absolute threshold: with the
    # reference left on the evaluation's level, rows decided by the estimate compare a stale Jacobian
    # term with a threshold that does not move, and a common move of 3 nats changes their decisions.
    z, base, reference, x = _world()
    encoder = _Encoder(z, base, 3.0)
    refresh = ReadingRefresh()
    refresh.reset(reference, batch=0, gaussian=None)
    refresh.level_due = {"jepa_score"}
    threshold = float(reference["log_density"].double().quantile(0.1))
    stale, moved = Drop(threshold=threshold, warmup=0), Drop(threshold=threshold, warmup=0)
    stale.calibrate(reference, batch=0)
    refresh.level("jepa_score", lambda r: encoder.score(r.float()[:, None]).jepa_score)
    moved.calibrate(refresh.on_level(reference), batch=0)
    assert not torch.equal(_decide(stale, encoder, x), _decide(moved, encoder, x))
    # Moved onto the measured level, the estimate's rows meet the threshold as the truth does: the
    # rows dropped are those whose prior plus the moved median Jacobian term falls below it.
    exact = Drop(threshold=threshold, warmup=0, gate=False)
    exact.calibrate(refresh.on_level(reference), batch=0)
    agree = (_decide(moved, encoder, x) == _decide(exact, encoder, x)).float().mean()
    assert agree > 0.9
