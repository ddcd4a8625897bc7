"""Stochastic Lanczos quadrature against float64 brute force, Hutchinson references and scipy."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from jepa_monitor import score_samples
from jepa_monitor.approx import slq_chunk
from jepa_monitor.evaluation import CalibrationReport, calibrate
from jepa_monitor.jacobian import NotDifferentiableError


# Tiny tensors: on a busy 2-core machine a second intra-op thread only spins (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def brute_gram(encoder, x):
    """(B, n, n) float64 Gram of the per-sample input Jacobian, n = min(K, D)."""
    grams = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: encoder(v[None])[0], row).reshape(-1, row.numel())
        jac = jac.to(torch.float64)
        grams.append(jac @ jac.T if jac.shape[0] <= jac.shape[1] else jac.T @ jac)
    return torch.stack(grams)


def rademacher(num, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (num, dim), generator=gen).to(torch.float64) * 2 - 1


def hutchinson_reference(grams, probes, rel_floor=1e-6):
    """½·mean_v vᵀ log(max(G, floor)) v and mean_v vᵀ 1[G < floor] v, from eigh."""
    eig, vecs = torch.linalg.eigh(grams)
    eig = eig.clamp_min(0.0)
    floor = rel_floor**2 * eig[:, -1:]
    proj = torch.einsum("bji,pj->pbi", vecs, probes).square()  # (P, B, n): (Uᵀv)²
    logdet = 0.5 * (proj * torch.maximum(eig, floor).log()).sum(-1).mean(0)
    count = (proj * (eig < floor)).sum(-1).mean(0)
    return logdet, count


class Bottleneck(nn.Module):
    """K = 6 outputs through a 3-wide layer: rank 3, three singular values exactly zero."""

    def __init__(self, d=10, k=6):
        super().__init__()
        self.a, self.b = nn.Linear(d, 3), nn.Linear(3, k)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def mlp(d, h, k):
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))


@pytest.mark.parametrize(
    "make, d",
    [(lambda: mlp(12, 24, 5), 12), (lambda: mlp(4, 16, 9), 4), (lambda: Bottleneck(), 10)],
    ids=["K<D", "K>D", "rank-deficient"],
)
def test_full_krylov_equals_hutchinson_on_brute_force_gram(make, d):
    torch.manual_seed(0)
    enc = make().double()
    x = torch.randn(4, d, dtype=torch.float64)
    grams = brute_gram(enc, x)
    n = grams.shape[-1]
    probes = rademacher(6, n, seed=3)
    ref, ref_count = hutchinson_reference(grams, probes)

    got = score_samples(enc, x, method="slq", approx_options=dict(num_probes=6, lanczos_steps=n + 5, seed=3))
    torch.testing.assert_close(got.jepa_score.double(), ref, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(got.n_floored, ref_count.round().long())
    if isinstance(enc, Bottleneck):
        assert (got.n_floored == 3).all()  # the estimate of the count is exact for a full Krylov space
    # Not a tautology: with the full Krylov space the only error left is Hutchinson's.
    exact = score_samples(enc, x).jepa_score
    assert not torch.allclose(got.jepa_score, exact, atol=1e-3)


def test_unbiased_on_a_linear_map():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(8, 20, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 20, dtype=torch.float64)
    enc = nn.Linear(20, 8, bias=False).double()
    with torch.no_grad():
        enc.weight.copy_(a)
    truth = torch.linalg.svdvals(a).log().sum()
    probes = 3000
    got = score_samples(
        enc, torch.zeros(1, 20, dtype=torch.float64), method="slq",
        approx_options=dict(num_probes=probes, lanczos_steps=8),
    ).jepa_score.double()
    # Var(vᵀMv) = 2·Σ_{i≠j} M_ij² for Rademacher v; the score is ½·mean over probes.
    eig, vecs = torch.linalg.eigh(a @ a.T)
    log_g = vecs @ torch.diag(eig.log()) @ vecs.T
    std = 0.5 * math.sqrt(2 * (log_g.square().sum() - log_g.diagonal().square().sum()) / probes)
    assert std > 0.01
    assert abs(float(got) - float(truth)) < 4 * std


def well_conditioned_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 128), nn.Tanh(), nn.Linear(128, 64))
    with torch.no_grad():
        net[0].weight.mul_(3.0)  # strong, sample-dependent tanh saturation: scores that differ
    return net


def test_ranks_like_exact_on_a_well_conditioned_mlp():
    net = well_conditioned_mlp()
    x = torch.randn(48, 96, generator=torch.Generator().manual_seed(2))
    exact = score_samples(net, x).jepa_score
    # Hutchinson's variance, not Lanczos, limits the ranking here: the default 8 probes gave 0.94,
    # 32 probes 0.97 (24 steps already converge: 64 steps changed nothing).
    approx = score_samples(net, x, method="slq", approx_options=dict(num_probes=32)).jepa_score
    rho = scipy.stats.spearmanr(exact.numpy(), approx.numpy()).statistic
    assert exact.std() > 1.0  # a spread worth ranking
    assert rho >= 0.95


def test_deterministic_and_leaves_global_rng_alone():
    net = mlp(30, 40, 16)
    x = torch.randn(6, 30)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    opts = dict(num_probes=3, lanczos_steps=5, seed=7)
    first = score_samples(net, x, method="slq", approx_options=opts).jepa_score
    again = score_samples(net, x, method="slq", approx_options=opts).jepa_score
    other = score_samples(net, x, method="slq", approx_options={**opts, "seed": 8}).jepa_score
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Probes are shared by all samples, whatever the micro-batching.
    split = score_samples(net, x, method="slq", approx_options=opts, batch_size=2).jepa_score
    torch.testing.assert_close(split, first, atol=1e-4, rtol=1e-5)


class TinyViT(nn.Module):
    """Patch embedding + one attention block through F.scaled_dot_product_attention (4-D heads)."""

    def __init__(self, dim=16, heads=2, k=6):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, k)
        self.heads = heads

    def forward(self, img):
        t = self.patch(img).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(t + self.proj(a)).mean(1)


def test_attention_without_forward_mode_uses_the_fallback():
    torch.manual_seed(0)
    vit = TinyViT().eval()
    x = torch.randn(3, 1, 8, 8)
    # The fused CPU kernel has neither a forward-mode rule nor a double backward.
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(vit, (x,), (torch.ones_like(x),))
    leaf = x.clone().requires_grad_(True)
    z = vit(leaf)
    w = torch.zeros_like(z, requires_grad=True)
    (g,) = torch.autograd.grad(z, leaf, w, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g, w, torch.ones_like(g))
    grams = brute_gram(vit, x)
    probes = rademacher(4, 6, seed=0)
    ref, _ = hutchinson_reference(grams, probes)
    got = score_samples(vit, x, method="slq", approx_options=dict(num_probes=4, lanczos_steps=6))
    torch.testing.assert_close(got.jepa_score.double(), ref, atol=2e-3, rtol=1e-4)


class OnceDifferentiableTanh(torch.autograd.Function):
    """A custom op whose backward cannot be differentiated again, but which has a forward-mode rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


