import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata as scipy_rankdata
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn

from jepa_monitor import score_samples
from jepa_monitor.baselines import KNNScore, MahalanobisScore
from jepa_monitor.evaluation import SCORE_NAMES, compare_scores, ood_metrics, rankdata, spearman


def _fpr95_by_hand(inl: np.ndarray, out: np.ndarray) -> float:
    # The highest threshold that keeps >= 95% of inliers is the ceil(0.95 n)-th largest inlier score.
    n_keep = -(-95 * len(inl) // 100)  # ceil(0.95 n) in integers
    threshold = np.sort(inl)[::-1][n_keep - 1]
    return float((out >= threshold).mean())


def _auroc_ref(inl, out):
    return roc_auc_score(np.r_[np.ones(len(inl)), np.zeros(len(out))], np.r_[inl, out])


def test_ood_metrics_match_sklearn_and_hand_fpr95():
    g = torch.Generator().manual_seed(0)
    inl = torch.randn(200, generator=g) + 1.0
    out = torch.randn(150, generator=g)
    m = ood_metrics(inl, out)
    assert m["auroc"].item() == pytest.approx(_auroc_ref(inl.numpy(), out.numpy()), abs=1e-6)
    assert m["fpr95"].item() == pytest.approx(_fpr95_by_hand(inl.numpy(), out.numpy()), abs=1e-6)
    assert 0.0 < m["fpr95"].item() < 1.0


def test_fpr95_for_every_small_set_size():
    g = torch.Generator().manual_seed(3)
    for n in range(1, 61):
        inl = torch.randn(n, generator=g) + 0.5
        out = torch.randn(17, generator=g)
        expected = _fpr95_by_hand(inl.numpy(), out.numpy())
        assert ood_metrics(inl, out)["fpr95"].item() == pytest.approx(expected, abs=1e-6), n


def test_ood_metrics_small_case_worked_by_hand():
    # 20 inliers 1..20, outliers at 0.5, 1.5, 2.5, 10.5: keeping 19 inliers needs threshold 2,
    # which keeps outliers 2.5 and 10.5 -> FPR95 = 2/4. AUROC: pairs (inlier > outlier):
    # 20 + 19 + 18 + 10 = 67 of 80.
    inl = torch.arange(1, 21, dtype=torch.float32)
    out = torch.tensor([0.5, 1.5, 2.5, 10.5])
    m = ood_metrics(inl, out)
    assert m["fpr95"].item() == pytest.approx(0.5)
    assert m["auroc"].item() == pytest.approx(67 / 80)


def test_large_log_densities_are_not_squashed_into_ties():
    # torchmetrics would apply a sigmoid to scores outside [0, 1]: sigmoid(-1000) == sigmoid(-900) == 0
    inl = torch.tensor([-900.0, -901.0, -902.0, -903.0])
    out = torch.tensor([-1000.0, -1001.0])
    m = ood_metrics(inl, out)
    assert m["auroc"].item() == 1.0
    assert m["fpr95"].item() == 0.0
    rev = ood_metrics(out, inl)
    assert rev["auroc"].item() == 0.0
    assert rev["fpr95"].item() == 1.0


def test_ties_count_half():
    inl = torch.tensor([1.0, 1.0, 2.0])
    out = torch.tensor([1.0, 0.0])
    m = ood_metrics(inl, out)
    assert m["auroc"].item() == pytest.approx(_auroc_ref(inl.numpy(), out.numpy()))
    # keeping >= 95% of inliers means threshold 1.0, which keeps the tied outlier
    assert m["fpr95"].item() == pytest.approx(0.5)


def test_nan_scores_are_left_out_with_a_warning_and_inf_is_kept():
    inl = torch.tensor([3.0, float("nan"), 4.0, float("inf")])
    out = torch.tensor([1.0, 3.5, float("-inf")])
    with pytest.warns(UserWarning, match="1 of 4 scores are NaN"):
        m = ood_metrics(inl, out)
    kept = np.array([3.0, 4.0, 1e30])
    assert m["auroc"].item() == pytest.approx(_auroc_ref(kept, np.array([1.0, 3.5, -1e30])))
    with pytest.warns(UserWarning):
        empty = ood_metrics(torch.tensor([float("nan")]), out)
    assert math.isnan(empty["auroc"].item()) and math.isnan(empty["fpr95"].item())
    with pytest.raises(ValueError, match="1-D"):
        ood_metrics(torch.zeros(3, 2), out)


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 6, (300,), generator=g).float()  # many ties
    b = a + torch.randn(300, generator=g) * 2
    b[::7] = b[0]
    expected = spearmanr(a.numpy(), b.numpy()).statistic
    assert spearman(a, b).item() == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(rankdata(a).numpy(), scipy_rankdata(a.numpy()))
    c = torch.randn(100, generator=g)
    assert spearman(c, -c**3).item() == pytest.approx(-1.0)


def test_spearman_nan_policies_and_constant_input():
    a = torch.tensor([1.0, 2.0, float("nan"), 4.0, 5.0])
    b = torch.tensor([2.0, 1.0, 3.0, 5.0, 4.0])
    assert math.isnan(spearman(a, b).item())
    keep = ~torch.isnan(a)
    expected = spearmanr(a[keep].numpy(), b[keep].numpy()).statistic
    assert spearman(a, b, nan_policy="omit").item() == pytest.approx(expected)
    assert math.isnan(spearman(torch.ones(5), b).item())
    with pytest.raises(ValueError, match="equal length"):
        spearman(a, b[:3])


def test_compare_scores_fits_baselines_on_the_reference_and_reports_every_score():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    ref = torch.randn(200, 3, generator=g)
    inl = torch.randn(100, 3, generator=g)
    out = torch.randn(80, 3, generator=g) + torch.tensor([6.0, -6.0, 6.0])
    result = compare_scores(encoder, ref, inl, out, knn_k=3)
    assert tuple(result) == SCORE_NAMES
    # independent recomputation of two columns
    z_ref = score_samples(encoder, ref).embedding
    s_in = score_samples(encoder, inl)
    s_out = score_samples(encoder, out)
    knn = KNNScore(3).fit(z_ref)
    maha = MahalanobisScore().fit(z_ref)
    for name, fn in (("knn", knn.score), ("mahalanobis", maha.score)):
        expected = _auroc_ref(fn(s_in.embedding).numpy(), fn(s_out.embedding).numpy())
        assert result[name]["auroc"].item() == pytest.approx(expected, abs=1e-6)
    expected = _auroc_ref(s_in.log_density.numpy(), s_out.log_density.numpy())
    assert result["log_density"]["auroc"].item() == pytest.approx(expected, abs=1e-6)
    assert result["knn"]["auroc"].item() > 0.9
