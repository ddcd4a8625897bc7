"""Encoders with side inputs: a BERT-style text encoder scored from token ids and an attention mask.

The mask is a side input of :meth:`Scorer.score` / :meth:`Scorer.embed`: its rows are sliced with
every micro-batch, passed as ``encoder(ids, attention_mask=...)``, and exclude padding from
``pool="mean"``. Reference: per sample, the float64 Jacobian (torch.autograd.functional.jacobian)
of the eval-mode encoder's mean over the *real* tokens, with respect to the embedded real tokens
only, then svdvals. When the mask works, the Jacobian columns of padding tokens are exactly zero,
so the scorer's (K, T·E) Jacobian has the same singular values as the reference's (K, L·E) one;
K = 8 is below every L·E here, so the score is full rank (nothing floored).
"""

from __future__ import annotations

import copy
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jepa_monitor import Scorer, score_samples
from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor

VOCAB, E, H, MAX_LEN = 50, 16, 8, 32
PAD = 0
LENGTHS = (12, 7, 3, 9, 5)  # real tokens per sentence; padded on the right to T
ATOL = 5e-5  # nats: float32 scorer against the float64 reference (measured ~1e-6)


class TinyBert(nn.Module):
    """Word + learned position embeddings, an embedding LayerNorm, two post-LN transformer layers
    that honour the attention mask, and a projection to H: ``forward(input_ids, attention_mask)``
    returns (B, T, H) token states. Random weights; dropout > 0, so eval mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, E, padding_idx=PAD)
        self.position_embeddings = nn.Embedding(MAX_LEN, E)
        self.norm = nn.LayerNorm(E)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(E, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
            for _ in range(2)
        )
        # Post-LN layers leave every token on a 15-dim affine subspace of R^16: project to H < 15.
        self.proj = nn.Linear(E, H)

    def encode(self, e: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder as a function of the embedded tokens (what the reference differentiates)."""
        h = self.norm(e + self.position_embeddings.weight[: e.shape[1]])
        padding = ~attention_mask.bool()
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding)
        return self.proj(h)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode(self.word_embeddings(input_ids), attention_mask)


# Tiny tensors: on a busy 2-core machine a second intra-op thread only spins (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> TinyBert:
    torch.manual_seed(0)
    return TinyBert().train()  # dropout on: the score must still be the eval function's


