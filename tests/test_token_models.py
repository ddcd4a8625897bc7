"""Integer token ids, scored through the differentiable output of the token embedding (issue 6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jepa_monitor import score_samples

V, T, E, K = 20, 5, 8, 6


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.pos = nn.Parameter(0.1 * torch.randn(T, E))
        self.block = nn.TransformerEncoderLayer(E, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(E, K)

    def body(self, e: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(e + self.pos))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(ids))


class Body(nn.Module):
    """The encoder as a function of the embedded tokens: what the reference differentiates."""

    def __init__(self, model: TinyTransformer):
        super().__init__()
        self.model = model

    def forward(self, e):
        return self.model.body(e)


def _setup():
    torch.manual_seed(0)
    model = TinyTransformer().train()  # dropout on: the score must still be the eval function's
    ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.mark.parametrize("pool", ["mean", "first"])
def test_token_ids_match_float64_reference_through_the_embedding(brute_force, pool):
    model, ids = _setup()
    got = score_samples(model, ids, input_module=model.embed, pool=pool)
    with torch.no_grad():
        e = model.embed(ids).double()  # a lookup: exact in float64
    head = (lambda out: out.mean(1)) if pool == "mean" else (lambda out: out[:, 0])
    ref, ref_floored, _ = brute_force(Body(model), e, head=head)
    err = (got.jepa_score.double() - ref).abs().max().item()
    print(f"tokens ({pool}): max |exact - float64 brute force| = {err:.2e} nats")
    assert err < 5e-5
    assert torch.equal(got.n_floored, ref_floored)
    assert got.input_dim == T * E and got.embed_dim == K
    assert model.training and model.block.dropout.training


def test_token_scoring_inside_inference_mode_and_with_vectorize():
    model, ids = _setup()
    expected = score_samples(model, ids, input_module=model.embed).jepa_score
    with torch.inference_mode():
        got = score_samples(model, ids.clone(), input_module=model.embed).jepa_score
    assert torch.equal(got, expected) and torch.isfinite(got).all()
    vec = score_samples(model, ids, input_module=model.embed, vectorize=3).jepa_score
    assert torch.allclose(vec, expected, rtol=2e-7, atol=0)


def test_input_module_misuse_is_named():
    model, ids = _setup()
    other = nn.Embedding(V, E)
    with pytest.raises(ValueError, match="was not called during the encoder's forward pass"):
        score_samples(model, ids, input_module=other)

    def twice(v):
        return model.body(model.embed(v)) + model.body(model.embed(v.flip(1)))

    with pytest.raises(ValueError, match="called more than once"):
        score_samples(twice, ids, input_module=model.embed)

    class Ids(nn.Module):
        def forward(self, v):
            return v + 0

    ids_module = Ids()
    with pytest.raises(TypeError, match="must return a floating-point tensor"):
        score_samples(lambda v: model(ids_module(v)), ids, input_module=ids_module)
