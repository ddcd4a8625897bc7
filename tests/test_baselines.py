import io
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf
from sklearn.neighbors import NearestNeighbors

from jepa_monitor.gaussian import ledoit_wolf_shrinkage
from jepa_monitor.baselines import (
    GaussianPriorScore,
    KNNScore,
    MahalanobisScore,
    gaussian_prior_score,
    knn_score,
    mahalanobis_fit,
    mahalanobis_score,
)


def _data(n, k, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) @ a + torch.randn(k, generator=g, dtype=torch.float64)
    return x.float()


def test_gaussian_prior_matches_scipy_logpdf():
    z = _data(50, 6, seed=1)
    expected = multivariate_normal(mean=np.zeros(6), cov=np.eye(6)).logpdf(z.double().numpy())
    np.testing.assert_allclose(gaussian_prior_score(z).numpy(), expected, rtol=1e-6, atol=1e-5)
    prior = GaussianPriorScore().fit(None)
    np.testing.assert_allclose(prior.score(z).numpy(), expected, rtol=1e-6, atol=1e-5)
    assert prior.state_dict() == {}


def test_mahalanobis_matches_scipy_with_mle_covariance():
    ref = _data(400, 5, seed=2)
    z = _data(30, 5, seed=3)
    mean, precision = mahalanobis_fit(ref, ridge=0.0)
    cov = np.cov(ref.double().numpy(), rowvar=False, bias=True)
    vi = np.linalg.inv(cov)
    mu = ref.double().numpy().mean(0)
    expected = np.array([-0.5 * mahalanobis(row, mu, vi) ** 2 for row in z.double().numpy()])
    got = mahalanobis_score(z, mean, precision)
    assert got.dtype == torch.float32 and mean.dtype == precision.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(MahalanobisScore(ridge=0.0).fit(ref).score(z).numpy(), expected, rtol=1e-5)


def test_ledoit_wolf_matches_sklearn():
    ref = _data(40, 12, seed=4)  # few rows for 12 dims: heavy shrinkage
    x = ref.double().numpy()
    cov_sk, s_sk = ledoit_wolf(x)
    centered = ref.double() - ref.double().mean(0)
    assert ledoit_wolf_shrinkage(centered) == pytest.approx(s_sk, rel=1e-10)
    _, precision = mahalanobis_fit(ref, shrinkage="ledoit_wolf", ridge=0.0)
    np.testing.assert_allclose(precision.numpy(), np.linalg.inv(cov_sk), rtol=1e-8)


def test_singular_reference_needs_the_ridge_and_shrinkage_fixes_it():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(100, 3, generator=g) @ torch.randn(3, 6, generator=g)  # rank 3 in 6 dims
    with pytest.raises(ValueError, match="shrinkage"):
        mahalanobis_fit(ref, ridge=0.0)
    mean, precision = mahalanobis_fit(ref, shrinkage=0.1)
    s = torch.linalg.eigvalsh(torch.linalg.inv(precision))
    cov = torch.cov(ref.double().T, correction=0)
    expected = 0.9 * cov + 0.1 * torch.diagonal(cov).mean() * (1 + 1e-6 / 0.1) * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.inv(precision), expected, rtol=1e-8, atol=1e-10)
    assert float(s.min()) > 0
    # the default ridge alone keeps a rank-deficient covariance invertible
    assert torch.isfinite(mahalanobis_fit(ref)[1]).all()


@pytest.mark.parametrize("k", [1, 5])
def test_knn_matches_sklearn_and_chunking_changes_nothing(k):
    ref = _data(300, 4, seed=6)
    z = _data(57, 4, seed=7)
    nn_ = NearestNeighbors(n_neighbors=k).fit(ref.double().numpy())
    dist, _ = nn_.kneighbors(z.double().numpy())
    expected = -dist[:, -1]
    np.testing.assert_allclose(knn_score(z, ref, k).numpy(), expected, rtol=1e-6)
    # a budget of 3 rows per chunk: 19 chunks, same numbers
    tiny = knn_score(z, ref, k, memory_bytes=3 * 8 * 300)
    torch.testing.assert_close(tiny, knn_score(z, ref, k), rtol=0, atol=0)
    np.testing.assert_allclose(KNNScore(k).fit(ref).score(z).numpy(), expected, rtol=1e-6)


