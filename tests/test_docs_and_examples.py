"""The README and the docs say what the code does, and every example runs.

- The demo block pasted in README.md has the shape of what ``format_summary`` prints today: both are
  turned into line-shape patterns (every number a placeholder, runs of spaces one space, the log
  directory a placeholder) and compared line by line, after removing the "Monitor warnings" block
  from both (which warnings a run emits, and how many, depends on its length).
- The README's attach snippet runs (fewer steps), its LightningCLI config runs, and its spelled-out
  defaults are the signatures' defaults.
- The README's commands are CI's, it stays short, and every relative link in README.md and docs/
  points to a file that exists.
- examples/attach_callback.py, demo_digits.py and score_encoder.py run with short settings.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"

# Tiny models: on a busy 2-core machine a second intra-op thread only spins (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def readme_block(marker: str, text: str = None) -> str:
    """The fenced code block that follows the HTML comment ``<!-- marker ...`` in README.md."""
    text = README.read_text() if text is None else text
    start = text.index(f"<!-- {marker}")
    match = re.compile(r"```[a-z]*\n(.*?)\n```", re.S).search(text, start)
    assert match, f"no code block after <!-- {marker}"
    return match.group(1)


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"_docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------- the demo block
NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|\bnan\b")


def without_warnings(lines):
    """Drop the "Monitor warnings during ..." header and its indented lines."""
    out, skipping = [], False
    for line in lines:
        if line.startswith("Monitor warnings during"):
            skipping = True
            continue
        if skipping and line.startswith("  "):
            continue
        skipping = False
        out.append(line)
    return out


def shape(line: str) -> str:
    """A line's shape: numbers -> '#', the log directory -> '<dir>', "never" -> "at batch #"
    (a run whose policy never dropped a row), runs of blanks -> one blank."""
    line = re.sub(r"--logdir \S+", "--logdir <dir>", line)
    line = line.replace("dropped a row never", "dropped a row at batch 0")
    line = NUMBER.sub("#", line)
    return re.sub(r"\s+", " ", line).strip()


def shapes(text: str):
    lines = without_warnings(text.splitlines())
    while lines and not lines[-1].strip():
        lines.pop()
    return [shape(line) for line in lines]


def test_readme_demo_block_has_the_shape_of_the_demo_output(tmp_path):
    from jepa_monitor.demo.run import DemoConfig, format_summary, run_demo

    pasted = readme_block("demo-output")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_demo(DemoConfig(logdir=str(tmp_path), steps=16, batch_size=32, compare=True,
                                     progress=False, threads=1))
    printed = format_summary(result)
    expected, got = shapes(pasted), shapes(printed)
    assert len(expected) == len(got), "\n".join(["README:", *expected, "", "demo now:", *got])
    for i, (a, b) in enumerate(zip(expected, got)):
        assert a == b, f"line {i + 1} differs:\n README:   {a}\n demo now: {b}"


def test_shape_ignores_numbers_and_warnings_but_not_words():
    a = "  noise 0.999 1.000 84.0% 10231\nMonitor warnings during the filtered run (count x first):\n   1 x w\n\nSeconds: x 1.0"
    b = "  noise 0.5 nan 4.0% 7\n\nSeconds: x 12.25"
    assert shapes(a) == shapes(b)
    assert shapes("  noise 0.9") != shapes("  noisy 0.9")


# ----------------------------------------------------------------------------- the attach snippet
def test_readme_attach_snippet_runs(tmp_path, monkeypatch):
    code = readme_block("attach-snippet")
    assert "max_steps=300" in code
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code.replace("max_steps=300", "max_steps=6"), "README.md", "exec"), namespace)
    monitor = namespace["monitor"]
    assert monitor.history and Path(monitor.export_file).is_file()
    assert monitor.trust is not None


def literal_keywords(call: ast.Call):
    out = {}
    for kw in call.keywords:
        if isinstance(kw.value, ast.Constant) and kw.value.value is Ellipsis:
            continue
        if isinstance(kw.value, ast.Call):
            continue
        out[kw.arg] = ast.literal_eval(kw.value)
    return out


def test_readme_defaults_are_the_signatures_defaults():
    from jepa_monitor.callbacks import Alerts, Cadence, JEPAScoreMonitor, Outputs
    from jepa_monitor.policies import Drop

    tree = ast.parse(readme_block("defaults"))
    calls = {node.func.id: node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    signatures = {name: inspect.signature(obj).parameters for name, obj in (
        ("JEPAScoreMonitor", JEPAScoreMonitor), ("Drop", Drop), ("Cadence", Cadence), ("Alerts", Alerts),
        ("Outputs", Outputs))}
    for name, params in signatures.items():
        written = literal_keywords(calls[name])
        assert written, name
        for key, value in written.items():
            assert key in params, f"{name}({key}=...) is not an argument"
            default = params[key].default
            assert value == (tuple(default) if isinstance(default, (list, tuple)) else default), \
                f"README says {name}({key}={value!r}); the default is {default!r}"
    # every argument of the monitor and every field of its option groups is spelled out
    for name in ("JEPAScoreMonitor", "Cadence", "Alerts", "Outputs"):
        spelled = {kw.arg for kw in calls[name].keywords}
        assert not set(signatures[name]) - spelled, (name, set(signatures[name]) - spelled)


# ------------------------------------------------------------------------------- the YAML config
def test_readme_lightningcli_config_runs(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI
    from torch.utils.data import DataLoader

    from jepa_monitor.callbacks import JEPAScoreMonitor
    from jepa_monitor.policies import Drop

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
            self.projector = torch.nn.Linear(16, 4)

        def embed(self, x):
            return self.projector(self.backbone(x))

        def training_step(self, batch, batch_idx):
            return self.embed(batch["image"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader([{"image": torch.randn(6, generator=g)} for _ in range(64)], batch_size=8)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    torch.save(torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), tmp_path / "data" / "heldout.pt")
    (tmp_path / "config.yaml").write_text(readme_block("yaml-config"))
    args = ["fit", "--config", "config.yaml", "--trainer.max_steps", "4", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(Module, args=args, save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, JEPAScoreMonitor)]
    assert isinstance(monitor.policy, Drop) and monitor.encoder == "embed"
    assert cli.trainer.global_step == 4 and monitor.history


# ---------------------------------------------------------------------- commands, length, links
def test_readme_commands_are_ci_commands_and_readme_is_short():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest'
    assert f"```bash\n{ci}\n```" in text
    assert len(text.splitlines()) <= 300


def test_relative_links_point_to_files():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


# ------------------------------------------------------------------------------------ the examples
def test_example_attach_callback(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = load_example("attach_callback").main(["--steps", "30", "--logdir", str(tmp_path)])
    monitor = out["monitor"]
    assert {h["split"] for h in monitor.history} == {"heldout", "incoming"}
    assert Path(monitor.export_file).is_file() and len(out["rows"]["split"]) > 0
    assert "least probable incoming ids" in capsys.readouterr().out


def test_example_demo_digits(tmp_path, capsys):
    from jepa_monitor.demo.data import KINDS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = load_example("demo_digits").main(["--steps", "12", "--batch-size", "32", "--logdir", str(tmp_path)])
    assert set(out["dropped"]) == set(KINDS)
    assert set(out["auroc"]) >= {"noise", "permuted", "novel_class"}
    assert 0.0 < out["probe"] <= 1.0
    assert "linear probe accuracy" in capsys.readouterr().out


def test_example_score_encoder(capsys):
    out = load_example("score_encoder").main(["--rows", "4"])
    fitted, isotropic = out["fitted"], out["isotropic"]
    assert torch.equal(fitted.jepa_score, isotropic.jepa_score)  # the reading changes the prior only
    assert int(fitted.log_density.argmin()) == 3  # the scaled row is the least probable under the fit
    assert len(capsys.readouterr().out.splitlines()) == 5
