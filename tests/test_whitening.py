import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf
from torch import nn

from jepa_monitor import score_samples
from jepa_monitor.whitening import Whitening, WhitenedEncoder, whitened_components


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _anisotropic(n, k, seed):
    g = _gen(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ mix + torch.randn(k, generator=g, dtype=torch.float64)


def _mlp(d, k, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, k)).double()


def test_fit_without_shrinkage_is_the_maximum_likelihood_gaussian():
    z = _anisotropic(300, 5, 0)
    w = Whitening.fit(z, shrinkage=0.0)
    ref = z.numpy()
    np.testing.assert_allclose(w.mean.numpy(), ref.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.covariance.numpy(), np.cov(ref, rowvar=False, bias=True), rtol=1e-12, atol=1e-12)
    u = w.transform(z)
    np.testing.assert_allclose(u.mean(0).numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose((u.T @ u / len(u)).numpy(), np.eye(5), atol=1e-10)
    assert w.half_logdet == pytest.approx(0.5 * np.linalg.slogdet(np.cov(ref, rowvar=False, bias=True))[1], abs=1e-10)


def test_auto_shrinkage_is_ledoit_wolf():
    z = _anisotropic(40, 12, 1)  # few rows for the dimension: shrinkage matters
    w = Whitening.fit(z)
    cov_ref, alpha_ref = ledoit_wolf(z.numpy())
    assert 0.0 < alpha_ref < 1.0
    assert w.shrinkage == pytest.approx(alpha_ref, rel=1e-10)
    np.testing.assert_allclose(w.covariance.numpy(), cov_ref, rtol=1e-10, atol=1e-12)


def test_log_prob_matches_torch_multivariate_normal():
    z = _anisotropic(200, 4, 2)
    w = Whitening.fit(z, shrinkage=0.1)
    mvn = torch.distributions.MultivariateNormal(w.mean, covariance_matrix=w.covariance)
    x = _anisotropic(7, 4, 3)
    torch.testing.assert_close(w.log_prob(x), mvn.log_prob(x), rtol=0, atol=1e-10)
    state = Whitening.from_state_dict(w.state_dict())
    torch.testing.assert_close(state.log_prob(x), w.log_prob(x), rtol=0, atol=0)


def test_singular_and_collapsed_references():
    g = _gen(4)
    rank2 = torch.randn(100, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="shrinkage"):
        Whitening.fit(rank2, shrinkage=0.0)
    w = Whitening.fit(rank2)  # Ledoit-Wolf makes it positive definite
    assert w.shrinkage > 0 and torch.isfinite(w.log_prob(rank2)).all()
    with pytest.raises(ValueError, match="collapsed"):
        Whitening.fit(torch.full((50, 3), 0.7))
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        w.log_prob(torch.zeros(3, 4))


def test_whitened_components_equal_brute_force_scoring_of_the_whitened_encoder():
    d, k = 6, 3
    enc = _mlp(d, k, 5)
    g = _gen(5)
    with torch.no_grad():
        reference = enc(torch.randn(400, d, generator=g, dtype=torch.float64))
    w = Whitening.fit(reference, shrinkage=0.0)
    assert abs(w.half_logdet) > 1.0  # otherwise a missing shift would go unnoticed
    x = torch.randn(20, d, generator=g, dtype=torch.float64)
    iso = score_samples(enc, x)
    brute = score_samples(WhitenedEncoder(enc, w), x)
    jw, pw, dw = whitened_components(iso, w)
    torch.testing.assert_close(jw, brute.jepa_score, rtol=0, atol=1e-4)
    torch.testing.assert_close(pw, brute.log_prior, rtol=0, atol=1e-4)
    torch.testing.assert_close(dw, brute.log_density, rtol=0, atol=1e-4)
    # the shift is the constant -½ logdet Σ and the prior term changed to the Mahalanobis one
    torch.testing.assert_close(jw - iso.jepa_score, torch.full_like(jw, -w.half_logdet), rtol=0, atol=1e-4)
    assert (pw - iso.log_prior).std() > 0.1


def test_more_embedding_dims_than_inputs_is_refused_because_the_shift_varies():
    d, k = 3, 5
    enc = _mlp(d, k, 6)
    g = _gen(6)
    with torch.no_grad():
        reference = enc(torch.randn(400, d, generator=g, dtype=torch.float64))
    w = Whitening.fit(reference)
    x = torch.randn(30, d, generator=g, dtype=torch.float64)
    iso = score_samples(enc, x)
    with pytest.raises(ValueError, match="WhitenedEncoder"):
        whitened_components(iso, w)
    exact = score_samples(WhitenedEncoder(enc, w), x)
    shift = (exact.jepa_score - iso.jepa_score).double()
    assert shift.std() > 1e-2  # not a constant: why whitened_components cannot do it


def _exact_moments(n, k, seed):
    """n rows with sample mean exactly 0 and sample (1/n) covariance exactly I."""
    e = torch.randn(n, k, generator=_gen(seed), dtype=torch.float64)
    e = e - e.mean(0)
    chol = torch.linalg.cholesky(e.T @ e / n)
    return torch.linalg.solve_triangular(chol, e.T, upper=False).T


def test_linear_gaussian_model_whitened_log_density_is_the_true_log_density():
    k = 4
    g = _gen(7)
    a = torch.randn(k, k, generator=g, dtype=torch.float64) + 2 * torch.eye(k, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    c = torch.randn(k, k, generator=g, dtype=torch.float64)  # an arbitrary affine after the inverse
    dvec = 3 * torch.randn(k, generator=g, dtype=torch.float64)
    encoder = nn.Linear(k, k).double()
    with torch.no_grad():
        a_inv = torch.linalg.inv(a)
        encoder.weight.copy_(c @ a_inv)
        encoder.bias.copy_(dvec - c @ a_inv @ b)
    # x = A ε + b; the reference has the model's exact moments so the fit is the true Gaussian
    x_ref = _exact_moments(500, k, 8) @ a.T + b
    with torch.no_grad():
        w = Whitening.fit(encoder(x_ref), shrinkage=0.0)
    x = torch.randn(50, k, generator=g, dtype=torch.float64) @ a.T + b
    truth = torch.distributions.MultivariateNormal(b, covariance_matrix=a @ a.T).log_prob(x)
    scores = score_samples(encoder, x)
    _, _, log_density_w = whitened_components(scores, w)
    torch.testing.assert_close(log_density_w.double(), truth, rtol=0, atol=2e-5)
    assert (scores.log_density.double() - truth).abs().max() > 1.0


def test_log_density_whitening_option_matches_whitened_components():
    # K <= D: the option (whitened encoder scored end to end) and the closed-form constant shift
    # of an isotropic pass must agree; the prior becomes the Mahalanobis term.
    from jepa_monitor import Whitening, log_density, score_samples, whitened_components

    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))
    ref = torch.randn(200, 12, generator=gen)
    x = torch.randn(7, 12, generator=gen)
    w = Whitening.fit(score_samples(model, ref).embedding)
    via_option = score_samples(model, x, whitening=w)
    _, prior_w, density_w = whitened_components(score_samples(model, x), w)
    assert torch.allclose(via_option.log_prior, prior_w, atol=1e-4)
    assert torch.allclose(via_option.log_density, density_w, atol=1e-3)
    assert torch.allclose(log_density(model, x, whitening=w), density_w, atol=1e-3)
    assert model[0].training  # the user's module got its mode back
