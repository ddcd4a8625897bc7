import math

import numpy as np
import pytest
import torch
from scipy import stats

from jepa_monitor.diagnostics import (
    _sqrt_beta_cv,
    DISAGREEMENT_THRESHOLD,
    MEAN_TOL,
    MIN_ROWS_PER_DIM,
    REPORT_KEYS,
    TRUST_KEYS,
    TRUST_THRESHOLD,
    disagreement,
    gaussianity_report,
    null_bounds,
    rank_deficiency,
    score_agreement,
    severities,
    trust_factors,
    trust_rows,
    trust_score,
    weakest_diagnostic,
)
from jepa_monitor.epps_pulley import epps_pulley, random_directions

N, K = 512, 16


def _normal(seed, n=N, k=K):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _student_t(seed, nu=3.0):
    g = torch.Generator().manual_seed(seed)
    chi2 = 2.0 * torch._standard_gamma(torch.full((N, 1), nu / 2, dtype=torch.float64), generator=g)
    return torch.randn(N, K, generator=g, dtype=torch.float64) / (chi2 / nu).sqrt() * math.sqrt((nu - 2) / nu)


@pytest.mark.parametrize("k", [4, 16, 64])
@pytest.mark.parametrize("seed", range(4))
def test_exactly_gaussian_embeddings_are_trusted(seed, k):
    report = gaussianity_report(_normal(seed, k=k).float())
    assert set(report) == set(REPORT_KEYS)
    assert trust_score(report) > 0.9 > TRUST_THRESHOLD


def _collapsed_rank1(seed):
    direction = torch.ones(K, dtype=torch.float64) / math.sqrt(K)
    return _normal(seed)[:, :1] * direction


CASES = {
    "collapsed_rank1": (_collapsed_rank1, "eig_min"),
    "collapsed_constant": (lambda seed: torch.full((N, K), 0.3) + 0 * _normal(seed), "eig_min"),
    "shifted_mean": (lambda seed: _normal(seed) + 3.0 / math.sqrt(K), "mean_offset"),
    "anisotropic": (lambda seed: _normal(seed) * torch.tensor([10.0] + [1.0] * (K - 1), dtype=torch.float64), "eig_max"),
    "heavy_tailed": (_student_t, ("shape_norm_cv_ratio", "shape_epps_pulley")),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(3))
def test_departures_get_low_trust_and_the_right_culprit(case, seed):
    make, culprit = CASES[case]
    report = gaussianity_report(make(seed))
    assert trust_score(report) < TRUST_THRESHOLD
    name = weakest_diagnostic(report)
    assert name in (culprit if isinstance(culprit, tuple) else (culprit,))
    assert trust_factors(report)[name] == trust_score(report)


def test_report_values_against_independent_references():
    z = _normal(0) * torch.linspace(0.5, 2.0, K, dtype=torch.float64) + 0.2
    report = gaussianity_report(z)
    a = z.numpy()
    evals = np.linalg.eigvalsh(np.cov(a, rowvar=False))
    assert report["mean_offset"] == pytest.approx(np.linalg.norm(a.mean(0)) / math.sqrt(K), rel=1e-12)
    assert report["eig_max"] == pytest.approx(evals[-1], rel=1e-10)
    assert report["eig_min"] == pytest.approx(evals[0], rel=1e-10)
    assert report["condition_number"] == pytest.approx(evals[-1] / evals[0], rel=1e-10)
    p = evals / evals.sum()
    assert report["effective_rank"] == pytest.approx(math.exp(stats.entropy(p)) / K, rel=1e-10)
    norms = np.linalg.norm(a, axis=1)
    assert report["norm_mean"] == pytest.approx(norms.mean() / math.sqrt(K), rel=1e-12)
    chi_cv = stats.chi(K).std() / stats.chi(K).mean()
    assert report["norm_cv_ratio"] == pytest.approx(norms.std(ddof=1) / norms.mean() / chi_cv, rel=1e-10)
    # the raw statistic is SIGReg's, on directions of a private fixed-seed generator
    g = torch.Generator().manual_seed(20251007)
    expected = epps_pulley(z, random_directions(K, 64, generator=g, dtype=torch.float64)).item()
    assert report["epps_pulley"] == pytest.approx(expected, rel=1e-12)
    # whitening removes mean and covariance: the shape part is that of a Gaussian
    assert report["shape_epps_pulley"] < 1.5
    assert report["shape_norm_cv_ratio"] == pytest.approx(1.0, abs=0.15)