def _sentences(lengths=LENGTHS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def _pad(sentences, t: int):
    """(ids, attention_mask), both (B, t) int64, right-padded with PAD / 0."""
    ids = torch.full((len(sentences), t), PAD, dtype=torch.long)
    mask = torch.zeros(len(sentences), t, dtype=torch.long)
    for i, s in enumerate(sentences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _batch(t: int = 12):
    return _pad(_sentences(), t)


def brute_force_masked(model: TinyBert, ids: torch.Tensor, mask: torch.Tensor, *, rel_floor: float = 1e-6):
    """Float64 JEPA-SCORE per sample over the non-padding tokens (independent of the scorer):
    (scores (B,), n_floored (B,), largest |Jacobian| entry on a padding token, over the batch)."""
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    scores, floored, pad_leak = [], [], 0.0
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        with torch.no_grad():
            e = m64.word_embeddings(ids[i : i + 1])  # a lookup: exact in float64
        real, pads, m = e[:, :n], e[:, n:], mask[i : i + 1]

        def pooled_over_real(v: torch.Tensor) -> torch.Tensor:
            out = m64.encode(torch.cat([v.view(1, n, E), pads], dim=1), m)
            return out[0, :n].mean(0)  # mean over the real tokens, written out (not masked_mean)

        jac = torch.autograd.functional.jacobian(pooled_over_real, real.reshape(-1))  # (H, n·E)
        s = torch.linalg.svdvals(jac)
        floor = rel_floor * s.max()
        scores.append(s.clamp_min(floor).log().sum())
        floored.append((s < floor).sum())
        if n < ids.shape[1]:  # the mask works: the padding tokens do not move the embedding at all

            def pooled_over_all(v: torch.Tensor) -> torch.Tensor:
                return m64.encode(v.view(1, -1, E), m)[0, :n].mean(0)

            full = torch.autograd.functional.jacobian(pooled_over_all, e.reshape(-1)).view(H, -1, E)
            pad_leak = max(pad_leak, full[:, n:].abs().max().item())
    return torch.stack(scores), torch.stack(floored), pad_leak


def _scorer(model: TinyBert, **options) -> Scorer:
    return Scorer(model, input_module=model.word_embeddings, **options)


# ---------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("vectorize", [None, "replicated"])
def test_masked_token_scores_match_float64_reference_for_every_micro_batch_size(vectorize):
    model = _model()
    ids, mask = _batch()
    ref, ref_floored, pad_leak = brute_force_masked(model, ids, mask)
    assert pad_leak == 0.0  # the reference model really ignores padding
    # replicated: ids and mask repeated together through the embedding hook's leaf
    results = {bs: _scorer(model, batch_size=bs, vectorize=vectorize).score(ids, attention_mask=mask)
               for bs in (1, 3, None)}
    for bs, got in results.items():
        err = (got.jepa_score.double() - ref).abs().max().item()
        print(f"batch_size={bs}: max |scorer - float64 brute force| = {err:.2e} nats")
        assert err < ATOL, bs
        assert torch.equal(got.n_floored, ref_floored) and (got.n_floored == 0).all()
        assert got.input_dim == ids.shape[1] * E and got.embed_dim == H
    # The mask is sliced with the ids: micro-batches of 1, 3 or all rows give the same numbers.
    for bs in (3, None):
        assert torch.allclose(results[bs].jepa_score, results[1].jepa_score, rtol=1e-6, atol=0), bs
        assert torch.allclose(results[bs].embedding, results[1].embedding, rtol=0, atol=1e-6), bs
    assert model.training and all(layer.dropout.training for layer in model.layers)


def test_embed_equals_the_scored_embedding():
    model = _model()
    ids, mask = _batch()
    scorer = _scorer(model, batch_size=2)
    got = scorer.score(ids, attention_mask=mask).embedding
    z = scorer.embed(ids, attention_mask=mask)
    assert z.shape == (len(LENGTHS), H) and not z.requires_grad
    # embed() runs without autograd, where nn.TransformerEncoderLayer takes its fused eval kernel:
    # the same function up to float32 rounding (measured 4e-7), not bit for bit.
    assert torch.allclose(z, got, rtol=0, atol=2e-6)
    with torch.no_grad():  # and it is the eval-mode masked mean of the model's own output
        ref = copy.deepcopy(model).eval()(ids, mask)
    ref = torch.stack([ref[i, :n].mean(0) for i, n in enumerate(LENGTHS)])
    assert torch.allclose(z, ref, rtol=0, atol=2e-6)
    assert model.training


def test_masked_mean_pooling_ignores_how_much_padding_the_batch_has():
    model = _model()
    sentences = _sentences()
    short, long_ = _pad(sentences, 12), _pad(sentences, 20)
    scorer = _scorer(model)
    a, b = scorer.score(short[0], attention_mask=short[1]), scorer.score(long_[0], attention_mask=long_[1])
    assert torch.allclose(a.embedding, b.embedding, rtol=0, atol=2e-6)
    assert torch.allclose(a.jepa_score, b.jepa_score, rtol=0, atol=ATOL)
    assert (a.input_dim, b.input_dim) == (12 * E, 20 * E)  # more columns, all of them zero
    assert torch.allclose(scorer.embed(short[0], attention_mask=short[1]),
                          scorer.embed(long_[0], attention_mask=long_[1]), rtol=0, atol=2e-6)

    # A plain mean over all T positions (what pool="mean" did before it read the mask) averages the
    # padding tokens' states in: the same sentences get another embedding and another score.
    plain = _scorer(model, pool=lambda z: z.mean(1))
    pa, pb = plain.score(short[0], attention_mask=short[1]), plain.score(long_[0], attention_mask=long_[1])
    moved = (pa.embedding - pb.embedding).abs().amax(1)
    assert (moved[1:] > 1e-2).all()  # every padded sentence moved
    assert moved[0] > 1e-2  # even the full-length one: T=20 pads it too
    assert ((pa.jepa_score - pb.jepa_score).abs() > 1e-2).all()


def test_a_mask_captured_in_a_closure_breaks_micro_batches():
    """Why the mask must be a side input: a closure over the whole batch's mask cannot be sliced."""
    model = _model().eval()  # not needed: the Scorer finds the nn.Module this closure holds and
    # switches it to eval mode (jepa_monitor/_guards.py); a plain function has no mode of its own
    ids, mask = _batch()

    def closure(x):
        return model(x, mask)

    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        Scorer(closure, input_module=model.word_embeddings, batch_size=2).score(ids)
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        Scorer(closure, input_module=model.word_embeddings).score(ids)  # sizing forward: 1 row, 5 masks
    # In one micro-batch of all rows it runs, but pooling never sees the mask: padding is averaged in.
    whole = Scorer(closure, input_module=model.word_embeddings, batch_size=len(LENGTHS)).score(ids)
    side = _scorer(model, batch_size=2).score(ids, attention_mask=mask)
    assert ((whole.jepa_score - side.jepa_score).abs()[1:] > 1e-2).all()
    assert torch.allclose(whole.jepa_score[0], side.jepa_score[0], rtol=1e-6, atol=0)  # no padding: same


def test_side_inputs_are_refused_by_slq():
    model = _model()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="method='exact' only"):
        _scorer(model, method="slq").score(ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------- monitor
class TokenData(Dataset):
    """Dict samples {"input_ids", "attention_mask"}, right-padded to T = 12."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 13, (n,), generator=g).tolist()
        self.ids, self.mask = _pad(_sentences(lengths, seed=seed + 100), 12)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


class TextModule(pl.LightningModule):
    """Masked-token reconstruction over the real tokens: enough to move the encoder's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _model()
        self.head = nn.Linear(H, VOCAB)

    def training_step(self, batch, batch_idx):
        real = batch["attention_mask"].bool()
        logits = self.head(self.model(batch["input_ids"], batch["attention_mask"]))
        return F.cross_entropy(logits[real], batch["input_ids"][real])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_monitor_scores_token_batches_with_the_attention_mask(tmp_path):
    heldout = TokenData(10, seed=2)
    module = TextModule()
    initial = copy.deepcopy(module.model)
    monitor = JEPAScoreMonitor(
        encoder="model",
        heldout=DataLoader(heldout, batch_size=4, shuffle=False),
        input_key="input_ids",
        encoder_kwargs_keys=("attention_mask",),
        cadence=Cadence(every_n_batches=2, incoming_every_n_batches=1, incoming_rows=4),
        scorer=Scorer(input_module="model.word_embeddings"),
        reading="isotropic",  # compared with direct scoring, which reads N(0, I)
    )
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no logger; low trust of random weights; Lightning's hints
        trainer.fit(module, DataLoader(TokenData(24, seed=3), batch_size=6, shuffle=True))
    assert monitor.failures.total == 0 and not monitor.disabled
    splits = [h["split"] for h in monitor.history]
    assert splits.count("incoming") == 4 and splits.count("heldout") == 3  # fit start, batches 2 and 4

    # The reference is the fit-start evaluation (random weights are far from trusted, so it is never
    # re-anchored): the held-out rows scored by the initial weights with their masks.
    direct = _scorer(initial).score(heldout.ids, attention_mask=heldout.mask)
    assert torch.allclose(monitor.reference["jepa_score"], direct.jepa_score, rtol=1e-6, atol=0)
    assert torch.allclose(monitor.reference["log_density"], direct.log_density, rtol=1e-6, atol=1e-6)
    # ... which is not what the trained weights give: the comparison above is not vacuous.
    trained = _scorer(module.model).score(heldout.ids, attention_mask=heldout.mask)
    assert not torch.allclose(trained.jepa_score, direct.jepa_score, rtol=1e-3, atol=0)
    # The last held-out evaluation ran after the final step: its mean is the trained weights' mean.
    last = [h for h in monitor.history if h["split"] == "heldout"][-1]
    assert last["mean"] == pytest.approx(trained.log_density.double().mean().item(), rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------------------- progress
def _mlp_and_rows():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)), torch.randn(10, 12)


def test_progress_bar_goes_to_stderr_and_changes_nothing(capsys):
    mlp, x = _mlp_and_rows()
    quiet = score_samples(mlp, x, batch_size=3)
    assert capsys.readouterr().err == ""
    loud = score_samples(mlp, x, batch_size=3, progress=True)
    captured = capsys.readouterr()
    assert "jepa-monitor scoring" in captured.err and captured.out == ""
    for c in ("jepa_score", "log_prior", "log_density", "n_floored", "embedding"):
        assert torch.equal(getattr(loud, c), getattr(quiet, c)), c


def test_progress_without_tqdm_prints_plain_lines(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `from tqdm.auto import tqdm` now fails
    mlp, x = _mlp_and_rows()
    loud = score_samples(mlp, x, batch_size=5, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and all(line.startswith("jepa-monitor scoring: ") for line in lines)
    assert "10/10 rows" in lines[-1] and "rows/s" in lines[-1]
    assert torch.equal(loud.jepa_score, score_samples(mlp, x, batch_size=5).jepa_score)