def test_forward_mode_fallback_for_ops_without_double_backward():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(10, 20).double(), nn.Linear(20, 4).double()
    x = torch.randn(5, 10, dtype=torch.float64)
    opts = dict(num_probes=4, lanczos_steps=4)
    plain = score_samples(lambda v: lin2(torch.tanh(lin1(v))), x, method="slq", approx_options=opts)
    custom = score_samples(lambda v: lin2(OnceDifferentiableTanh.apply(lin1(v))), x, method="slq", approx_options=opts)
    torch.testing.assert_close(custom.jepa_score, plain.jepa_score, atol=1e-9, rtol=1e-9)


def test_token_ids_through_input_module():
    torch.manual_seed(0)
    emb, body = nn.Embedding(20, 6), mlp(6, 12, 4)

    def encoder(ids):
        return body(emb(ids)).mean(1)

    ids = torch.randint(0, 20, (3, 5))
    opts = dict(num_probes=3, lanczos_steps=4)
    got = score_samples(encoder, ids, method="slq", input_module=emb, approx_options=opts)
    direct = score_samples(lambda e: body(e).mean(1), emb(ids).detach(), method="slq", approx_options=opts)
    torch.testing.assert_close(got.jepa_score, direct.jepa_score)
    assert got.input_dim == 30


