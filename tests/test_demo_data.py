"""The demo's data, model and probe pieces, against independent references."""

import numpy as np
import pytest
import torch

from jepa_monitor.demo.data import (
    JUNK_KINDS,
    KIND_INDEX,
    KINDS,
    DigitStream,
    corrupt,
    junk_eval_sets,
    load_digits,
    make_splits,
    normalise,
)
from jepa_monitor.demo.model import DigitEncoder, augment, lejepa_loss, sigreg_directions
from jepa_monitor.demo.probe import probe_accuracy, fit_ridge, ridge_predict
from jepa_monitor.epps_pulley import epps_pulley


def test_shipped_digits_equal_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    ref = datasets.load_digits()
    images, labels = load_digits()
    assert images.dtype == torch.uint8 and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images.numpy(), ref.images.astype(np.uint8))
    np.testing.assert_array_equal(labels.numpy(), ref.target)


def test_normalise_standardises_the_whole_set():
    images, _ = load_digits()
    x = normalise(images)
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1.0) < 1e-3


def test_splits_are_disjoint_stratified_and_reference_lacks_the_novel_class():
    splits = make_splits(novel_class=3, seed=1)
    images, labels = load_digits()
    parts = [splits.train, splits.reference, splits.probe, splits.test]
    # Images are not unique in the set, so count (image, label) rows by multiset.
    total = sum(len(p[1]) for p in parts)
    n_novel = int((labels == 3).sum())
    n_novel_ref = round(0.15 * n_novel)
    assert total == 1797 - n_novel_ref
    assert not (splits.reference[1] == 3).any()
    for c in range(10):
        n_c = int((labels == c).sum())
        assert abs(int((splits.train[1] == c).sum()) - 0.5 * n_c) <= 1
        assert abs(int((splits.probe[1] == c).sum()) - 0.15 * n_c) <= 1
    # disjoint: every original row is used at most once
    key = lambda im, lab: {(bytes(i.numpy().tobytes()), int(l)) for i, l in zip(im, lab)}  # noqa: E731
    seen = [key(*p) for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            dup = seen[i] & seen[j]
            # identical images exist in the raw data; any overlap must be such a duplicate
            for d in dup:
                count = sum(1 for im, lab in zip(images, labels) if bytes(im.numpy().tobytes()) == d[0] and int(lab) == d[1])
                assert count > 1


def test_corruptions():
    images, _ = load_digits()
    x = images[:50]
    gen = torch.Generator().manual_seed(0)
    noise = corrupt(x, "noise", gen)
    assert noise.min() >= 0 and noise.max() <= 16 and abs(float(noise.mean()) - 8) < 0.5

    perm = corrupt(x, "permuted", gen)
    np.testing.assert_array_equal(perm.reshape(50, -1).sort(1).values.numpy(),
                                  x.float().reshape(50, -1).sort(1).values.numpy())
    assert (perm != x.float()).any(dim=(1, 2)).float().mean() > 0.9

    occ = corrupt(x, "occluded", gen)
    changed = occ != x.float()
    for i in range(50):
        # the changed pixels all lie in one 4x4 block, set to full intensity
        rows, cols = torch.nonzero(changed[i], as_tuple=True)
        if rows.numel():
            assert int(rows.max() - rows.min()) < 4 and int(cols.max() - cols.min()) < 4
            assert (occ[i][changed[i]] == 16).all()
    assert changed.any(dim=(1, 2)).float().mean() > 0.9

    pn = corrupt(x, "pixel_noise", torch.Generator().manual_seed(7))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(pn, (x.float() + 6.0 * eps).clamp(0, 16))

    with pytest.raises(ValueError, match="unknown junk kind"):
        corrupt(x, "blur", gen)


def test_stream_schedule_fractions_and_items():
    splits = make_splits(novel_class=9)
    state = torch.get_rng_state()
    stream = DigitStream(splits, 20000, junk_fraction=0.2, arrival=0.5, seed=3)
    assert torch.equal(state, torch.get_rng_state()), "the stream must not consume the global RNG"
    first, second = stream.kinds[:10000], stream.kinds[10000:]
    assert not (first == KIND_INDEX["novel_class"]).any()
    assert not (stream.labels[:10000][first == 0] == 9).any()
    # after arrival the novel class comes at its share of the training pool, among non-junk rows
    share = float((splits.train[1] == 9).float().mean())
    clean_after = (second == 0) | (second == KIND_INDEX["novel_class"])
    frac = float((second[clean_after] == KIND_INDEX["novel_class"]).float().mean())
    assert abs(frac - share) < 4 * (share * (1 - share) / int(clean_after.sum())) ** 0.5
    junk = torch.isin(stream.kinds, torch.tensor([KIND_INDEX[k] for k in JUNK_KINDS]))
    assert abs(float(junk.float().mean()) - 0.2) < 4 * (0.2 * 0.8 / 20000) ** 0.5
    for k in JUNK_KINDS:
        assert abs(float((stream.kinds == KIND_INDEX[k]).float().mean()) - 0.05) < 0.006
    item = stream[12345]
    assert set(item) == {"x", "id", "kind"} and item["x"].shape == (1, 8, 8) and item["id"] == 12345
    assert item["kind"] == int(stream.kinds[12345]) and torch.equal(item["x"], stream.x[12345])
    # clean rows are normalised training digits, bit for bit
    clean = torch.nonzero(stream.kinds == 0).flatten()[:5]
    train_x = normalise(splits.train[0])
    for i in clean.tolist():
        assert (train_x == stream.x[i]).flatten(1).all(1).any()
    again = DigitStream(splits, 20000, junk_fraction=0.2, arrival=0.5, seed=3)
    assert torch.equal(again.x, stream.x) and torch.equal(again.kinds, stream.kinds)


def test_eval_sets_cover_every_junk_kind():
    images, _ = load_digits()
    sets = junk_eval_sets(images[:20])
    assert tuple(sets) == JUNK_KINDS and all(v.shape == (20, 1, 8, 8) for v in sets.values())
    assert KINDS[0] == "clean"


def test_encoder_shapes_and_augment_uses_only_its_generator():
    enc = DigitEncoder(embed_dim=16)
    x = normalise(load_digits()[0][:10])
    assert enc(x).shape == (10, 16) and enc.features(x).shape == (10, 64)
    state = torch.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and a.shape == x.shape
    # a view is a shifted, rescaled, slightly noisy copy: close to the image, not equal to it
    diff = (a - x).abs().mean()
    assert 0.05 < float(diff) < float(x.abs().mean())


def test_augment_shift_is_a_pixel_translation():
    # A constant-zero-noise check: with the noise and contrast removed, the view is the image
    # translated by at most one pixel (replicate padding at the border).
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(30, 1, 1, 1)
    view = augment(x, torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for i in range(30):
        errs = [float((view[i] - padded[i, :, r : r + 8, c : c + 8] * s).abs().max())
                for r in range(3) for c in range(3) for s in [float(view[i, 0, 4, 4] / padded[i, 0, 4 + r, 4 + c])]]
        assert min(errs) < 0.6  # noise is 0.1 sd: an unshifted match would be off by >= 8·0.8


def test_lejepa_loss_terms_and_sample_weights():
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.1 * torch.randn(32, 16, generator=gen, dtype=torch.float64)
    dirs = sigreg_directions(16, torch.Generator().manual_seed(1)).to(torch.float64)
    loss, inv, sig = lejepa_loss(z1, z2, dirs, sigreg_weight=0.25)
    per_row = ((z1 - z2) ** 2).sum(1) / 4 / 16  # each view is half the difference from the centre
    torch.testing.assert_close(inv, per_row.mean())
    torch.testing.assert_close(sig, 0.5 * (epps_pulley(z1, dirs) + epps_pulley(z2, dirs)))
    torch.testing.assert_close(loss, 0.75 * inv + 0.25 * sig)
    w = torch.zeros(32, dtype=torch.float64)
    w[3], w[7] = 1.0, 0.5
    _, inv_w, sig_w = lejepa_loss(z1, z2, dirs, sample_weight=w)
    torch.testing.assert_close(inv_w, (per_row[3] + 0.5 * per_row[7]) / 1.5)
    torch.testing.assert_close(sig_w, sig)
    _, inv_1, _ = lejepa_loss(z1, z2, dirs, sample_weight=torch.ones(32))
    torch.testing.assert_close(inv_1, inv)
    _, same, _ = lejepa_loss(z1, z1, dirs)
    assert float(same) == 0.0


def test_ridge_probe_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3, 12, dtype=torch.float64)
    y = (x[:, :3].argmax(1) + 3 * (x[:, 3] > 0)).long()
    xt = torch.randn(80, 12, generator=gen, dtype=torch.float64)
    yt = (xt[:, :3].argmax(1) + 3 * (xt[:, 3] > 0)).long()
    mean, scale = x.mean(0), x.std(0)
    onehot = torch.nn.functional.one_hot(y, 6).double().numpy()
    ref = linear_model.Ridge(alpha=2.0).fit(((x - mean) / scale).numpy(), onehot)
    params = fit_ridge(x, y, 6, alpha=2.0)
    ours = ridge_predict(xt, *params)
    np.testing.assert_allclose(ours.numpy(), ref.predict(((xt - mean) / scale).numpy()), atol=1e-10)
    acc = probe_accuracy(x, y, xt, yt, num_classes=6, alpha=2.0)
    assert acc == float((ref.predict(((xt - mean) / scale).numpy()).argmax(1) == yt.numpy()).mean())
    assert acc > 0.5
