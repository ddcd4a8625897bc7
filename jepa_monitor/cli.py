"""The ``jepa-monitor`` console script: ``demo``, ``score`` and ``report``.

User errors (a wrong path, a name that does not import, a bad option) print one line,
``jepa-monitor: error: <what is wrong>; <the fix>``, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from ._version import __version__
from .progress import progress_bar

EXIT_USER_ERROR = 2


class CLIError(Exception):
    """A user error: the message names what is wrong and the fix."""


# ---------------------------------------------------------------------------------------- helpers
def import_object(spec: str, what: str) -> Any:
    """``package.module:attr.sub`` -> the object."""
    if ":" not in spec:
        raise CLIError(f"{what} {spec!r} is not of the form module:attr; write e.g. mypkg.models:encoder.")
    module_name, attr = spec.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise CLIError(
            f"cannot import module {module_name!r} for {what} ({err}); check the name and that it is on "
            "PYTHONPATH or in the current directory."
        ) from None
    finally:
        sys.path.pop(0)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{module_name!r} has no attribute {attr!r} ({what}); check the name after the colon.")
        obj = getattr(obj, part)
    return obj


def load_encoder(args) -> Callable:
    """The encoder from ``--encoder module:attr`` or ``--checkpoint PATH --attr NAME``."""
    import torch

    if (args.encoder is None) == (args.checkpoint is None):
        raise CLIError("give exactly one of --encoder module:attr or --checkpoint PATH (with --attr).")
    if args.encoder is not None:
        obj = import_object(args.encoder, "--encoder")
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            try:
                obj = obj()
            except TypeError as err:
                raise CLIError(
                    f"--encoder {args.encoder} is a class that needs arguments ({err}); point at an "
                    "instance or a function returning the embeddings instead."
                ) from None
        if not callable(obj):
            raise CLIError(f"--encoder {args.encoder} is a {type(obj).__name__}, not a module or callable.")
        return obj
    path = Path(args.checkpoint)
    if not path.is_file():
        raise CLIError(f"--checkpoint {path} does not exist; give the path of a Lightning .ckpt file.")
    cls = _module_class(args, path)
    try:
        module = cls.load_from_checkpoint(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any load failure is a user error here
        raise CLIError(
            f"loading {path} with {cls.__name__}.load_from_checkpoint failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check --module-class matches the checkpoint."
        ) from None
    obj = module
    for part in (args.attr or "").split("."):
        if not part:
            continue
        if not hasattr(obj, part):
            raise CLIError(
                f"{cls.__name__} has no attribute {args.attr!r} (--attr); name the encoder submodule, "
                "e.g. --attr backbone, or --attr '' for the whole module."
            )
        obj = getattr(obj, part)
    return obj


def _module_class(args, path: Path):
    if args.module_class:
        cls = import_object(args.module_class, "--module-class")
    else:
        import torch

        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        spec = (ckpt.get("hyper_parameters") or {}).get("_class_path") if isinstance(ckpt, dict) else None
        if not spec:
            raise CLIError(
                f"{path} does not record its LightningModule class; pass --module-class module:Class."
            )
        module_name, _, name = spec.rpartition(".")
        cls = import_object(f"{module_name}:{name}", "the checkpoint's _class_path")
    if not hasattr(cls, "load_from_checkpoint"):
        raise CLIError(f"--module-class {args.module_class} is not a LightningModule class.")
    return cls


def load_data(spec: str) -> Any:
    """A tensor, a dict of tensors, or a dataset, from ``FILE.pt`` or ``module:attr``."""
    import torch

    path = Path(spec)
    if path.suffix in (".pt", ".pth") or path.exists():
        if not path.is_file():
            raise CLIError(f"--data {spec} does not exist; give a file saved with torch.save or module:attr.")
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CLIError(
                f"--data {spec} could not be read as tensors ({type(err).__name__}); save a tensor or a "
                "dict of tensors with torch.save, or use a module:attr dataset."
            ) from None
    obj = import_object(spec, "--data")
    return obj() if callable(obj) and not hasattr(obj, "__getitem__") else obj


def _pick(item: Any, key: Optional[str], what: str):
    """The input tensor that ``--input-key`` selects in one data item or batch.

    The key is a string: a dict key, a list/tuple index ("0"), or a dotted path ("views.0.image",
    digits index lists/tuples); see :mod:`jepa_monitor.batches`. Without a key a tuple/list gives
    its first item and a tensor itself.
    """
    import torch

    from .batches import describe, get_input

    if isinstance(item, torch.Tensor) and key is not None:
        raise CLIError(f"{what} {key!r} was given but the data is a plain Tensor; drop {what}.")
    if key is None:
        if isinstance(item, Mapping):
            raise CLIError(f"the data items are dicts with keys {list(item.keys())}; choose one with {what} "
                           f"(tensors: {', '.join(describe(item))}).")
        key = 0
    try:
        return get_input(item, key, what)
    except (KeyError, TypeError, ValueError) as err:
        raise CLIError(_one_line(err)) from None


def _pick_ids(item: Any, key: Optional[str], n: int, what: str) -> Optional[List[str]]:
    """The ``n`` ids that ``--id-key`` selects (same key syntax as ``--input-key``), or None."""
    import torch

    from .batches import get_ids

    if key is None:
        return None
    if isinstance(item, torch.Tensor):
        raise CLIError(f"{what} {key!r} was given but the data is a plain Tensor; drop {what}.")
    try:
        return get_ids(item, key, n, what)
    except (KeyError, TypeError, ValueError) as err:
        raise CLIError(_one_line(err)) from None


def _one_line(err: BaseException) -> str:
    # str(KeyError) wraps the message in quotes; user errors print as a single line.
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split())


def iterate_rows(data: Any, input_key, id_key, batch_size: int) -> Tuple[int, Iterator[Tuple[Any, List[str]]]]:
    """(number of rows, iterator of (input batch, ids)) over a tensor, (nested) dict of tensors or dataset."""
    import torch

    if isinstance(data, (torch.Tensor, dict, tuple, list)) and not (
        isinstance(data, (tuple, list)) and data and not isinstance(data[0], torch.Tensor)
    ):
        x = _pick(data, input_key, "--input-key")
        n = x.shape[0]
        ids = _pick_ids(data, id_key, n, "--id-key")

        def chunks():
            for s in range(0, n, batch_size):
                stop = min(n, s + batch_size)
                yield x[s:stop], ids[s:stop] if ids is not None else _positions(s, stop)

        return n, chunks()
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise CLIError(f"--data gave a {type(data).__name__}; expected a tensor, a dict of tensors or a dataset.")
    from torch.utils.data import DataLoader

    loader = DataLoader(data, batch_size=batch_size, shuffle=False)

    def batches():
        start = 0
        for batch in loader:
            x = _pick(batch, input_key, "--input-key")
            stop = start + x.shape[0]
            ids = _pick_ids(batch, id_key, x.shape[0], "--id-key")
            yield x, ids if ids is not None else _positions(start, stop)
            start = stop

    return len(data), batches()


def _positions(start: int, stop: int) -> List[str]:
    """Default ids: the row positions in the data."""
    return [str(i) for i in range(start, stop)]


# ---------------------------------------------------------------------------------------- score
def cmd_score(args) -> int:
    import torch

    from .export import ScoreExporter
    from .scorer import Scorer

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1; got {args.batch_size}.")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
    out = Path(args.out)
    if out.suffix not in (".csv", ".parquet"):
        raise CLIError(f"--out {out} must end in .csv or .parquet.")
    if out.exists():
        if not args.overwrite:
            raise CLIError(f"--out {out} exists; remove it or pass --overwrite.")
        out.unlink()
    encoder = load_encoder(args)
    dtype = None
    if isinstance(encoder, torch.nn.Module):
        encoder = encoder.to(device)
        dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()), None)
    n, batches = iterate_rows(load_data(args.data), args.input_key, args.id_key, args.batch_size)
    exporter = ScoreExporter(out, out.suffix.lstrip("."))
    scorer = Scorer(encoder, method=args.method)
    bar = progress_bar(n, "scoring")
    try:
        for x, ids in batches:
            if not isinstance(x, torch.Tensor):
                raise CLIError(f"a data batch is a {type(x).__name__}, not a tensor; check --input-key.")
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)  # float32 data for a float64 model (or back) is not worth an error
            try:
                s = scorer.score(x.to(device))
            except (TypeError, ValueError) as err:
                raise CLIError(f"scoring failed: {str(err).splitlines()[0]}") from None
            except RuntimeError as err:
                raise CLIError(
                    f"the encoder failed on a batch of shape {tuple(x.shape)} ({str(err).splitlines()[0]}); "
                    "check that --data (and --input-key) give what the encoder takes."
                ) from None
            exporter.write(
                0,
                "test",
                x.shape[0],
                sample_ids=ids,
                scores={"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density},
                n_floored=s.n_floored,
            )
            bar.update(x.shape[0])
    finally:
        bar.close()
        exporter.close()
    print(f"wrote {n} rows to {out}")
    return 0


# ---------------------------------------------------------------------------------------- report
def find_exports(logdir: Path) -> List[Path]:
    return sorted(p for ext in ("csv", "parquet") for p in logdir.rglob(f"jepa_monitor/*.{ext}"))


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.2f}"


def summarize_export(path: Path, component: str, top: int) -> str:
    """The terminal report of one export file.

    Rows a policy decided on (``kept`` present) are curation records, reported apart from the
    monitor's own scoring of each split. Drift is measured against the reference: the first
    held-out evaluation (or a split's own first step when the export has no held-out rows).
    """
    import numpy as np
    import torch

    from .export import read_scores
    from .statistics import ks_statistic, quantiles, wasserstein_1

    cols = read_scores(path)
    lines = [f"== {path}  ({len(cols['step'])} rows)"]
    values = cols[component]
    decided = np.isfinite(cols["kept"])
    heldout = (cols["split"] == "heldout") & ~decided
    ref_rows = heldout & (cols["step"] == cols["step"][heldout].min()) if heldout.any() else None
    fmt = lambda i: f"{cols['sample_id'][i] or '?'}@{int(cols['step'][i])}={values[i]:.1f}"  # noqa: E731
    for split in dict.fromkeys(cols["split"][~decided].tolist()):
        rows = (cols["split"] == split) & ~decided
        steps = np.unique(cols["step"][rows])
        shown = steps if len(steps) <= 8 else steps[np.linspace(0, len(steps) - 1, 8).round().astype(int)]
        ref = ref_rows if ref_rows is not None else rows & (cols["step"] == steps[0])
        first = torch.from_numpy(values[ref])
        lines.append(f"-- {split}: {int(rows.sum())} rows scored at {len(steps)} steps; {component} over time")
        lines.append(f"   {'step':>7} {'rows':>6} {'p5':>9} {'p50':>9} {'p95':>9} {'KS vs ref':>10} {'W1 vs ref':>10}")
        for step in shown:
            v = torch.from_numpy(values[rows & (cols["step"] == step)])
            q = quantiles(v, (0.05, 0.5, 0.95)).tolist()
            ks, w1 = float(ks_statistic(v, first)), float(wasserstein_1(v, first))
            lines.append(f"   {int(step):>7} {v.numel():>6} " + " ".join(f"{_fmt(x):>9}" for x in q)
                         + f" {_fmt(ks):>10} {_fmt(w1):>10}")
        idx = np.nonzero(rows & np.isfinite(values))[0]
        if idx.size:
            order = idx[np.argsort(values[idx], kind="stable")]
            lines.append("   least probable (id@step=score): " + ", ".join(fmt(i) for i in order[:top]))
            lines.append("   most probable  (id@step=score): " + ", ".join(fmt(i) for i in order[::-1][:top]))
    if decided.any():
        dropped = decided & (cols["kept"] == 0)
        weighted = decided & (cols["kept"] == 1)
        lines.append(
            f"-- curation (the export lists the rows a policy touched): {int(dropped.sum())} rows dropped, "
            f"{int(weighted.sum())} down-weighted (mean weight {np.nanmean(cols['weight'][weighted]) if weighted.any() else float('nan'):.3f})"
        )
        if dropped.any():
            steps = cols["step"][dropped]
            lines.append(f"   dropping from step {int(steps.min())} to {int(steps.max())}")
            ids = [str(i) or "?" for i in cols["sample_id"][dropped][: top * 4]]
            lines.append("   dropped ids: " + ", ".join(ids) + (" ..." if dropped.sum() > len(ids) else ""))
    else:
        lines.append("-- curation: no policy decisions in this export")
    return "\n".join(lines)


def cmd_report(args) -> int:
    from .export import SCORE_COLUMNS

    logdir = Path(args.logdir)
    if not logdir.exists():
        raise CLIError(f"{logdir} does not exist; give the directory of a run (e.g. the demo's --logdir).")
    if args.component not in SCORE_COLUMNS:
        raise CLIError(f"--component {args.component!r} is not one of {', '.join(SCORE_COLUMNS)}.")
    paths = [logdir] if logdir.is_file() else find_exports(logdir)
    if not paths:
        raise CLIError(
            f"no jepa-monitor exports under {logdir} (looked for */jepa_monitor/*.csv|parquet); attach "
            "JEPAScoreMonitor with export=True, or point at the run's log directory."
        )
    for path in paths:
        try:
            print(summarize_export(path, args.component, args.top))
        except ValueError as err:
            raise CLIError(f"{path}: {err}") from None
        print()
    return 0


# ---------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo.run import DemoConfig, DemoError, main as demo_main

    if args.pass_share.lower() != "none":
        try:
            float(args.pass_share)
        except ValueError:
            raise CLIError(f"--pass-share {args.pass_share!r} is not a number or 'none'.") from None
    config = DemoConfig(
        logdir=args.logdir,
        steps=args.steps,
        batch_size=args.batch_size,
        device=args.device,
        filter=not args.no_filter,
        compare=not args.no_compare,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads,
        pass_share=None if args.pass_share.lower() == "none" else float(args.pass_share),
    )
    try:
        demo_main(config)
    except DemoError as err:
        raise CLIError(str(err)) from None
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .demo.run import DemoConfig

    parser = argparse.ArgumentParser(
        prog="jepa-monitor",
        description="Watch the data a self-supervised model trains on through its own density estimate.",
    )
    parser.add_argument("--version", action="version", version=f"jepa-monitor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="train a small JEPA on digits with injected junk, monitor and curate it, print what was caught",
        description="Train a LeJEPA-style encoder on scikit-learn's digits (shipped, no download) with noise "
        "images, corrupted digits and a late-arriving class mixed in; monitor it with JEPAScoreMonitor, "
        "drop low-density rows, write TensorBoard logs and print AUROC / dropped fractions / probe accuracy.",
    )
    demo.add_argument("--logdir", default=d.logdir, help=f"TensorBoard and export directory (default {d.logdir})")
    demo.add_argument("--steps", type=int, default=d.steps, help=f"training steps per run (default {d.steps})")
    demo.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per batch (default {d.batch_size})")
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    demo.add_argument("--no-filter", action="store_true", help="monitor only: no curation policy, one run")
    demo.add_argument("--no-compare", action="store_true", help="skip the second (unfiltered) run for the probe comparison")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of data, junk and model (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--pass-share", default=str(d.pass_share),
                      help=f"the policy's pass_share: backward passes its Jacobian rows may add to a training "
                           f"batch, as a share of the batch's rows (default {d.pass_share}); 'none' scores every "
                           "row the policy's max_jacobian_rows allows")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; on a busy machine 1 avoids threads spinning against other jobs)")
    demo.set_defaults(func=cmd_demo)

    score = sub.add_parser(
        "score",
        help="score a dataset with an encoder and write the per-sample CSV",
        description="Score every sample of a dataset with JEPA-SCORE and write one row per sample "
        "(columns step, split, sample_id, jepa_score, log_prior, log_density, n_floored, kept, weight).",
    )
    score.add_argument("--encoder", metavar="MODULE:ATTR", help="an nn.Module instance/class or callable x -> embeddings")
    score.add_argument("--checkpoint", metavar="PATH", help="a Lightning checkpoint (.ckpt) instead of --encoder")
    score.add_argument("--attr", default="encoder", help="encoder attribute of the checkpoint's module (default encoder)")
    score.add_argument("--module-class", metavar="MODULE:CLASS", help="the checkpoint's LightningModule class")
    score.add_argument("--data", required=True, metavar="FILE.pt|MODULE:ATTR",
                       help="a tensor / dict of tensors saved with torch.save, or an importable tensor or dataset")
    score.add_argument("--input-key", metavar="KEY",
                       help="where the input sits in each data item: a dict key, a tuple/list index, or a dotted "
                       "path such as views.0.image (digits index lists/tuples); default: the first item")
    score.add_argument("--id-key", metavar="KEY",
                       help="where per-sample ids sit, same syntax as --input-key, e.g. views.0.sample_idx "
                       "(default: row position)")
    score.add_argument("--out", required=True, help="output file, .csv or .parquet")
    score.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    score.add_argument("--method", default="exact", choices=("exact", "slq"), help="exact (default) or slq")
    score.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    score.add_argument("--batch-size", type=int, default=256, help="rows scored at a time (default 256)")
    score.set_defaults(func=cmd_score)

    report = sub.add_parser(
        "report",
        help="summarise a run's per-sample exports in the terminal",
        description="Summarise every jepa-monitor export under LOGDIR: quantiles over time per split, drift "
        "against the first evaluation, least and most probable ids, and what a policy dropped.",
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a run's log directory (or one export file)")
    report.add_argument("--component", default="log_density", help="score column to summarise (default log_density)")
    report.add_argument("--top", type=int, default=5, help="how many least/most probable ids to list (default 5)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except CLIError as err:
        print(f"jepa-monitor: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("jepa-monitor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
