"""Bad input gets a clear error or an isolated non-finite score; out of memory retries smaller."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from jepa_monitor import score_samples
from jepa_monitor.jacobian import NotDifferentiableError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.GELU(), nn.Linear(24, 6))


def test_nan_and_inf_rows_are_isolated():
    model = _mlp()
    x = torch.randn(8, 10, generator=_gen(1))
    bad = x.clone()
    bad[2, 3] = float("nan")
    bad[5, 0] = float("inf")
    good_rows = [0, 1, 3, 4, 6, 7]
    got = score_samples(model, bad, batch_size=8)
    assert not torch.isfinite(got.jepa_score[[2, 5]]).any()
    assert not torch.isfinite(got.log_density[[2, 5]]).any()
    # Same micro-batch with the bad rows clean: the other rows are bitwise unaffected.
    clean = score_samples(model, x, batch_size=8)
    assert torch.equal(got.jepa_score[good_rows], clean.jepa_score[good_rows])
    assert torch.equal(got.n_floored[good_rows], clean.n_floored[good_rows])
    # Scored without the bad rows at all: equal up to BLAS kernel choice for another batch size
    # (identical here; at most 1 ulp in general).
    alone = score_samples(model, x[good_rows], batch_size=6)
    assert torch.allclose(got.jepa_score[good_rows], alone.jepa_score, rtol=2e-7, atol=0)
    assert torch.isfinite(alone.jepa_score).all()


def _raises(exc, *fragments):
    """pytest.raises that also requires every fragment (the problem and the fix) in the message."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, (fragment, message)
            return handled

    return _Check()


def test_one_dimensional_x_names_the_batch_dimension():
    with _raises(ValueError, "(10,)", "batch dimension", "unsqueeze(0)"):
        score_samples(_mlp(), torch.randn(10))


@pytest.mark.parametrize("x", [[[0.0] * 10], np.zeros((2, 10), dtype=np.float32)])
def test_non_tensor_x(x):
    with _raises(TypeError, "torch.Tensor", type(x).__name__):
        score_samples(_mlp(), x)


def test_dict_output_needs_a_selector():
    model = _mlp()

    def encoder(x):
        return {"emb": model(x), "logits": model(x)[:, :2]}

    x = torch.randn(3, 10, generator=_gen(2))
    with _raises(TypeError, "dict", "'emb'", "output=<key>"):
        score_samples(encoder, x)
    with _raises(ValueError, "output='nope'", "keys", "'emb'"):
        score_samples(encoder, x, output="nope")
    assert torch.equal(score_samples(encoder, x, output="emb").jepa_score, score_samples(model, x).jepa_score)


def test_tuple_output_needs_an_index():
    model = _mlp()
    x = torch.randn(3, 10, generator=_gen(3))
    with _raises(TypeError, "tuple of 2 items", "output=<index>"):
        score_samples(lambda v: (model(v), v), x)
    assert torch.equal(score_samples(lambda v: (model(v), v), x, output=0).jepa_score, score_samples(model, x).jepa_score)


def test_output_batch_mismatch():
    model = _mlp()
    with _raises(ValueError, "1 rows for 4 input samples", "first dimension"):
        score_samples(lambda v: model(v).sum(0, keepdim=True), torch.randn(4, 10, generator=_gen(4)))


def test_non_tensor_output():
    with _raises(TypeError, "returned str", "output=<callable>"):
        score_samples(lambda v: "embedding", torch.randn(2, 10))


def test_integer_x_without_input_module():
    with _raises(TypeError, "torch.int64", "cannot carry gradients", "input_module="):
        score_samples(_mlp(), torch.zeros(2, 10, dtype=torch.long))


def test_detached_output_and_output_independent_of_input():
    model = _mlp()
    x = torch.randn(2, 10, generator=_gen(5))
    with _raises(NotDifferentiableError, "does not depend on its input", ".detach()", "differentiable"):
        score_samples(lambda v: model(v).detach(), x)
    # The output still carries a graph through the parameters, but not to the input.
    with _raises(NotDifferentiableError, "does not depend on its input"):
        score_samples(lambda v: model(v.detach()), x)
    with _raises(NotDifferentiableError, "does not depend on its input"):
        score_samples(lambda v: model(v.detach()), x, vectorize=4)


def test_empty_batch_returns_empty_tensors():
    got = score_samples(_mlp(), torch.empty(0, 10))
    for t in (got.jepa_score, got.log_prior, got.log_density):
        assert t.shape == (0,) and t.dtype == torch.float32
    assert got.n_floored.shape == (0,) and got.n_floored.dtype == torch.int64
    assert got.embedding.shape[0] == 0


def test_zero_jacobian_row_counts_every_value_as_floored():
    # A dead-ReLU region: the Jacobian is exactly zero; nothing is measurable there.
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    got = score_samples(model, torch.randn(2, 4, generator=_gen(6)))
    assert torch.equal(got.jepa_score, torch.full((2,), -float("inf")))
    assert torch.equal(got.n_floored, torch.full((2,), 3))


class OOMAbove(nn.Module):
    """Raises the accelerator's out-of-memory error for micro-batches larger than ``limit``."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} rows")
        return self.inner(x)


def test_out_of_memory_retries_with_smaller_micro_batch():
    model = _mlp()
    x = torch.randn(11, 10, generator=_gen(7))
    encoder = OOMAbove(model, limit=3)
    with pytest.warns(UserWarning, match="out of memory while scoring") as record:
        got = score_samples(encoder, x, batch_size=8)
    assert [str(w.message)[-1] for w in record] == ["4", "2"]
    assert encoder.sizes[:3] == [8, 4, 2] and max(encoder.sizes[3:]) == 2
    # The retry ends on micro-batches of 2: bitwise what batch_size=2 gives.
    assert torch.equal(got.jepa_score, score_samples(model, x, batch_size=2).jepa_score)
    assert torch.equal(got.embedding, score_samples(model, x, batch_size=2).embedding)


def test_out_of_memory_with_automatic_micro_batch():
    model = _mlp()
    x = torch.randn(9, 10, generator=_gen(8))
    encoder = OOMAbove(model, limit=3)
    with pytest.warns(UserWarning, match="out of memory"):
        got = score_samples(encoder, x)
    # A gradient-free probe of one sample sizes the micro-batch from the memory budget; the whole
    # batch (9) fails, then halving retries 4 and 2.
    assert encoder.sizes[:4] == [1, 9, 4, 2]
    assert torch.allclose(got.jepa_score, score_samples(model, x).jepa_score, rtol=2e-7, atol=0)


def test_out_of_memory_on_a_single_sample_propagates():
    encoder = OOMAbove(_mlp(), limit=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no retry warning either: nothing smaller to try
        with pytest.raises(torch.OutOfMemoryError):
            score_samples(encoder, torch.randn(3, 10), batch_size=1)