def test_whitened_norm_null_is_the_exact_beta_law():
    # Squared Mahalanobis distances of the fitting sample are (N-1)²/N · Beta(r/2, (N-r-1)/2):
    # with many dimensions per row the whitened norms concentrate far more than χ_r says.
    n, k = 100, 40
    a, b = k / 2, (n - k - 1) / 2
    draws = np.sqrt(np.random.default_rng(0).beta(a, b, size=500_000))
    assert _sqrt_beta_cv(a, b) == pytest.approx(draws.std() / draws.mean(), rel=1e-2)
    ratios = [gaussianity_report(_normal(s, n=n, k=k))["shape_norm_cv_ratio"] for s in range(20)]
    assert abs(np.mean(ratios) - 1.0) < 0.05
    chi_cv = stats.chi(k).std() / stats.chi(k).mean()
    assert np.mean(ratios) * _sqrt_beta_cv(a, b) / chi_cv < 0.85  # what a χ reference would read


def test_null_bounds_against_scipy():
    bounds = null_bounds(N, K)
    exact = math.sqrt(stats.chi2(K).ppf(0.999) / (N * K))
    assert bounds["mean_offset"][1] == pytest.approx(exact, rel=0.01)
    gamma = K / (N - 1)
    assert bounds["eig_max"][1] > (1 + math.sqrt(gamma)) ** 2 > 1 > (1 - math.sqrt(gamma)) ** 2 > bounds["eig_min"][0]
    # norm_mean: E χ_K / √K, spread 3.5 standard errors of a mean of N χ_K / √K
    chi = stats.chi(K)
    lo, hi = bounds["norm_mean"]
    assert math.sqrt(lo * hi) == pytest.approx(chi.mean() / math.sqrt(K), rel=1e-12)
    assert math.log(hi / lo) / 2 == pytest.approx(3.5 * chi.std() / chi.mean() / math.sqrt(N), rel=1e-9)
    assert null_bounds(K + 1, K)["eig_min"][0] == 0.0  # γ >= 1: uninformative


def test_trust_formula_is_one_half_at_the_tolerance():
    report = gaussianity_report(_normal(1))
    assert trust_score(report) == 1.0
    assert weakest_diagnostic(report) == "none"
    report["mean_offset"] = null_bounds(N, K)["mean_offset"][1] + MEAN_TOL
    assert trust_score(report) == pytest.approx(0.5, abs=1e-12)
    assert weakest_diagnostic(report) == "mean_offset"
    report["mean_offset"] = null_bounds(N, K)["mean_offset"][1] + 2 * MEAN_TOL
    assert trust_score(report) == pytest.approx(0.2, abs=1e-12)
    assert set(trust_factors(report)) == set(TRUST_KEYS)


def test_deterministic_and_global_rng_untouched():
    z = _normal(3)
    before = torch.get_rng_state()
    first = gaussianity_report(z)
    second = gaussianity_report(z)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == second
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    gaussianity_report(z, generator=g)
    assert not torch.equal(g.get_state(), state)  # the caller's generator is the one used


def test_non_finite_rows_are_left_out():
    z = _normal(4)
    dirty = z.clone()
    dirty[7, 3] = float("nan")
    dirty[9, 0] = float("inf")
    clean = torch.cat([z[:7], z[8:9], z[10:]])
    assert gaussianity_report(dirty) == gaussianity_report(clean)
    assert gaussianity_report(dirty)["n_samples"] == N - 2


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        gaussianity_report(torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="at least 2 finite rows"):
        gaussianity_report(torch.full((5, 3), float("nan")))


