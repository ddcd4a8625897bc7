"""The exact score against independent references: float64 brute force and analytic cases.

Reference = per-sample ``torch.autograd.functional.jacobian`` of a float64 copy of the eval-mode
model, ``torch.linalg.svdvals``, same floor rule (see conftest.py). The scorer computes the Jacobian
in float32 and its Gram in float64, so agreement is limited by fp32 forward/backward rounding: on the
well-conditioned models below the measured error is 2e-7..3.5e-6 nats, asserted at 5e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jepa_monitor import jepa_score, log_density, score_samples
from jepa_monitor.jacobian import embedding_and_jacobian

ATOL = 5e-5  # nats; fp32 Jacobian on well-conditioned models (measured max 3.5e-6)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(d: int, k: int, hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k))


class SmallCNN(nn.Module):
    def __init__(self, k: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.GELU(),
            nn.Flatten(), nn.Linear(6 * 4 * 4, k),
        )

    def forward(self, x):
        return self.body(x)


class SDPABlock(nn.Module):
    """One attention block on (B, T, E) tokens through F.scaled_dot_product_attention."""

    def __init__(self, e: int = 8, k: int = 6, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(e, 3 * e)
        self.proj = nn.Linear(e, e)
        self.norm = nn.LayerNorm(e)
        self.out = nn.Linear(e, k)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, e)
        return self.out(x + self.proj(a))


def _check_against(brute_force, model, x, *, head=None, atol=ATOL, **options):
    got = score_samples(model, x, **options)
    rel = None if options.get("paper") else options.get("rel_floor", 1e-6)
    ref, ref_floored, _ = brute_force(model, x, head=head, rel_floor=rel, abs_floor=1e-6 if options.get("paper") else None)
    err = (got.jepa_score.double() - ref).abs().max().item()
    print(f"max |exact - float64 brute force| = {err:.2e} nats")
    assert err < atol
    assert torch.equal(got.n_floored, ref_floored)
    return got, ref


def test_mlp_k_less_than_d(brute_force):
    model = _mlp(24, 8)
    x = torch.randn(6, 24, generator=_gen(1))
    got, _ = _check_against(brute_force, model, x)
    assert got.rank_dim == 8 and got.input_dim == 24
    assert (got.n_floored == 0).all()


def test_mlp_k_greater_than_d(brute_force):
    model = _mlp(6, 16)
    x = torch.randn(6, 6, generator=_gen(2))
    got, _ = _check_against(brute_force, model, x)
    assert got.rank_dim == 6 and got.embed_dim == 16


def test_cnn_with_train_mode_batchnorm_scores_the_eval_function(brute_force):
    torch.manual_seed(3)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    model.train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(5, 1, 8, 8, generator=_gen(4))
    _check_against(brute_force, model, x, batch_size=5)
    # Scoring a single sample alone gives the same number: no batch statistics were used.
    one = jepa_score(model, x[2:3])
    assert torch.allclose(one, jepa_score(model, x, batch_size=5)[2:3], rtol=1e-6, atol=0)
    assert model.training and all(m.training for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n


@pytest.mark.parametrize("pool", ["mean", "first"])
def test_attention_tokens_pooled(brute_force, pool):
    torch.manual_seed(5)
    model = SDPABlock()
    x = torch.randn(4, 5, 8, generator=_gen(6))
    head = (lambda out: out.mean(1)) if pool == "mean" else (lambda out: out[:, 0])
    got, _ = _check_against(brute_force, model, x, head=head, pool=pool)
    assert got.input_dim == 40 and got.embed_dim == 6
    # Reverse mode through SDPA has no vmap rule on CPU: the vectorized request falls back.
    vec = score_samples(model, x, pool=pool, vectorize=4)
    assert torch.allclose(vec.jepa_score, got.jepa_score, rtol=1e-6, atol=0)


def _bottleneck(d: int, r: int, k: int, seed: int = 7) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, r), nn.Linear(r, k))


def test_rank_deficient_encoder_counts_floored_values(brute_force):
    model = _bottleneck(24, 3, 8)
    x = torch.randn(5, 24, generator=_gen(8))
    got, ref = _check_against(brute_force, model, x)
    assert (got.n_floored == 8 - 3).all()
    # The 5 missing directions each contribute log(1e-6·σ_max) ≈ -13.8 + log σ_max.
    _, _, svals = brute_force(model, x)
    smax = torch.stack([s.max() for s in svals])
    top3 = torch.stack([s[:3].log().sum() for s in svals])
    assert torch.allclose(ref, top3 + 5 * (math.log(1e-6) + smax.log()), atol=1e-9)


def test_paper_mode_against_its_own_reference(brute_force):
    # σ_max of this model is O(1), so fp32 noise (~1e-7·σ_max) stays below the absolute clip.
    model = _bottleneck(24, 3, 8)
    x = torch.randn(5, 24, generator=_gen(9))
    got, _ = _check_against(brute_force, model, x, paper=True)
    assert (got.n_floored == 5).all()
    full = _mlp(24, 8)
    got_full, _ = _check_against(brute_force, full, x, paper=True)
    assert (got_full.n_floored == 0).all()


def test_micro_batching_and_vectorize_agree():
    model = _mlp(20, 8)
    x = torch.randn(7, 20, generator=_gen(10))
    base = score_samples(model, x, batch_size=7)
    for options in ({"batch_size": 1}, {"batch_size": 3}, {}, {"vectorize": 8}, {"vectorize": 3, "batch_size": 2}):
        other = score_samples(model, x, **options)
        # Bitwise equality is not attainable: BLAS picks different kernels (gemv vs gemm) for
        # different micro-batch sizes. Measured difference: at most 1 float32 ulp.
        assert torch.allclose(other.jepa_score, base.jepa_score, rtol=2e-7, atol=0), options
        assert torch.allclose(other.embedding, base.embedding, rtol=1e-6, atol=1e-7), options
        assert torch.equal(other.n_floored, base.n_floored)


@pytest.mark.parametrize("k,d", [(5, 12), (9, 4)])
def test_linear_map_gives_constant_sum_of_log_singular_values(k, d):
    torch.manual_seed(11)
    lin = nn.Linear(d, k)
    expected = torch.linalg.svdvals(lin.weight.detach().double()).log().sum().item()
    x = torch.randn(6, d, generator=_gen(12)) * 3
    s = jepa_score(lin, x)
    assert (s.double() - expected).abs().max().item() < 1e-5
    # In float64 the Jacobian is W itself: equal to rounding of the float32 output.
    s64 = jepa_score(lin.double(), x.double())
    assert (s64.double() - expected).abs().max().item() < 1e-6


class GaussianizeExpLogistic(nn.Module):
    """x1 ~ Exponential(1), x2 ~ Logistic(0, 1), independent: f = Φ⁻¹∘F per coordinate."""

    def forward(self, x):
        u1 = -torch.expm1(-x[:, 0])  # F_exp(x1)
        u2 = torch.sigmoid(x[:, 1])  # F_logistic(x2)
        return torch.stack([torch.special.ndtri(u1), torch.special.ndtri(u2)], dim=1)


def _true_log_p(x: torch.Tensor) -> torch.Tensor:
    return -x[:, 0] + F.logsigmoid(x[:, 1]) + F.logsigmoid(-x[:, 1])


def test_exact_gaussianizing_map_gives_true_log_density():
    g = _gen(13)
    x1 = torch.empty(200, dtype=torch.float64).exponential_(1.0, generator=g)
    u = torch.rand(200, dtype=torch.float64, generator=g).clamp(1e-6, 1 - 1e-6)
    x2 = torch.log(u) - torch.log1p(-u)  # logistic quantile
    x = torch.stack([x1, x2], dim=1)
    model = GaussianizeExpLogistic()
    got = log_density(model, x)
    err = (got.double() - _true_log_p(x)).abs().max().item()
    print(f"max |log_density - log p| = {err:.2e}")
    assert err < 1e-6
    # The core computes in the input's dtype: a float64 model gets a float64 Jacobian.
    z, jac = embedding_and_jacobian(model, x[:3])
    assert z.dtype == torch.float64 and jac.dtype == torch.float64
    scores = score_samples(model, x)
    assert torch.allclose(scores.log_density, scores.jepa_score + scores.log_prior, atol=1e-5)


def test_ill_conditioned_mlp_fp32_jacobian_error(brute_force):
    """Measure (and loosely bound) the fp32-Jacobian / float64-Gram error when κ(J) ~ 1e3..1e4."""
    torch.manual_seed(14)
    d, k, h = 64, 16, 64
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))
    with torch.no_grad():
        for lin, n in ((model[0], h), (model[2], k)):
            u, _, v = torch.linalg.svd(lin.weight, full_matrices=False)
            lin.weight.copy_(u @ torch.diag(torch.logspace(0, -3, min(lin.weight.shape))) @ v)
    x = torch.randn(8, d, generator=_gen(15))
    got = score_samples(model, x)
    ref, ref_floored, svals = brute_force(model, x)
    cond = max((s.max() / s.min()).item() for s in svals)
    err = (got.jepa_score.double() - ref).abs().max().item()
    print(f"ill-conditioned MLP (max κ(J) = {cond:.1e}): max |fp32 - float64| = {err:.2e} nats")
    assert cond > 1e3
    assert torch.equal(got.n_floored, ref_floored)
    assert err < 0.05


def test_batched_jacobian_rows_equal_the_loop():
    # Called directly so that a silent fallback to the loop cannot make this pass.
    from jepa_monitor.jacobian import _vjp_rows_batched, _vjp_rows_loop

    model = _mlp(20, 8)
    x = torch.randn(7, 20, generator=_gen(16)).requires_grad_(True)
    z = model(x)
    batched, loop = torch.empty(7, 8, 20), torch.empty(7, 8, 20)
    _vjp_rows_batched(z, x, batched, 3)
    _vjp_rows_loop(z, x, loop)
    assert torch.allclose(batched, loop, rtol=1e-6, atol=1e-7)


def test_default_floor_separates_fp32_noise_from_the_rank_at_d784():
    """An exactly rank-8 Jacobian at D = 784: fp32 rounding leaves spurious singular values
    (measured ≤ 2.4e-7·σ_max up to D = 3072, 12 residual layers, L2-normalised outputs), which
    the default rel_floor = 1e-6 must all catch while keeping the 8 genuine ones."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(784, 64), nn.GELU(), nn.Linear(64, 8), nn.Linear(8, 16))
    x = torch.randn(4, 784, generator=_gen(18))
    z, jac = embedding_and_jacobian(model.eval(), x)
    sigma = torch.linalg.svdvals(jac.double())  # of the fp32 Jacobian, in float64
    relative = sigma / sigma[:, :1]
    print(f"D=784: 8th σ/σ_max ≥ {relative[:, 7].min():.1e}, spurious ≤ {relative[:, 8:].max():.1e}")
    assert relative[:, 8:].max() < 1e-6 < relative[:, 7].min()
    assert (score_samples(model, x).n_floored == 8).all()
