"""Curation policies: pure functions against hand-computed numbers, policies against exact scoring."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from jepa_monitor import Scorer, gaussian_log_prior, score_samples
from jepa_monitor.policies import (
    Drop,
    Reweight,
    drop_mask,
    median_below,
    nearest_rows,
    reference_quantile,
    soft_weights,
    undecided_rows,
)

NAN, INF = float("nan"), float("inf")


def table_scorer(calls=None):
    """score_fn whose every component is the first input column; records the rows it scored."""

    def score_fn(x):
        if calls is not None:
            calls.append(x.shape[0])
        s = x[:, 0].float()
        return SimpleNamespace(log_density=s, jepa_score=s, log_prior=s)

    return score_fn


def rows(values):
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


# ---------------------------------------------------------------------------------- pure functions
def test_reference_quantile_matches_numpy_and_ignores_nonfinite():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(101, generator=g)
    expected = np.quantile(ref.numpy().astype(np.float64), 0.05)
    with_junk = torch.cat([ref, torch.tensor([NAN, INF, -INF])])
    assert reference_quantile(with_junk, 0.05) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="no finite score"):
        reference_quantile(torch.tensor([NAN, INF]), 0.05)


def test_drop_mask_threshold_nonfinite_and_min_keep():
    s = torch.tensor([3.0, 1.0, NAN, 5.0, 2.0, INF])
    assert drop_mask(s, 2.5).tolist() == [True, False, False, True, False, False]
    # min_keep adds back the best dropped rows: 2.0 first, then 1.0, non-finite ones last.
    assert drop_mask(s, 2.5, min_keep=3).tolist() == [True, False, False, True, True, False]
    assert drop_mask(s, 2.5, min_keep=4).tolist() == [True, True, False, True, True, False]
    assert drop_mask(s, 2.5, min_keep=10).all()
    assert drop_mask(torch.tensor([1.0, 1.0, 1.0]), 5.0, min_keep=2).tolist() == [True, True, False]
    assert drop_mask(torch.tensor([NAN, NAN]), 0.0, min_keep=1).tolist() == [True, False]


def test_soft_weights_exact_values():
    s = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, NAN, INF, -INF])
    # u = s/4 + 1/2 clamped to [0, 1], w = 3u² - 2u³.
    expected = [0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert soft_weights(s, 0.0, 2.0).tolist() == expected
    assert soft_weights(s + 10, 10.0, 2.0).tolist() == expected
    assert soft_weights(s, 0.5, 0.0).tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_nearest_rows_respects_the_budget():
    undecided = torch.tensor([True, True, False, True, True, True])
    estimate = torch.tensor([0.0, 9.0, 5.0, 4.0, 6.0, 5.5])
    # Distances to 5: 5, 4, -, 1, 1, 0.5 -> rows 5, then 3 and 4 (tie broken by position), 1, 0.
    assert nearest_rows(undecided, estimate, 5.0, 3).tolist() == [False, False, False, True, True, True]
    assert nearest_rows(undecided, estimate, 5.0, 2).tolist() == [False, False, False, True, False, True]
    assert nearest_rows(undecided, estimate, 5.0, 0).sum() == 0
    assert torch.equal(nearest_rows(undecided, estimate, 5.0, 10), undecided)


def test_undecided_rows_and_median_below():
    cheap = torch.tensor([-10.0, -5.0, -3.0, 0.0, NAN])
    # Full score in [cheap - 2, cheap + 1]; Drop's band is the threshold -4 alone.
    assert undecided_rows(cheap, -2.0, 1.0, -4.0, -4.0).tolist() == [False, True, True, False, False]
    assert undecided_rows(cheap, -2.0, 1.0, -4.0, 10.0).tolist() == [False, True, True, True, False]
    assert median_below(torch.tensor([1.0, 2.0, NAN, NAN]), 1.5)
    assert not median_below(torch.tensor([1.0, 2.0, 3.0, NAN]), 1.5)


# ---------------------------------------------------------------------------------- Drop
def test_threshold_comes_from_the_reference_not_the_batch():
    policy = Drop(warmup=0, quantile=0.05, min_keep=1, max_drop_fraction=1.0)
    policy.calibrate(torch.arange(100, dtype=torch.float32))
    assert policy.threshold == pytest.approx(4.95)
    clean = policy.decide_batch(table_scorer(), rows(range(100)), batch=0)
    assert clean.active and (~clean.keep).sum() == 5 and clean.keep[5:].all()
    # A batch that is all junk loses every row but the best one.
    junk = policy.decide_batch(table_scorer(), rows([-9.0, 1.0, 4.0, -3.0]), batch=1)
    assert junk.keep.tolist() == [False, False, True, False]
    assert junk.weight.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert policy.counts["rows_dropped"] == 8 and policy.counts["rows_seen"] == 104


def test_mapping_reference_and_absolute_threshold():
    policy = Drop(warmup=0, threshold=10.0)
    assert policy.is_active(batch=0)  # an absolute threshold needs no reference
    policy.calibrate({"log_density": torch.arange(100.0), "jepa_score": torch.zeros(100), "log_prior": torch.arange(100.0)})
    assert policy.threshold == 10.0 and policy.reference_low == pytest.approx(4.95)
    d = policy.decide_batch(table_scorer(), rows([9.0, 10.0, 11.0]), batch=0)
    assert d.keep.tolist() == [False, True, True]
    with pytest.raises(KeyError, match="log_density"):
        policy.calibrate({"jepa_score": torch.zeros(3)})


def test_inactive_without_reference_before_warmup_and_off_cadence():
    calls = []
    assert not Drop(warmup=0).decide_batch(table_scorer(calls), rows([-100.0]), batch=0).active
    policy = Drop(warmup=3, every_n_batches=2)
    policy.calibrate(torch.arange(100.0))
    active = [policy.decide_batch(table_scorer(calls), rows([-100.0, 50.0]), batch=s).active for s in range(7)]
    assert active == [False, False, False, False, True, False, True]
    assert calls == [2, 2]  # an inactive step costs nothing
    passed = policy.decide_batch(table_scorer(), rows([-100.0, 50.0]), batch=5)
    assert passed.keep.all() and passed.weight.tolist() == [1.0, 1.0] and passed.scores.isnan().all()


def test_trust_warmup():
    from jepa_monitor.diagnostics import TRUST_THRESHOLD

    policy = Drop(warmup="trust")
    # A reference from an encoder that cannot be read as a density is refused, not used.
    for untrusted in (None, NAN, TRUST_THRESHOLD - 0.01):
        policy.calibrate(torch.arange(100.0), batch=0, trust=untrusted)
    assert policy.threshold is None and policy.counts["calibrations_refused"] == 3
    assert not policy.is_active(10, trust=TRUST_THRESHOLD)
    policy.calibrate(torch.arange(100.0), batch=0, trust=TRUST_THRESHOLD)
    assert policy.threshold == pytest.approx(4.95)
    assert not policy.is_active(10, trust=None)
    assert not policy.is_active(10, trust=TRUST_THRESHOLD - 0.01)
    assert not policy.is_active(10, trust=NAN)
    assert policy.is_active(10, trust=TRUST_THRESHOLD)
    assert Drop(warmup="trust").is_active(0, trust=0.95) is False  # no reference yet
    with pytest.raises(TypeError):
        Drop(trust_threshold=0.3)  # "trusted" has one definition: diagnostics.is_trusted


def test_nonfinite_rows_are_dropped_and_counted():
    policy = Drop(warmup=0, quantile=0.05)
    policy.calibrate(torch.arange(100.0))
    d = policy.decide_batch(table_scorer(), rows([50.0, NAN, INF, 60.0]), batch=0)
    assert d.keep.tolist() == [True, False, False, True]
    assert d.n_nonfinite == 2 and policy.counts["rows_nonfinite"] == 2
    w = Reweight(warmup=0)
    w.calibrate(torch.arange(100.0))
    assert w.decide_batch(table_scorer(), rows([NAN, -INF]), batch=0).weight.tolist() == [0.0, 0.0]


def test_noisy_batch_rule():
    policy = Drop(warmup=0, quantile=0.05, batch_anomaly=0.2, anomalous_batch_weight=0.25)
    policy.calibrate(torch.arange(101.0))  # 0.2-quantile = 20
    normal = policy.decide_batch(table_scorer(), rows([10.0, 30.0, 60.0]), batch=0)
    assert normal.batch_weight == 1.0
    noisy = policy.decide_batch(table_scorer(), rows([10.0, 15.0, 60.0]), batch=1)
    assert noisy.batch_weight == 0.25 and noisy.weight.tolist() == [0.25, 0.25, 0.25]
    assert policy.counts["anomalous_batches"] == 1


# ---------------------------------------------------------------------------------- Reweight
def test_reweight_scale_from_reference_spread():
    policy = Reweight(warmup=0, quantile=0.05, temperature=0.5)
    policy.calibrate(torch.arange(101.0))  # q05 = 5, median = 50
    assert policy.scale == pytest.approx(22.5)
    d = policy.decide_batch(table_scorer(), rows([5.0, 27.5, 50.0, -17.5, 16.25]), batch=0)
    assert d.keep.all()
    assert d.weight.tolist() == pytest.approx([0.5, 1.0, 1.0, 0.0, 0.84375])


# ---------------------------------------------------------------------------------- the gate
class _Asinh(nn.Module):
    """z = asinh(W x): maps x = W⁻¹ sinh(ε), ε ~ N(0, I), exactly onto N(0, I), so the prior term
    carries information, as it does for an encoder trained towards Gaussian embeddings."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(4, 4, generator=g, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64))

    def forward(self, x):
        return torch.asinh(x @ self.w.T)