def test_score_agreement_matches_scipy_with_ties_and_flags_disagreement():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(300, generator=g, dtype=torch.float64)
    scores = {
        "jepa_score": torch.round(base * 2) / 2,  # ties
        "log_density": base + 0.3 * torch.randn(300, generator=g, dtype=torch.float64),
        "knn": -base + 0.1 * torch.randn(300, generator=g, dtype=torch.float64),
    }
    agreement = score_agreement(scores)
    assert list(agreement) == ["jepa_score_vs_log_density", "jepa_score_vs_knn", "log_density_vs_knn"]
    for pair, rho in agreement.items():
        a, b = pair.split("_vs_")
        assert rho == pytest.approx(stats.spearmanr(scores[a].numpy(), scores[b].numpy())[0], abs=1e-12)
    assert agreement["jepa_score_vs_log_density"] > 0.8
    assert disagreement(agreement) == ["jepa_score_vs_knn", "log_density_vs_knn"]
    assert disagreement({"a_vs_b": DISAGREEMENT_THRESHOLD + 0.01}) == []
    # a non-finite row is left out of the pairs it appears in
    scores["knn"][0] = float("nan")
    kept = stats.spearmanr(scores["jepa_score"][1:].numpy(), scores["knn"][1:].numpy())[0]
    assert score_agreement(scores)["jepa_score_vs_knn"] == pytest.approx(kept, abs=1e-12)


# --- rows per dimension, unknown verdicts, encoder outputs at realistic K -------------------------


def test_trust_rows_is_four_per_dimension():
    assert MIN_ROWS_PER_DIM == 4
    assert trust_rows(384) == 1536 and trust_rows(1) == 4
    with pytest.raises(ValueError):
        trust_rows(0)


def _encoder_outputs(kind, n, k, seed=0):
    """Outputs of a random two-layer encoder on Gaussian inputs (D = 64): ``l2`` ends in an L2
    normalisation, ``low_rank`` goes through a K/4-wide bottleneck before a linear map to K."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    width = k // 4 if kind == "low_rank" else k
    h = torch.tanh(x @ torch.randn(64, width, generator=g) / 8.0)
    z = h @ (torch.randn(width, k, generator=g) / math.sqrt(width))
    z = (z - z.mean(0)) / z.std(0)
    return torch.nn.functional.normalize(z, dim=1) if kind == "l2" else z


@pytest.mark.parametrize("k", [256, 384])
def test_gaussian_l2_normalised_and_low_rank_at_4k_rows(k):
    n = trust_rows(k)
    gauss = gaussianity_report(torch.randn(n, k, generator=torch.Generator().manual_seed(k)))
    assert trust_score(gauss) >= 0.9
    l2 = gaussianity_report(_encoder_outputs("l2", n, k))
    assert l2["norm_mean"] == pytest.approx(1 / math.sqrt(k), rel=1e-5)
    assert 0.0 <= trust_score(l2) < TRUST_THRESHOLD  # a number, not NaN
    assert weakest_diagnostic(l2) in ("norm_mean", "eig_min")
    low = gaussianity_report(_encoder_outputs("low_rank", n, k))
    assert 0.0 <= trust_score(low) < TRUST_THRESHOLD
    assert weakest_diagnostic(low) == "eig_min"


@pytest.mark.parametrize("k", [16, 384])
def test_too_few_rows_give_unknown_never_high(k):
    z = torch.randn(4 * k, k, generator=torch.Generator().manual_seed(2))
    for n in (k // 4 + 2, k, k + 1):
        report = gaussianity_report(z[:n])
        assert math.isnan(trust_score(report))
        assert weakest_diagnostic(report).startswith("unknown (N ≤ K + 1")
        factors = trust_factors(report)
        assert math.isnan(factors["eig_min"]) and not math.isnan(factors["norm_mean"])
    assert trust_score(gaussianity_report(z[: k + 2])) > 0.9  # the first size with a verdict


def _minilm_like(n, k=384, seed=0, dead=3):
    """The pattern measured on all-MiniLM-L6-v2: RMS scale 0.27, an offset mean, a power-law
    spectrum (effective rank ≈ 0.12) and 3 exactly-dead output dimensions."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, k + 1, dtype=torch.float64) ** -0.6  # along the axes: every diagnostic but the
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * spectrum  # projections is rotation-invariant
    mu = torch.randn(k, generator=g, dtype=torch.float64)
    z = z / z.pow(2).sum(1).mean().sqrt() * 0.2 * math.sqrt(k) + mu / mu.norm() * 0.18 * math.sqrt(k)
    if dead:
        z[:, -dead:] = 0.0
    return z.float()


