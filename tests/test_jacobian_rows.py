"""Jacobian rows: loop vs batched vs the cached "auto" choice, and the memory-bounded Gram.

References: the row loop (one backward per row) and ``logdet.gram`` of the whole Jacobian, and a
float64 brute force (``torch.autograd.functional.jacobian`` + ``svdvals``) for the final score.
No timing is asserted: "auto" is tested with its clock replaced, so both outcomes are exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from jepa_monitor import jacobian as jac_mod
from jepa_monitor._guards import scoring_context
from jepa_monitor.jacobian import (
    _Rows,
    cached_vectorize_decisions,
    clear_vectorize_cache,
    _replicator,
    differentiable_forward,
    embedding_and_gram,
    embedding_and_jacobian,
    full_jacobian_bytes,
    plan_rows,
)
from jepa_monitor.logdet import gram, half_logdet
from test_scoring_exact import SmallCNN


# Tiny tensors: on a busy 2-core machine a second intra-op thread only spins (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(d: int = 48, k: int = 12, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, k)).eval()


BNCNN = SmallCNN  # conv + BatchNorm (eval mode) from the exact-scoring tests


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    model = BNCNN()
    with torch.no_grad():  # non-trivial running statistics, then eval
        for _ in range(2):
            model(2 * torch.randn(8, 1, 8, 8) + 0.3)
    return model.eval()


CASES = {
    "mlp": (_mlp, lambda: torch.randn(6, 48, generator=_gen(2))),
    "cnn_bn_eval": (_cnn, lambda: torch.randn(6, 1, 8, 8, generator=_gen(3))),
}


def _row_bytes(b: int, d: int) -> int:
    """Budget bytes one Jacobian row of b samples takes: float32 + its float64 column chunk."""
    return b * (4 * d + 8 * -(-d // jac_mod.COLUMN_CHUNKS))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _loop_reference(model, x, **kw):
    with scoring_context(model, x.device):
        z, jac = embedding_and_jacobian(model, x, vectorize=None, **kw)
    return z, jac, gram(jac)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("width", [3, 16])
@pytest.mark.parametrize("kind", ["batched", "replicated"])
def test_batched_and_replicated_rows_equal_the_loop(case, width, kind):
    build, data = CASES[case]
    model, x = build(), data()
    z_ref, jac_ref, g_ref = _loop_reference(model, x)
    with scoring_context(model, x.device):
        leaf, z = differentiable_forward(model, x, output=None, pool="mean", input_module=None)
        replicated = _replicator(model, x, output=None, pool="mean", input_module=None, encoder_kwargs=None)
        rows = _Rows(z, leaf, (kind, width), replicated)
        got = torch.empty_like(jac_ref)
        rows.fill(got, 0)
        # Still batched/replicated: a silent fallback to the loop cannot make this pass.
        assert rows.mode == (kind, width)
        _, g, d = embedding_and_gram(model, x, vectorize=width if kind == "batched" else kind)
    assert _rel(got, jac_ref) <= 1e-6
    assert _rel(g, g_ref) <= 1e-6
    assert d == jac_ref.shape[-1]


@pytest.mark.parametrize("case,faster", [("mlp", "loop"), ("mlp", "batched"), ("cnn_bn_eval", "batched"),
                                         ("mlp", "replicated"), ("cnn_bn_eval", "replicated")])
def test_auto_measures_once_keeps_the_rng_and_matches_the_loop(monkeypatch, case, faster):
    build, data = CASES[case]
    model, x = build(), data()
    _, _, g_ref = _loop_reference(model, x)
    clear_vectorize_cache()
    measured = []
    original = _Rows._decide

    def counting(self, out, k0):
        measured.append(out.shape)
        return original(self, out, k0)

    ran = []
    original_run = _Rows._run

    def recording(self, kind, width, out, k0):
        ran.append(kind)
        return original_run(self, kind, width, out, k0)

    # A fake clock: each timed call "takes" 1 s per row for the named winner, 10 s per row otherwise
    # (the loop is timed by a direct call, every other candidate through _Rows._run).
    def fake_timed(fn, device):
        before = len(ran)
        fn()
        kind = ran[-1] if len(ran) > before else "loop"
        return 1.0 if kind == faster else 10.0

    monkeypatch.setattr(_Rows, "_decide", counting)
    monkeypatch.setattr(_Rows, "_run", recording)
    monkeypatch.setattr(jac_mod, "_timed", fake_timed)
    rng = torch.get_rng_state()
    with scoring_context(model, x.device):
        first = embedding_and_gram(model, x, vectorize="auto")
        second = embedding_and_gram(model, x, vectorize="auto")
        embedding_and_gram(model, x[:-1], vectorize="auto")  # 5 rows, the size class of 6: decided already
        embedding_and_gram(model, x[:2], vectorize="auto")  # another size class: measured anew
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(measured) == 2
    decisions = cached_vectorize_decisions(model)
    k = g_ref.shape[-1]
    expected = (faster, min(k, jac_mod.AUTO_WIDTH_CPU)) if faster != "loop" else ("loop", 0)
    assert decisions[(jac_mod._size_class(x.shape[0]), tuple(x.shape[1:]), k, "cpu", torch.float32)] == expected
    for _, g, _ in (first, second):
        assert _rel(g, g_ref) <= 1e-6


def test_auto_for_real_and_for_a_bound_method():
    model, x = _mlp(), torch.randn(6, 48, generator=_gen(4))
    _, _, g_ref = _loop_reference(model, x)
    clear_vectorize_cache()

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def encode(self, v):
            return self.inner(v)

    wrapper = Wrapper(model)
    with scoring_context(wrapper, x.device):
        for _ in range(2):  # a fresh bound-method object each time: one decision
            _, g, _ = embedding_and_gram(wrapper.encode, x, vectorize="auto")
            assert _rel(g, g_ref) <= 1e-6
        for _ in range(2):  # a fresh closure each time, keyed by the module it closes over
            _, g, _ = embedding_and_gram(lambda v: model(v), x[:3], vectorize="auto")
            assert _rel(g, g_ref[:3]) <= 1e-6
    assert len(cached_vectorize_decisions(wrapper.encode)) == 1
    assert len(cached_vectorize_decisions(model)) == 1


class NoVmapSquare(torch.autograd.Function):
    """A backward that reads a Python number: vmap has no batching rule for ``item``."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return v * v

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        assert float(g.abs().max()) >= 0.0
        return 2 * v * g


class NoVmapModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 6)

    def forward(self, v):
        return self.b(NoVmapSquare.apply(self.a(v)))


@pytest.mark.parametrize("vectorize", [4, "auto"])
def test_batching_error_falls_back_to_the_loop(vectorize):
    model, x = NoVmapModel().eval(), torch.randn(4, 10, generator=_gen(6))
    _, _, g_ref = _loop_reference(model, x)
    clear_vectorize_cache()
    with scoring_context(model, x.device):
        _, g, _ = embedding_and_gram(model, x, vectorize=vectorize)
    assert _rel(g, g_ref) <= 1e-6
    if vectorize == "auto":  # never batched; replicated rows need no vmap rule and may win
        assert [kind for kind, _ in cached_vectorize_decisions(model).values()] in (["loop"], ["replicated"])


@pytest.mark.parametrize("case,vectorize", [("mlp", None), ("mlp", 4), ("mlp", "replicated"), ("cnn_bn_eval", None),
                                           ("cnn_bn_eval", "replicated"), ("k_gt_d", None), ("k_gt_d", 4),
                                           ("k_gt_d", "replicated")])
def test_memory_bounded_gram_equals_the_full_one(case, vectorize):
    if case == "k_gt_d":
        torch.manual_seed(7)
        model, x = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 14)).eval(), torch.randn(4, 5, generator=_gen(8))
    else:
        build, data = CASES[case]
        model, x = build(), data()
    _, jac, g_ref = _loop_reference(model, x)
    b, k, d = jac.shape
    n = min(k, d)
    # Room for about 3 rows of the micro-batch besides the Gram: several groups, recomputed rows.
    budget = b * n * n * 8 + 3 * _row_bytes(b, d)
    plan = plan_rows(b, k, d, budget, width=vectorize if isinstance(vectorize, int) else 0)
    assert full_jacobian_bytes(b, k, d) > budget
    if k <= d:
        assert plan.chunked and plan.groups >= 3
    with scoring_context(model, x.device):
        _, g, dd = embedding_and_gram(model, x, vectorize=vectorize, memory_bytes=budget)
        _, g_full, _ = embedding_and_gram(model, x, vectorize=vectorize)
    assert dd == d and g.shape == (b, n, n) and g.dtype == torch.float64
    assert _rel(g, g_ref) <= 1e-5
    assert _rel(g_full, g_ref) <= 1e-6
    s, _ = half_logdet(g)
    s_ref, _ = half_logdet(g_ref)
    assert (s - s_ref).abs().max().item() < 1e-6