def test_knn_score_is_exact_for_near_duplicates():
    # float32 cdist (matrix-product form) turns a 1e-4 distance into noise; float64 does not
    ref = torch.full((64, 8), 100.0)
    ref[:, 0] += torch.arange(64, dtype=torch.float32)
    z = ref[:1].clone()
    z[0, 1] += 1e-3
    assert knn_score(z, ref, 1).item() == pytest.approx(-1e-3, rel=1e-3)


def test_non_finite_rows_score_nan_and_leave_others_alone():
    ref = _data(100, 3, seed=8)
    z = _data(10, 3, seed=9)
    bad = z.clone()
    bad[2, 1] = float("nan")
    bad[5, 0] = float("inf")
    for baseline in (MahalanobisScore().fit(ref), KNNScore(3).fit(ref), GaussianPriorScore()):
        clean, dirty = baseline.score(z), baseline.score(bad)
        keep = torch.tensor([i not in (2, 5) for i in range(10)])
        torch.testing.assert_close(dirty[keep], clean[keep])
        assert torch.isnan(dirty[2]) or torch.isinf(dirty[2])
        assert not torch.isfinite(dirty[5])


def test_non_finite_reference_rows_are_dropped_with_a_warning():
    ref = _data(100, 3, seed=10)
    dirty = torch.cat([ref, torch.full((2, 3), float("nan"))])
    z = _data(10, 3, seed=11)
    with pytest.warns(UserWarning, match="dropped 2 of 102"):
        knn = KNNScore(2).fit(dirty)
    torch.testing.assert_close(knn.score(z), KNNScore(2).fit(ref).score(z))
    with pytest.warns(UserWarning, match="dropped 2 of 102"):
        maha = MahalanobisScore().fit(dirty)
    torch.testing.assert_close(maha.score(z), MahalanobisScore().fit(ref).score(z))


def test_state_dict_round_trip_through_torch_save():
    ref = _data(200, 4, seed=12)
    z = _data(20, 4, seed=13)
    for fitted, fresh in ((MahalanobisScore(shrinkage=0.2).fit(ref), MahalanobisScore()), (KNNScore(4).fit(ref), KNNScore(4))):
        buf = io.BytesIO()
        torch.save(fitted.state_dict(), buf)
        buf.seek(0)
        fresh.load_state_dict(torch.load(buf))
        torch.testing.assert_close(fresh.score(z), fitted.score(z), rtol=0, atol=0)
    with pytest.raises(KeyError, match="precision"):
        MahalanobisScore().load_state_dict({"mean": torch.zeros(4)})


def test_errors_name_the_problem():
    ref = _data(10, 4)
    with pytest.raises(RuntimeError, match="not fitted"):
        KNNScore().score(ref)
    with pytest.raises(RuntimeError, match="not fitted"):
        MahalanobisScore().score(ref)
    with pytest.raises(ValueError, match="k=11"):
        knn_score(ref, ref, 11)
    with pytest.raises(ValueError, match="same encoder"):
        knn_score(ref[:, :3], ref, 1)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        gaussian_prior_score(torch.zeros(5))
    with pytest.raises(ValueError, match="shrinkage"):
        mahalanobis_fit(ref, shrinkage=1.5)
    mean, precision = mahalanobis_fit(ref)
    with pytest.raises(ValueError, match="K=3"):
        mahalanobis_score(ref[:, :3], mean, precision)


def test_scores_are_higher_for_typical_points():
    ref = torch.randn(500, 2, generator=torch.Generator().manual_seed(14))
    z = torch.tensor([[0.0, 0.0], [6.0, 6.0]])
    for baseline in (MahalanobisScore().fit(ref), KNNScore().fit(ref), GaussianPriorScore()):
        s = baseline.score(z)
        assert s[0] > s[1] + 1.0
    assert math.isclose(gaussian_prior_score(z)[0].item(), -math.log(2 * math.pi), rel_tol=1e-6)