def _encoder():
    return _Asinh()


def _reference_and_batch():
    enc = _encoder()
    g = torch.Generator().manual_seed(1)
    u = torch.sinh(torch.randn(496, 4, generator=g, dtype=torch.float64))
    u[400:408] += 6.0  # far off the data
    x = u @ torch.linalg.inv(enc.w).T
    return x[:400], x[400:]


@pytest.mark.parametrize("policy_type", [Drop, Reweight])
def test_gate_gives_the_exact_decision_with_fewer_jacobians(policy_type):
    enc = _encoder()
    score_fn = Scorer(enc)
    ref, x = _reference_and_batch()
    s = score_fn(ref)
    reference = {"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density}
    gated, exact = policy_type(warmup=0, max_jacobian_rows=None), policy_type(warmup=0, gate=False)
    gated.calibrate(reference)
    exact.calibrate(reference)
    dg = gated.decide_batch(score_fn, x, batch=0)
    de = exact.decide_batch(score_fn, x, batch=0)

    assert de.n_scored == 96 and 0 < dg.n_scored < 96
    assert torch.equal(dg.keep, de.keep) and torch.equal(dg.weight, de.weight)
    assert gated.counts["rows_outside_gate"] == 0
    truth = score_fn(x).log_density
    computed = ~dg.scores.isnan()
    assert int(computed.sum()) == dg.n_scored
    torch.testing.assert_close(dg.scores[computed], truth[computed])
    assert (~dg.keep[:8]).all() if policy_type is Drop else (dg.weight[:8] == 0).all()


def test_gate_budget_caps_the_jacobian_rows():
    enc = _encoder()
    score_fn = Scorer(enc)
    ref, x = _reference_and_batch()
    s = score_fn(ref)
    reference = {"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density}
    unlimited, capped = Drop(warmup=0, max_jacobian_rows=None), Drop(warmup=0, max_jacobian_rows=5)
    unlimited.calibrate(reference)
    capped.calibrate(reference)
    du, dc = unlimited.decide_batch(score_fn, x, 0), capped.decide_batch(score_fn, x, 0)
    assert du.n_scored > 5 and dc.n_scored == 5 and dc.n_estimated == du.n_scored - 5
    assert capped.counts["rows_estimated"] == dc.n_estimated and du.n_estimated == 0
    # Rows the capped gate scored are the undecided rows nearest the threshold by estimate.
    undecided = ~du.scores.isnan()
    estimate = score_fn(x).log_prior + capped.jacobian_center
    assert torch.equal(~dc.scores.isnan(), nearest_rows(undecided, estimate, capped.threshold, 5))
    exact_where_scored = ~dc.scores.isnan()
    assert torch.equal(dc.keep[exact_where_scored], du.keep[exact_where_scored])
    assert torch.equal(dc.keep[~undecided], du.keep[~undecided])


def test_small_reference_disables_the_gate():
    from jepa_monitor.policies import GATE_MIN_REFERENCE

    enc = _encoder()
    score_fn = Scorer(enc)
    ref, x = _reference_and_batch()
    for n, gated in [(GATE_MIN_REFERENCE - 1, False), (GATE_MIN_REFERENCE, True)]:
        s = score_fn(ref[:n])
        policy = Drop(warmup=0)
        policy.calibrate({"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density})
        assert (policy.jacobian_range is not None) == gated
        assert (policy.decide_batch(score_fn, x, 0).n_scored < x.shape[0]) == gated


def test_gate_counts_rows_outside_the_reference_jacobian_range():
    enc = _encoder()
    score_fn = Scorer(enc)
    ref, x = _reference_and_batch()
    s = score_fn(ref)
    policy = Drop(warmup=0, gate_margin=0.0)
    # A reference whose Jacobian term reads 3 nats low: rows above its range get scored and counted.
    policy.calibrate({"jepa_score": s.jepa_score - 3.0, "log_prior": s.log_prior, "log_density": s.log_density})
    d = policy.decide_batch(score_fn, x, batch=0)
    lo, hi = policy.jacobian_range
    assert (lo, hi) == (float((s.jepa_score - 3.0).min()), float((s.jepa_score - 3.0).max()))
    j = score_fn(x).jepa_score.double()[~d.scores.isnan()]
    expected = int(((j < lo) | (j > hi)).sum())
    assert 0 < expected == policy.counts["rows_outside_gate"] <= d.n_scored


def test_log_prior_needs_no_jacobian_and_jepa_score_cannot_be_gated():
    enc = _encoder()
    calls = []

    def score_fn(x):
        calls.append(x.shape[0])
        return score_samples(enc, x)

    ref, x = _reference_and_batch()
    s = score_samples(enc, ref)
    reference = {"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density}
    prior = Drop(warmup=0, score_key="log_prior")
    prior.calibrate(reference)
    d = prior.decide_batch(SimpleNamespace(score=score_fn, embed=Scorer(enc).embed, log_prior=Scorer(enc).log_prior,
                                        sketched=lambda m: None, synchronized=False), x, 0)
    assert calls == [] and d.n_scored == 0
    expected = gaussian_log_prior(enc(x).detach())
    torch.testing.assert_close(d.scores, expected)
    assert torch.equal(d.keep, drop_mask(expected, prior.threshold))

    raw = Drop(warmup=0, score_key="jepa_score")
    raw.calibrate(reference)
    assert raw.decide_batch(Scorer(enc), x, 0).n_scored == 96


def test_state_dict_round_trip_reproduces_decisions():
    enc = _encoder()
    score_fn = Scorer(enc)
    ref, x = _reference_and_batch()
    s = score_fn(ref)
    a = Reweight(warmup=0, batch_anomaly=0.01)
    a.calibrate({"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density})
    a.decide_batch(score_fn, x[:50], 0)
    b = Reweight(warmup=0, batch_anomaly=0.01)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    da, db = a.decide_batch(score_fn, x[50:], 1), b.decide_batch(score_fn, x[50:], 1)
    assert torch.equal(da.weight, db.weight) and da.n_scored == db.n_scored
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Drop(warmup=0, quantile=0.0), "quantile"),
        (lambda: Drop(warmup=0, score_key="density"), "score_key"),
        (lambda: Drop(warmup=-1), "warmup"),
        (lambda: Drop(warmup="later"), "warmup"),
        (lambda: Drop(warmup=0, min_keep=0), "min_keep"),
        (lambda: Drop(warmup=0, every_n_batches=0), "every_n_batches"),
        (lambda: Drop(warmup=0, batch_anomaly=0.7), "batch_anomaly"),
        (lambda: Drop(warmup=0, max_jacobian_rows=-1), "max_jacobian_rows"),
        (lambda: Reweight(warmup=0, temperature=-1.0), "temperature"),
    ],
)
def test_bad_arguments_name_the_culprit(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------- safe defaults
def test_drop_defaults_keep_two_rows_and_at_least_half_the_batch():
    policy = Drop(warmup=0)
    assert (policy.min_keep, policy.max_drop_fraction, policy.warmup) == (2, 0.5, 0)
    assert Drop().warmup == "trust" and Reweight().warmup == "trust"
    policy.calibrate(torch.arange(100.0))  # threshold 4.95
    # Every row below the threshold: the cap keeps the best half, highest scores first.
    junk = policy.decide_batch(table_scorer(), rows([-9.0, 1.0, 4.0, -3.0, 0.0, -1.0]), batch=0)
    assert junk.keep.tolist() == [False, True, True, False, True, False]
    assert junk.n_capped == 3 and policy.counts["rows_capped"] == 3
    # Two rows in the batch: never cut to one (a BatchNorm head raises on a single row).
    assert policy.decide_batch(table_scorer(), rows([-9.0, -8.0]), batch=1).keep.all()
    # Clean rows: the cap does not act.
    clean = policy.decide_batch(table_scorer(), rows([50.0, 1.0, 60.0, 70.0]), batch=2)
    assert clean.keep.tolist() == [True, False, True, True] and clean.n_capped == 0
    with pytest.raises(ValueError, match="max_drop_fraction"):
        Drop(max_drop_fraction=0.0)


def test_stale_threshold_needs_refresh_and_does_not_act():
    policy = Drop(warmup=0, max_threshold_age=100)
    policy.calibrate(torch.arange(100.0), batch=50)
    assert policy.is_active(150) and not policy.needs_refresh(150)
    assert policy.needs_refresh(151) and not policy.is_active(151)
    d = policy.decide_batch(table_scorer(), rows([-9.0, 50.0]), batch=151)
    assert not d.active and d.keep.all()
    policy.calibrate(torch.arange(100.0), batch=151)
    assert policy.is_active(151)
    assert not Drop(warmup=0, max_threshold_age=None).needs_refresh(10**9)


def test_policy_protocol_and_not_applied_rows():
    from jepa_monitor.policies import Policy

    assert isinstance(Drop(), Policy) and isinstance(Reweight(), Policy)
    policy = Drop(warmup=0, max_drop_fraction=1.0)
    policy.calibrate(torch.arange(100.0))
    policy.decide_batch(table_scorer(), rows([-9.0, 50.0, 60.0]), batch=0)
    assert policy.counts["rows_dropped"] == 1
    policy.record_not_applied(1)
    assert policy.counts["rows_dropped"] == 0 and policy.counts["rows_not_applied"] == 1


def test_gate_counts_rows_decided_from_the_embedding():
    enc = _encoder()
    scorer = Scorer(enc)
    ref, x = _reference_and_batch()
    s = scorer(ref)
    policy = Drop(warmup=0, max_jacobian_rows=5)
    policy.calibrate(s.components())
    d = policy.decide_batch(scorer, x, 0)
    assert d.n_gated + d.n_scored + d.n_estimated == x.shape[0] and d.n_gated > 0
    assert policy.counts["rows_gated"] == d.n_gated


# ---------------------------------------------------------------------------------- the embedding
def test_embed_matches_scoring_and_restores_modes():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    enc.train()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    rng = torch.get_rng_state()
    z = Scorer(enc).embed(x)
    assert enc.training and all(m.training for m in enc.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(z, score_samples(enc, x).embedding)
    assert not z.requires_grad


def test_embed_matches_the_whitened_scores():
    from jepa_monitor.whitening import Whitening

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    g = torch.Generator().manual_seed(3)
    w = Whitening.fit(Scorer(enc).embed(torch.randn(200, 6, generator=g)))
    x = torch.randn(10, 6, generator=g)
    scorer = Scorer(enc, whitening=w)
    # the cheap stage's prior must be the prior that the score reports, or the gate decides wrongly
    torch.testing.assert_close(gaussian_log_prior(scorer.embed(x)), scorer(x).log_prior, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- embedding scores and the sketch
def _gaussian_world(k=6, n_ref=200, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    ref = torch.randn(n_ref, k, generator=g, dtype=torch.float64) @ a.double().T
    x = torch.randn(n, k, generator=g, dtype=torch.float64) @ a.double().T
    x[:8] += 6.0  # far rows
    return ref.float(), x.float()


@pytest.mark.parametrize("key", ["knn", "mahalanobis"])
def test_embedding_scores_need_no_jacobian_and_match_brute_force(key):
    from scipy.spatial.distance import cdist

    ref, x = _gaussian_world()
    calls = []
    identity = nn.Identity()
    scorer = SimpleNamespace(score=lambda rows: calls.append(rows.shape[0]), embed=Scorer(identity).embed,
                             log_prior=Scorer(identity).log_prior, sketched=lambda m: None, synchronized=False)
    policy = Drop(warmup=0, score_key=key, max_drop_fraction=1.0)
    with pytest.raises(KeyError, match="embedding"):
        policy.calibrate({"log_density": torch.zeros(3)})
    policy.calibrate({"embedding": ref})
    d = policy.decide_batch(scorer, x, 0)
    assert calls == [] and d.n_scored == 0
    r, xx = ref.double().numpy(), x.double().numpy()
    if key == "knn":
        expected = -np.sort(cdist(xx, r), axis=1)[:, 4]
    else:
        mu = r.mean(0)
        from sklearn.covariance import ledoit_wolf
        cov = ledoit_wolf(r)[0]
        expected = -np.einsum("ij,jk,ik->i", xx - mu, np.linalg.inv(cov), xx - mu)
    np.testing.assert_allclose(d.scores.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert not d.keep[:8].any() and d.keep[8:].float().mean() > 0.8
    # The threshold is the quantile of cross-fitted reference scores: each row scored without its fold.
    fold = np.arange(200) % 5
    cross = np.empty(200)
    for f in range(5):
        out, inn = r[fold == f], r[fold != f]
        if key == "knn":
            cross[fold == f] = -np.sort(cdist(out, inn), axis=1)[:, 4]
        else:
            mu, cov = inn.mean(0), ledoit_wolf(inn)[0]
            cross[fold == f] = -np.einsum("ij,jk,ik->i", out - mu, np.linalg.inv(cov), out - mu)
    assert policy.threshold == pytest.approx(np.quantile(cross, 0.05), rel=1e-5)
    restored = Drop(warmup=0, score_key=key, max_drop_fraction=1.0)
    restored.load_state_dict(policy.state_dict())
    assert torch.equal(restored.decide_batch(scorer, x, 0).keep, d.keep)


def test_sketch_rows_auto_and_explicit():
    from jepa_monitor.policies import sketch_rows

    assert sketch_rows(16, "auto") is None and sketch_rows(64, "auto") is None
    assert sketch_rows(96, "auto") == 16 and sketch_rows(384, "auto") == 48
    assert sketch_rows(96, 8) == 8 and sketch_rows(8, 8) is None and sketch_rows(96, None) is None
    with pytest.raises(ValueError, match="sketch"):
        Drop(sketch=0)


def test_sketched_rows_are_mapped_onto_the_exact_level_and_decide_like_exact_scoring():
    from jepa_monitor.policies import fit_level
    from jepa_monitor.statistics import spearman

    g = torch.Generator().manual_seed(0)
    enc = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 96))
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    ref = torch.randn(160, 32, generator=g)
    x = torch.randn(64, 32, generator=g)
    x[:16] *= 3.0  # rows spread more widely: a different Jacobian
    scorer = Scorer(enc)
    exact_ref, sketch_ref = scorer.score(ref), scorer.sketched(16).score(ref)
    reference = {"jepa_score": exact_ref.jepa_score, "log_prior": exact_ref.log_prior,
                 "log_density": exact_ref.log_density, "sketch_score": sketch_ref.jepa_score,
                 "embedding": exact_ref.embedding}
    sketched = Drop(warmup=0, gate=False, quantile=0.2, max_drop_fraction=1.0)
    exact = Drop(warmup=0, gate=False, quantile=0.2, max_drop_fraction=1.0, sketch=None)
    with pytest.raises(ValueError, match="sketch"):
        Scorer(enc, sketch=0)
    sketched.calibrate(reference)
    exact.calibrate(reference)
    assert sketched.sketch_rows(96) == 16 and exact.sketch_rows(96) is None
    a, b = sketched.sketch_level
    assert (a, b) == pytest.approx(fit_level(sketch_ref.jepa_score, exact_ref.jepa_score))
    ds, de = sketched.decide_batch(scorer, x, 0), exact.decide_batch(scorer, x, 0)
    assert sketched.counts["rows_sketched"] == 64 and exact.counts["rows_sketched"] == 0
    s_in = scorer.sketched(16).score(x)
    torch.testing.assert_close(ds.scores.double(), a * s_in.jepa_score.double() + b + s_in.log_prior.double(),
                               rtol=1e-5, atol=1e-4)
    assert float(spearman(ds.scores.double(), de.scores.double())) > 0.9
    assert (ds.keep == de.keep).float().mean() >= 0.85


def test_drop_and_reweight_show_every_shared_option_with_its_default():
    import inspect

    from jepa_monitor.policies import ThresholdPolicy

    shared = inspect.signature(ThresholdPolicy).parameters
    for policy in (Drop, Reweight):
        own = inspect.signature(policy).parameters
        assert all(p.kind is not p.VAR_KEYWORD for p in own.values())
        assert {name: p.default for name, p in shared.items()} == {name: own[name].default for name in shared}
    assert Drop(pass_share=0.3, max_jacobian_rows=4, weight_key="w").max_jacobian_rows == 4
