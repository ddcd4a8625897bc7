import numpy as np
import pytest
import torch
from scipy import stats

from jepa_monitor.statistics import ks_statistic, quantiles, summarize, wasserstein_1


def _samples(seed, n, shift=0.0, scale=1.0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale + shift
    return x.round() if ties else x


@pytest.mark.parametrize(
    "na, nb, shift, scale, ties",
    [(50, 50, 0.0, 1.0, False), (17, 256, 0.7, 2.0, False), (300, 40, -3.0, 0.5, False), (60, 80, 0.3, 3.0, True)],
)
def test_distances_match_scipy(na, nb, shift, scale, ties):
    a = _samples(1, na, ties=ties)
    b = _samples(2, nb, shift, scale, ties=ties)
    ks = ks_statistic(a, b).item()
    w1 = wasserstein_1(a, b).item()
    assert ks == pytest.approx(stats.ks_2samp(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert w1 == pytest.approx(stats.wasserstein_distance(a.numpy(), b.numpy()), rel=1e-10, abs=1e-12)
    # symmetric, zero on identical samples, W1 of a pure shift is the shift
    assert ks_statistic(b, a).item() == pytest.approx(ks)
    assert ks_statistic(a, a).item() == 0.0
    assert wasserstein_1(a, a + 2.5).item() == pytest.approx(2.5, rel=1e-12)


def test_non_finite_values_are_left_out():
    a = _samples(3, 40)
    b = _samples(4, 30, 1.0)
    a_bad = torch.cat([a, torch.tensor([float("nan"), float("inf")], dtype=torch.float64)])
    assert ks_statistic(a_bad, b).item() == pytest.approx(stats.ks_2samp(a.numpy(), b.numpy()).statistic)
    assert wasserstein_1(a_bad, b).item() == pytest.approx(stats.wasserstein_distance(a.numpy(), b.numpy()))
    assert torch.isnan(ks_statistic(torch.tensor([float("nan")]), b))
    assert torch.isnan(wasserstein_1(torch.empty(0), b))


def test_summarize_against_numpy():
    x = _samples(5, 101, 3.0, 2.0).to(torch.float32)
    x_bad = torch.cat([x, torch.tensor([float("nan"), -float("inf")])])
    s = summarize(x_bad)
    ref = x.double().numpy()
    assert s["mean"].item() == pytest.approx(ref.mean(), rel=1e-12)
    assert s["std"].item() == pytest.approx(ref.std(ddof=1), rel=1e-12)
    for key, q in (("p1", 0.01), ("p5", 0.05), ("p50", 0.5), ("p95", 0.95)):
        assert s[key].item() == pytest.approx(np.quantile(ref, q), rel=1e-12)
    assert s["nonfinite"].item() == 2
    np.testing.assert_allclose(quantiles(x, [0.1, 0.9]).numpy(), np.quantile(ref, [0.1, 0.9]), rtol=1e-12)
    empty = summarize(torch.tensor([float("nan")]))
    assert torch.isnan(empty["mean"]) and torch.isnan(empty["p50"]) and empty["nonfinite"].item() == 1
