"""Scoring leaves no trace on the model or the process, and is right under any ambient mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jepa_monitor import score_samples


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Noisy(nn.Module):
    """Draws from the global RNG in every forward, like hand-written stochastic depth."""

    def forward(self, x):
        return x + 0.0 * torch.rand_like(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.5), Noisy(),
        nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.GELU()),
        nn.Linear(16, 6),
    )
    with torch.no_grad():
        model(torch.randn(32, 12))  # non-default running statistics
    model.train()
    model[5].eval()  # mixed modes: a frozen sub-block inside a training model
    model[0].bias.requires_grad_(False)
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[6].weight.grad = torch.zeros_like(model[6].weight)
    return model


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("params", "buffers"):
        for n, v in before[key].items():
            assert torch.equal(v, after[key][n]), (key, n)
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, n
        else:
            assert torch.equal(g, after["grads"][n]), n
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"])


def test_no_trace_left_on_model_grads_modes_and_rng():
    model = _model()
    x = torch.randn(5, 12, generator=_gen(1))
    before = _snapshot(model)
    scores = score_samples(model, x)
    _assert_same(before, _snapshot(model))
    assert torch.isfinite(scores.jepa_score).all()
    # Dropout is off while scoring: the score equals that of the model without dropout.
    no_dropout = _model()
    no_dropout[3] = nn.Identity()
    assert torch.equal(score_samples(no_dropout, x).jepa_score, scores.jepa_score)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module, fail: bool = False):
        super().__init__()
        self.inner = inner
        self.fail = fail

    def encode(self, x):
        assert not self.inner.training, "scored in train mode"
        z = self.inner(x)
        if self.fail:
            raise RuntimeError("boom")
        return z

    forward = encode


def test_encoder_failure_still_restores_modes_and_rng():
    model = _model()
    wrapper = Wrapper(model, fail=True)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        score_samples(wrapper, torch.randn(3, 12, generator=_gen(2)))
    _assert_same(before, _snapshot(model))
    assert wrapper.training


def test_bound_method_encoder_is_scored_in_eval_mode():
    model = _model()
    wrapper = Wrapper(model)
    x = torch.randn(3, 12, generator=_gen(5))
    before = _snapshot(model)
    got = score_samples(wrapper.encode, x)
    _assert_same(before, _snapshot(model))
    assert torch.equal(got.jepa_score, score_samples(model, x).jepa_score)


@pytest.mark.parametrize("kind", ["closure", "nested closure", "partial"])
def test_closures_and_partials_are_scored_in_eval_mode(kind):
    """``lambda x: model(x)`` hides the module from an isinstance check: without looking into the
    closure, train-mode BatchNorm (batch statistics couple the rows) and dropout would be scored."""
    import functools

    model = _model()
    x = torch.randn(5, 12, generator=_gen(6))
    if kind == "closure":
        encoder = lambda v: model(v)  # noqa: E731
    elif kind == "nested closure":
        def make(m):
            inner = lambda v: m(v)  # noqa: E731
            return lambda v: inner(v)
        encoder = make(model)
    else:
        encoder = functools.partial(lambda m, v: m(v), model)
    before = _snapshot(model)
    got = score_samples(encoder, x)
    _assert_same(before, _snapshot(model))  # modes restored (a frozen sub-block stays frozen), nothing else touched
    assert torch.equal(got.jepa_score, score_samples(model, x).jepa_score)


@pytest.mark.parametrize("ambient", ["inference_mode", "no_grad"])
def test_correct_inside_inference_mode_and_no_grad(ambient):
    model = _model()
    x = torch.randn(4, 12, generator=_gen(3))
    expected = score_samples(model, x).jepa_score
    context = torch.inference_mode() if ambient == "inference_mode" else torch.no_grad()
    with context:
        x_ambient = x.clone()  # an inference tensor under inference_mode
        got = score_samples(model, x_ambient)
        assert torch.is_inference_mode_enabled() == (ambient == "inference_mode")
        assert torch.is_grad_enabled() is False
    assert torch.equal(got.jepa_score, expected)
    assert (got.jepa_score != 0).all() and torch.isfinite(got.jepa_score).all()


def _precision_state() -> list:
    """Every observable precision setting; a getter that raises is recorded as its error type."""

    def read(getter):
        try:
            return getter()
        except RuntimeError as err:  # mixed legacy/new API settings make legacy getters raise
            return type(err)

    b = torch.backends
    switches = [b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.mkldnn, b.mkldnn.matmul,
                b.mkldnn.conv, b.mkldnn.rnn]
    return [read(lambda s=s: s.fp32_precision) for s in switches] + [
        read(torch.get_float32_matmul_precision),
        read(lambda: b.cuda.matmul.allow_tf32),
        read(lambda: b.cudnn.allow_tf32),
    ]


def _set_user_precision(how: str) -> None:
    if how == "medium":
        torch.set_float32_matmul_precision("medium")  # oneDNN bf16 matmuls on CPU
    elif how == "mixed":  # what a user script plus a framework default can leave behind
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize("how", ["default", "medium", "mixed"])
def test_full_precision_under_autocast_and_precision_settings_restored(how):
    model = _model()
    x = torch.randn(4, 12, generator=_gen(4))
    expected = score_samples(model, x)
    b = torch.backends
    switches = [b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.mkldnn, b.mkldnn.matmul,
                b.mkldnn.conv, b.mkldnn.rnn]
    original = [s.fp32_precision for s in switches]
    try:
        _set_user_precision(how)
        before = _precision_state()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model[0](x).dtype == torch.bfloat16  # autocast really is active
            got = score_samples(model, x)
            assert torch.is_autocast_enabled("cpu")
        assert _precision_state() == before
    finally:
        for s, value in zip(switches, original):
            s.fp32_precision = value
    assert torch.equal(got.jepa_score, expected.jepa_score)
    assert torch.equal(got.embedding, expected.embedding)
    assert got.embedding.dtype == torch.float32