def test_non_finite_row_is_isolated_and_inference_mode_is_fine():
    net = mlp(8, 16, 4)
    x = torch.randn(4, 8)
    opts = dict(num_probes=3, lanczos_steps=4)
    clean = score_samples(net, x, method="slq", approx_options=opts).jepa_score
    bad = x.clone()
    bad[1, 2] = float("nan")
    got = score_samples(net, bad, method="slq", approx_options=opts).jepa_score
    assert torch.isnan(got[1])
    torch.testing.assert_close(got[[0, 2, 3]], clean[[0, 2, 3]])
    with torch.inference_mode():
        inside = score_samples(net, x, method="slq", approx_options=opts).jepa_score
    torch.testing.assert_close(inside, clean)


def test_chunk_contract_matches_the_exact_chunk():
    net = mlp(8, 16, 4)
    x = torch.randn(3, 8)
    z, s, floored, d = slq_chunk(net, x, output=None, pool="mean", input_module=None, rel_floor=1e-6, abs_floor=None)
    assert z.shape == (3, 4) and not z.requires_grad
    assert s.dtype == torch.float64 and s.shape == (3,)
    assert floored.dtype == torch.int64 and floored.shape == (3,)
    assert d == 8
    with pytest.raises(ValueError, match="num_probes"):
        score_samples(net, x, method="slq", approx_options=dict(num_probes=0))


def test_calibrate_reports_numbers_that_match_scipy():
    net = well_conditioned_mlp()
    x = torch.randn(24, 96, generator=torch.Generator().manual_seed(4))
    good = dict(num_probes=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = calibrate(net, x, approx_options=good)
    assert isinstance(report, CalibrationReport)
    exact = score_samples(net, x).jepa_score.double().numpy()
    approx = score_samples(net, x, method="slq", approx_options=good).jepa_score.double().numpy()
    assert report.n == 24
    assert report.spearman == pytest.approx(scipy.stats.spearmanr(approx, exact).statistic, abs=1e-9)
    assert report.mean_bias == pytest.approx(np.mean(approx - exact), abs=1e-5)
    assert report.max_abs_error == pytest.approx(np.max(np.abs(approx - exact)), abs=1e-5)
    assert report.ok and report.spearman >= 0.9
    # Two probes, six steps: too noisy to rank (Spearman 0.79 here), and calibrate says so.
    with pytest.warns(UserWarning, match="Spearman"):
        poor = calibrate(net, x, approx_options=dict(num_probes=2, lanczos_steps=6))
    assert not poor.ok and poor.spearman < 0.9


def test_zero_jacobian_and_input_free_graph_follow_the_exact_path():
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 6)
    opts = dict(num_probes=2, lanczos_steps=3)
    zero = score_samples(lambda v: 0 * lin(v), x, method="slq", approx_options=opts)
    exact = score_samples(lambda v: 0 * lin(v), x)
    assert torch.equal(zero.jepa_score, exact.jepa_score)  # -inf
    assert torch.equal(zero.n_floored, exact.n_floored)  # all 3
    with pytest.raises(NotDifferentiableError):
        score_samples(lambda v: lin.weight.sum() + 0 * v[:, :3].detach(), x, method="slq")
