"""The refresh of a policy's fitted reading: ``stale_drop`` measures the encoder's move, not the fit's
optimism, and the gap between refreshes follows it."""

import torch

from callbacks._refresh import MAX_GAP, STALE_QUANTILE, ReadingRefresh
from jepa_monitor.reading import fit_reading


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
    rows = refresh.rows()
    _, new = refresh.update(8, rows, {"jepa_score": jepa[rows]}, z, gaussian)
    assert refresh.stale_drop == 10 / 200 == STALE_QUANTILE
    assert refresh.gap == 2  # below 1.5 times the quantile: the gap doubles
    assert torch.allclose(new.mean, gaussian.mean)


def test_a_move_along_a_narrow_direction_halves_the_gap_and_no_move_doubles_it():
    z, jepa = _reference()
    refresh, gaussian = _started(z, jepa)
    refresh.gap = 8
    moved = z.clone()
    moved[:, 5] += 0.3  # three standard deviations of the narrowest direction
    rows = refresh.rows()
    _, new = refresh.update(8, rows, {"jepa_score": jepa[rows]}, moved, gaussian)
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
    refresh.update(16, refresh.rows(), {"jepa_score": jepa[refresh.rows()]}, moved, new)
    assert refresh.stale_drop == STALE_QUANTILE and refresh.gap == 8
    refresh.inside = refresh.inside - 1.0  # rows that read better than before: fewer below the cut
    refresh.update(24, refresh.rows(), {"jepa_score": jepa[refresh.rows()]}, moved, new)
    assert refresh.stale_drop < STALE_QUANTILE and refresh.gap == 16


def test_the_jacobian_column_moves_by_the_median_paired_change_and_state_round_trips():
    z, jepa = _reference()
    refresh, gaussian = _started(z, jepa)
    rows = refresh.rows()
    shift = torch.linspace(0.5, 1.5, rows.numel(), dtype=torch.float64)
    reference, _ = refresh.update(8, rows, {"jepa_score": jepa[rows] + shift}, z, gaussian)
    assert torch.allclose(refresh.jepa, jepa + float(shift.median()))
    assert torch.allclose(reference["log_density"].double(), refresh.jepa + reference["log_prior"].double(),
                          atol=1e-4)
    copy = ReadingRefresh()
    copy.load_state_dict(refresh.state_dict())
    assert copy.gap == refresh.gap and copy.count == 1 and torch.equal(copy.inside, refresh.inside)
    assert 1 <= refresh.gap <= MAX_GAP