def test_plan_counts_the_recomputed_rows(monkeypatch):
    model, x = _mlp(d=64, k=12), torch.randn(3, 64, generator=_gen(9))
    b, k, d = 3, 12, 64
    computed = []
    original = jac_mod._vjp_rows_loop

    def counting(z, leaf, out, start=0):
        computed.append(out.shape[1])
        return original(z, leaf, out, start)

    monkeypatch.setattr(jac_mod, "_vjp_rows_loop", counting)
    for rows_room in (4, 6, 12 + 1):
        budget = b * k * k * 8 + rows_room * _row_bytes(b, d)
        plan = plan_rows(b, k, d, budget)
        computed.clear()
        with scoring_context(model, x.device):
            embedding_and_gram(model, x, memory_bytes=budget)
        assert sum(computed) == plan.vjp_rows
        if plan.groups == 1:
            assert plan.vjp_rows == k
        elif k % plan.held == 0:
            assert plan.vjp_rows == k * (plan.groups + 1) // 2
        assert plan.planned_bytes <= budget


class _LargestAllocation(TorchDispatchMode):
    """Largest storage of any tensor an op returns, ignoring storages that existed before."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("vectorize", [None, 2])
def test_no_tensor_exceeds_the_budget(vectorize):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(1024, 8), nn.Tanh(), nn.Linear(8, 16)).eval()
    x = torch.randn(2, 1024, generator=_gen(11))
    b, k, d = 2, 16, 1024
    budget = b * k * k * 8 + 4 * _row_bytes(b, d)  # room for 4 of the 16 rows
    assert b * k * d * 4 >= 2 * budget
    existing = [*model.parameters(), x]
    with scoring_context(model, x.device):
        with _LargestAllocation(existing) as full:
            _, g_full, _ = embedding_and_gram(model, x, vectorize=vectorize)
        with _LargestAllocation(existing) as bounded:
            _, g, _ = embedding_and_gram(model, x, vectorize=vectorize, memory_bytes=budget)
    assert full.largest >= b * k * d * 4  # the mode sees the allocations
    plan = plan_rows(b, k, d, budget, width=vectorize or 0)
    assert plan.chunked and plan.planned_bytes <= budget
    assert bounded.largest <= max(plan.held, plan.stream) * b * d * 4 <= budget
    assert _rel(g, g_full) <= 1e-5


class MaskedTokens(nn.Module):
    """(B, T, E) tokens and an attention_mask keyword: masked mean pooling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.lin = nn.Linear(4, 5)

    def forward(self, t, attention_mask=None):
        h = torch.tanh(self.lin(t))
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


class OneMask(nn.Module):
    """The encoder with one sample's mask fixed: what the brute force differentiates."""

    def __init__(self, model, mask):
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask)

    def forward(self, t):
        return self.model(t, attention_mask=self.mask)


@pytest.mark.parametrize("vectorize", [None, "replicated"])
def test_encoder_kwargs_reach_the_encoder(brute_force, vectorize):
    model = MaskedTokens().eval()
    x = torch.randn(3, 6, 4, generator=_gen(13))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    with scoring_context(model, x.device):
        # replicated: the mask's rows are repeated with their samples (a wrong pairing fails below)
        z, g, d = embedding_and_gram(model, x, encoder_kwargs={"attention_mask": mask}, memory_bytes=2000,
                                     vectorize=vectorize)
        _, jac = embedding_and_jacobian(model, x, encoder_kwargs={"attention_mask": mask})
    assert d == 24 and _rel(g, gram(jac)) <= 1e-6
    assert torch.allclose(z, model(x, attention_mask=mask), atol=1e-6)
    score, _ = half_logdet(g)
    for i in range(3):  # each sample against float64 brute force with its own mask
        ref, _, _ = brute_force(OneMask(model, mask[i : i + 1]), x[i : i + 1])
        assert abs(score[i].item() - ref.item()) < 1e-4


def test_vectorize_values_are_checked():
    model, x = _mlp(), torch.randn(2, 48, generator=_gen(14))
    with scoring_context(model, x.device):
        for bad in ("fast", -1):
            with pytest.raises(ValueError, match="vectorize"):
                embedding_and_gram(model, x, vectorize=bad)
        _, g0, _ = embedding_and_gram(model, x, vectorize=0)
        _, g1, _ = embedding_and_gram(model, x, vectorize=1)
    assert torch.equal(g0, g1)


def test_score_through_the_gram_matches_float64_brute_force(brute_force):
    model, x = _cnn(), torch.randn(4, 1, 8, 8, generator=_gen(15))
    with scoring_context(model, x.device):
        _, g, _ = embedding_and_gram(model, x, vectorize="auto", memory_bytes=4 * 10 * 10 * 8 + 3 * _row_bytes(4, 64))
    score, floored = half_logdet(g)
    ref, ref_floored, _ = brute_force(model, x)
    assert (score - ref).abs().max().item() < 5e-5
    assert torch.equal(floored, ref_floored)
