"""The jepa-monitor console script: score, report, demo options, help and user errors."""

import math
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from jepa_monitor import cli
from jepa_monitor.export import ScoreExporter, read_scores

D, K = 6, 3


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A directory holding an importable module with an encoder, a dataset and a LightningModule."""
    (tmp_path / "cli_fixture_mod.py").write_text(textwrap.dedent(f"""
        import torch
        import lightning as L

        torch.manual_seed(0)
        encoder = torch.nn.Linear({D}, {K}).double()
        data = torch.randn(10, {D}, dtype=torch.float64)
        dataset = torch.utils.data.TensorDataset(data, torch.arange(100, 110))
        # stable-pretraining 0.1.8 items (a dict with per-view dicts) and lightly 1.6.0 items
        # ((views, target, filename)); the default collate nests them as those libraries' batches.
        spt = [{{"views": [{{"image": data[i].float(), "label": i % 3, "sample_idx": 200 + i}},
                           {{"image": data[i].float() + 1, "label": i % 3, "sample_idx": 200 + i}}]}}
               for i in range(10)]
        lightly = [([data[i].float(), data[i].float() + 1], i % 3, f"img{{i}}.png") for i in range(10)]

        class Net(L.LightningModule):
            def __init__(self, d={D}, k={K}):
                super().__init__()
                self.save_hyperparameters()
                self.backbone = torch.nn.Linear(d, k)
        """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_fixture_mod", None)
    yield tmp_path
    sys.modules.pop("cli_fixture_mod", None)


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def expected_linear(weight, bias, x):
    """Analytic components for a linear encoder: constant score ½·logdet(W Wᵀ)."""
    w, bias = weight.detach().double(), bias.detach()
    score = 0.5 * torch.logdet(w @ w.T)
    z = x.double() @ w.T + bias.double()
    prior = -0.5 * (z**2).sum(1) - K / 2 * math.log(2 * math.pi)
    return score.expand(x.shape[0]), prior


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and "jepa-monitor" in capsys.readouterr().out
    for command, option in (("demo", "--no-filter"), ("score", "--checkpoint"), ("report", "LOGDIR")):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        assert option in capsys.readouterr().out
    assert run([], capsys)[0] == 0


def test_score_module_attr_matches_the_analytic_score(workdir, capsys):
    code, out, err = run(["score", "--encoder", "cli_fixture_mod:encoder", "--data", "cli_fixture_mod:data",
                          "--out", "s.csv", "--device", "cpu", "--batch-size", "4"], capsys)
    assert code == 0, err
    import cli_fixture_mod as m

    cols = read_scores(workdir / "s.csv")
    score, prior = expected_linear(m.encoder.weight, m.encoder.bias, m.data)
    np.testing.assert_allclose(cols["jepa_score"], score.numpy(), atol=1e-4)
    np.testing.assert_allclose(cols["log_prior"], prior.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cols["log_density"], (score + prior).numpy(), rtol=1e-5, atol=1e-4)
    assert cols["sample_id"].tolist() == [str(i) for i in range(10)]
    assert (cols["n_floored"] == 0).all() and (cols["step"] == 0).all()
    assert "wrote 10 rows" in out


def test_score_tensor_file_dict_with_keys_and_a_dataset(workdir, capsys):
    import cli_fixture_mod as m

    torch.save({"pixels": m.data.float(), "ids": torch.arange(50, 60)}, workdir / "d.pt")
    code, _, err = run(["score", "--encoder", "cli_fixture_mod:encoder", "--data", "d.pt", "--input-key", "pixels",
                        "--id-key", "ids", "--out", "d.csv", "--device", "cpu"], capsys)
    assert code == 0, err
    cols = read_scores(workdir / "d.csv")
    assert cols["sample_id"].tolist() == [str(i) for i in range(50, 60)]
    score, _ = expected_linear(m.encoder.weight, m.encoder.bias, m.data)
    np.testing.assert_allclose(cols["jepa_score"], score.numpy(), atol=1e-4)

    code, _, err = run(["score", "--encoder", "cli_fixture_mod:encoder", "--data", "cli_fixture_mod:dataset",
                        "--input-key", "0", "--id-key", "1", "--out", "t.csv", "--batch-size", "3"], capsys)
    assert code == 0, err
    cols = read_scores(workdir / "t.csv")
    assert cols["sample_id"].tolist() == [str(i) for i in range(100, 110)]
    np.testing.assert_allclose(cols["jepa_score"], score.numpy(), atol=1e-4)


def test_score_nested_batches_by_path(workdir, capsys):
    import cli_fixture_mod as m

    score, _ = expected_linear(m.encoder.weight, m.encoder.bias, m.data)
    torch.save({"views": [{"image": m.data.float(), "sample_idx": torch.arange(300, 310)}]}, workdir / "n.pt")
    cases = [
        ("n.pt", "views.0.image", "views.0.sample_idx", [str(i) for i in range(300, 310)]),
        ("cli_fixture_mod:spt", "views.0.image", "views.1.sample_idx", [str(i) for i in range(200, 210)]),
        ("cli_fixture_mod:lightly", "0.0", "2", [f"img{i}.png" for i in range(10)]),
    ]
    for i, (data, input_key, id_key, ids) in enumerate(cases):
        code, _, err = run(["score", "--encoder", "cli_fixture_mod:encoder", "--data", data, "--input-key", input_key,
                            "--id-key", id_key, "--out", f"n{i}.csv", "--batch-size", "4"], capsys)
        assert code == 0, (data, err)
        cols = read_scores(workdir / f"n{i}.csv")
        assert cols["sample_id"].tolist() == ids, data
        np.testing.assert_allclose(cols["jepa_score"], score.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "data, keys, needles",
    [
        ("cli_fixture_mod:spt", ["--input-key", "views.0.img"],
         ["'img' is not a key of views.0", "views.0.image (4, 6)", "views.1.sample_idx (4,)"]),
        ("cli_fixture_mod:spt", [], ["choose one with --input-key", "views.0.image (4, 6)"]),
        ("cli_fixture_mod:spt", ["--input-key", "views.2.image"], ["index 2 is past the end of views"]),
        ("cli_fixture_mod:lightly", [], ["--input-key=0 selects a list, not a tensor", "0.1 (4, 6)"]),
        ("cli_fixture_mod:lightly", ["--input-key", "0.0", "--id-key", "3"],
         ["--id-key='3': index 3 is past the end", "Tensors and lists in this batch: 0.0 (4, 6)",
          "2 (tuple of 4 str)"]),
        ("n.pt", ["--input-key", "views.0.image", "--id-key", "views.0.sample_idx"],
         ["--id-key='views.0.sample_idx' holds 9 ids for a batch of 10 rows"]),
    ],
)
def test_score_wrong_paths_list_what_the_batch_holds(workdir, capsys, data, keys, needles):
    torch.save({"views": [{"image": torch.zeros(10, D), "sample_idx": torch.arange(9)}]}, workdir / "n.pt")
    code, _, err = run(["score", "--encoder", "cli_fixture_mod:encoder", "--data", data, *keys,
                        "--out", "w.csv", "--batch-size", "4"], capsys)
    assert code == 2
    last = [line for line in re.split(r"[\r\n]", err) if line.strip()][-1]
    assert last.startswith("jepa-monitor: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in last, (needle, last)


def test_score_from_a_lightning_checkpoint(workdir, capsys):
    import lightning
    import cli_fixture_mod as m

    net = m.Net()
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": dict(net.hparams),
                "pytorch-lightning_version": lightning.__version__}, workdir / "n.ckpt")
    torch.save(m.data.float(), workdir / "x.pt")
    code, _, err = run(["score", "--checkpoint", "n.ckpt", "--module-class", "cli_fixture_mod:Net", "--attr",
                        "backbone", "--data", "x.pt", "--out", "c.csv"], capsys)
    assert code == 0, err
    score, _ = expected_linear(net.backbone.weight.detach(), net.backbone.bias.detach(), m.data)
    np.testing.assert_allclose(read_scores(workdir / "c.csv")["jepa_score"], score.numpy(), atol=1e-4)

    code, _, err = run(["score", "--checkpoint", "n.ckpt", "--data", "x.pt", "--out", "c2.csv"], capsys)
    assert code == 2 and "--module-class" in err
    code, _, err = run(["score", "--checkpoint", "n.ckpt", "--module-class", "cli_fixture_mod:Net", "--attr", "trunk",
                        "--data", "x.pt", "--out", "c3.csv"], capsys)
    assert code == 2 and "'trunk'" in err and "--attr" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--encoder", "cli_fixture_mod.encoder", "--data", "x.pt"], "module:attr"),
        (["--encoder", "no_such_mod_xyz:f", "--data", "x.pt"], "cannot import module 'no_such_mod_xyz'"),
        (["--encoder", "cli_fixture_mod:nope", "--data", "x.pt"], "has no attribute 'nope'"),
        (["--encoder", "cli_fixture_mod:encoder", "--data", "missing.pt"], "does not exist"),
        (["--encoder", "cli_fixture_mod:encoder", "--checkpoint", "n.ckpt", "--data", "x.pt"], "exactly one of"),
        (["--data", "x.pt"], "exactly one of"),
        (["--encoder", "cli_fixture_mod:encoder", "--data", "x.pt", "--input-key", "a"], "plain Tensor"),
        (["--encoder", "cli_fixture_mod:encoder", "--data", "x.pt", "--batch-size", "0"], "--batch-size"),
        (["--encoder", "cli_fixture_mod:encoder", "--data", "ids.pt"], "cannot carry gradients"),
        (["--encoder", "cli_fixture_mod:encoder", "--data", "x.pt", "--device", "cuda"]
         if not torch.cuda.is_available() else ["--data", "x.pt"], "cuda" if not torch.cuda.is_available() else "exactly"),
    ],
)
def test_score_user_errors_are_one_line(workdir, capsys, argv, needle):
    torch.save(torch.zeros(4, D), workdir / "x.pt")
    torch.save(torch.zeros(4, D, dtype=torch.long), workdir / "ids.pt")
    code, out, err = run(["score", *argv, "--out", "e.csv"], capsys)
    assert code == 2
    last = [line for line in re.split(r"[\r\n]", err) if line.strip()][-1]  # after any progress bar
    assert last.startswith("jepa-monitor: error: "), err
    assert needle in last and "Traceback" not in err


def test_score_refuses_to_overwrite(workdir, capsys):
    (workdir / "x.csv").write_text("keep me")
    torch.save(torch.zeros(4, D), workdir / "x.pt")
    code, _, err = run(["score", "--encoder", "cli_fixture_mod:encoder", "--data", "x.pt", "--out", "x.csv"], capsys)
    assert code == 2 and "--overwrite" in err and (workdir / "x.csv").read_text() == "keep me"


def test_console_script_error_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jepa_monitor.cli", "report", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def _write_export(logdir):
    path = logdir / "digits" / "v0" / "jepa_monitor" / "jepa.csv"
    ex = ScoreExporter(path)
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(40, generator=gen, dtype=torch.float64)
    ex.write(0, "heldout", 40, sample_ids=range(40), scores={"log_density": ref, "jepa_score": ref, "log_prior": ref})
    later = ref + 2.0
    ex.write(10, "heldout", 40, sample_ids=range(40), scores={"log_density": later, "jepa_score": later, "log_prior": later})
    inc = torch.tensor([0.1, -9.0, 0.3, 7.5])
    ex.write(10, "incoming", 4, sample_ids=["a", "b", "c", "d"],
             scores={"log_density": inc, "jepa_score": inc, "log_prior": inc})
    ex.write(11, "incoming", 2, sample_ids=["b", "e"], scores={"log_density": torch.tensor([-9.0, -1.0])},
             kept=torch.tensor([0, 1]), weight=torch.tensor([0.0, 0.5]))
    ex.close()
    return path, ref


def test_report_summarises_quantiles_drift_extremes_and_drops(tmp_path, capsys):
    path, ref = _write_export(tmp_path)
    code, out, err = run(["report", str(tmp_path), "--top", "2"], capsys)
    assert code == 0, err
    assert str(path) in out
    lines = out.splitlines()
    row0 = next(line for line in lines if line.split()[:2] == ["0", "40"])
    row10 = next(line for line in lines if line.split()[:2] == ["10", "40"])
    assert row0.split()[3] == f"{float(np.quantile(ref.numpy(), 0.5)):.2f}"
    # held-out moved by +2 everywhere: KS 1 or near, W1 exactly 2 against the first evaluation
    assert row0.split()[-2:] == ["0.00", "0.00"]
    assert float(row10.split()[-1]) == pytest.approx(2.0, abs=0.01)
    assert "b@10=-9.0" in out and "d@10=7.5" in out
    assert "1 rows dropped, 1 down-weighted (mean weight 0.500)" in out and "dropped ids: b\n" in out
    assert "incoming: 4 rows scored at 1 steps" in out


def test_report_errors(tmp_path, capsys):
    code, _, err = run(["report", str(tmp_path)], capsys)
    assert code == 2 and "no jepa-monitor exports" in err
    _write_export(tmp_path)
    code, _, err = run(["report", str(tmp_path), "--component", "density"], capsys)
    assert code == 2 and "--component" in err
    bad = tmp_path / "other" / "jepa_monitor" / "x.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("a,b\n1,2\n")
    code, _, err = run(["report", str(bad)], capsys)
    assert code == 2 and "not a jepa-monitor export" in err


def test_demo_option_errors(tmp_path, capsys):
    code, _, err = run(["demo", "--steps", "0", "--logdir", str(tmp_path)], capsys)
    assert code == 2 and "--steps" in err
    if not torch.cuda.is_available():
        code, _, err = run(["demo", "--device", "cuda", "--logdir", str(tmp_path)], capsys)
        assert code == 2 and "--device cpu" in err


def test_demo_no_filter_runs_once_and_drops_nothing(tmp_path, capsys):
    code, out, err = run(["demo", "--logdir", str(tmp_path), "--steps", "6", "--batch-size", "16", "--no-filter",
                          "--no-progress", "--threads", "1"], capsys)
    assert code == 0, err
    assert "(no policy: --no-filter" in out and "\n  unfiltered" in out and "\n  filtered" not in out
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["unfiltered"]
    for line in out.splitlines():
        if line.strip().startswith(("noise", "pixel_noise", "occluded", "permuted", "novel_class", "clean")):
            assert "0.0%" in line