def test_minilm_like_embeddings_never_read_high():
    for n in (60, 200):  # the old rules read 1.000 and 0.998 here
        report = gaussianity_report(_minilm_like(n))
        assert report["norm_mean"] == pytest.approx(0.27, abs=0.02)
        assert not trust_score(report) >= TRUST_THRESHOLD
        assert weakest_diagnostic(report).startswith("unknown")
    for dead in (3, 0):
        report = gaussianity_report(_minilm_like(trust_rows(384), dead=dead))
        assert trust_score(report) < 0.1
        assert weakest_diagnostic(report) == "eig_min"  # dead dimensions, or the tail of the spectrum
        assert trust_factors(report)["norm_mean"] < 0.1  # the scale alone would read untrusted


def test_nan_diagnostic_is_unknown_unless_another_one_already_fails():
    report = gaussianity_report(_normal(1))
    assert trust_score(report) == 1.0
    blind = dict(report, shape_epps_pulley=float("nan"))
    assert math.isnan(trust_score(blind))
    assert weakest_diagnostic(blind) == "unknown (shape_epps_pulley undefined)"
    assert math.isnan(severities(blind)["shape_epps_pulley"])
    missing = {k: v for k, v in report.items() if k != "norm_mean"}  # e.g. an older logged report
    assert math.isnan(trust_score(missing))
    # another diagnostic past its doubt threshold: the verdict stands, the NaN cannot raise it
    failing = dict(blind, mean_offset=null_bounds(N, K)["mean_offset"][1] + 2 * MEAN_TOL)
    assert trust_score(failing) == pytest.approx(0.2, abs=1e-12)
    assert weakest_diagnostic(failing) == "mean_offset"
    # the case gaussianity_report produces: a zero covariance (shape undefined) caught by eig_min
    constant = gaussianity_report(torch.full((N, K), 0.3))
    assert math.isnan(constant["shape_epps_pulley"])
    assert trust_score(constant) < 1e-3 and weakest_diagnostic(constant) == "eig_min"
    assert math.isnan(trust_score({"mean_offset": 0.0}))


def test_rank_deficiency_systematic_only_when_one_count_dominates():
    dead = rank_deficiency(torch.tensor([3, 3, 3, 3, 4, 3, -1]), 384)
    assert dead == {"systematic": True, "typical_floored": 3, "fraction_rows": 5 / 6,
                    "min_floored": 3, "rank_dim": 384, "score_rank": 381, "rows": 6}
    local = rank_deficiency(torch.tensor([0, 2, 1, 0, 3, 2, 1, 0]), torch.full((8,), 16.0))
    assert not local["systematic"] and local["typical_floored"] == 0 and local["rank_dim"] == 16
    half = rank_deficiency(torch.tensor([1, 1, 0, 0]), 8)
    assert not half["systematic"] and half["fraction_rows"] == 0.5
    assert rank_deficiency(torch.tensor([1, 1, 0, 0]), 8, majority=0.4)["systematic"] is False  # tie -> smaller count
    assert rank_deficiency(torch.tensor([2, 2, 2, 0]), 8, majority=0.7)["systematic"]
    assert rank_deficiency(torch.tensor([2.0, 2.0, float("nan")]), 8)["rows"] == 2
    none = rank_deficiency(torch.tensor([], dtype=torch.long), 8)
    assert not none["systematic"] and none["rows"] == 0 and math.isnan(none["fraction_rows"])
    with pytest.raises(ValueError):
        rank_deficiency(torch.tensor([1, 1]), torch.tensor([8, 8, 8]))
