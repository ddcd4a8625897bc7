"""Alerts that mean something: false alarms on clean data, and the delay to a real shift.

Everything runs on the demo's data and encoder (:mod:`jepa_monitor.demo`): the shipped 8×8 digits,
``make_splits(seed)``, :class:`~jepa_monitor.demo.lit.DigitJEPA` trained by a Lightning Trainer with
:class:`~jepa_monitor.callbacks.JEPAScoreMonitor` attached to the demo's module (held-out set: the
whole reference split, every row scored; held-out evaluation every ``steps // 10`` batches unless
``--heldout-every``, incoming every ``steps // 25`` unless ``--incoming-every`` (``auto``: right after
each held-out evaluation, the monitor's default), 32 incoming rows, ``Alerts.component="log_density"``,
the monitor's default ``Alerts.threshold``; ``--policy`` adds the demo's policy, ``make_policy(0.05)``).
``jepa-monitor demo`` itself attaches the monitor at its defaults (``Cadence()``: spaced by
``pass_share``).

1. **False alarms.** A CLEAN stream: rows drawn with replacement from the clean training pool of the
   training classes, no junk and no novel class (``DigitStream(junk_fraction=0, arrival=1)``). A
   whole run per seed. Counted per run: incoming evaluations, those compared with same-batch held-out
   scores (only those can alert), data-shift alerts (``<name>/incoming/data_shift_alert`` = 1) and
   how often it turned on (the warning), and, separately, model-change alerts
   (``<name>/heldout/model_change_alert`` = 1; logged, not warned by default).
2. **Delay.** The same clean stream until ``--onset`` of the run, then whole batches of one shifted
   kind (``--shift-fraction`` of every batch; 1.0 = whole batches): a junk kind of
   :func:`jepa_monitor.demo.data.corrupt` made from the row's digit, or ``novel_class`` (digits of
   the class absent from the reference split and from the stream before the onset). Delay = incoming
   evaluations after the first one that saw shifted rows, up to the first data-shift alert (0: the
   first incoming evaluation that saw the shift alerted), and the same in training batches. A run
   stops at its first alert after the onset.

The KS statistic of 32 incoming rows against ~240 held-out rows exceeds 0.5 by chance with
probability well below 1e-4, so on a clean stream any alert is systematic, not sampling noise.

    python benchmarks/bench_alerts.py                                   # 1000 steps, seeds 0 1 2
    python benchmarks/bench_alerts.py --steps 2000 --seeds 0 1 2 3 4    # the demo's length
    python benchmarks/bench_alerts.py --kinds noise novel_class --shift-fraction 0.25
    python benchmarks/bench_alerts.py --heldout-every 40                # compare every incoming evaluation
    python benchmarks/bench_alerts.py --incoming-every auto             # the monitor's default: after each held-out
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from jepa_monitor.demo.data import JUNK_KINDS, KIND_INDEX, DigitSplits, DigitStream, corrupt, make_splits, normalise

SHIFT_KINDS = JUNK_KINDS + ("novel_class",)
INCOMING_ROWS = 32  # as the demo


class Rows(Dataset):
    """A fixed stream of rows, as the demo's DigitStream yields them."""

    def __init__(self, x: torch.Tensor, kinds: torch.Tensor):
        self.x, self.kinds = x, kinds

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "id": i, "kind": int(self.kinds[i])}


def clean_stream(splits: DigitSplits, length: int, seed: int) -> Rows:
    s = DigitStream(splits, length, junk_fraction=0.0, arrival=1.0, seed=seed)
    assert bool((s.kinds == KIND_INDEX["clean"]).all())
    return Rows(s.x, s.kinds)


def shifted_stream(splits: DigitSplits, length: int, seed: int, kind: str, onset_row: int, fraction: float) -> Rows:
    """Clean rows; from ``onset_row`` on, ``fraction`` of the rows (evenly spread) are ``kind``."""
    base = clean_stream(splits, length, seed)
    x, kinds = base.x.clone(), base.kinds.clone()
    gen = torch.Generator().manual_seed(seed + 1000)
    after = torch.arange(onset_row, length)
    # Row i after the onset is shifted when floor((i+1)·f) > floor(i·f): exactly `fraction` of every batch.
    j = torch.arange(after.numel(), dtype=torch.float64)
    rows = after[torch.floor((j + 1) * fraction) > torch.floor(j * fraction)]
    images, labels = splits.train
    if kind == "novel_class":
        pool = torch.nonzero(labels == splits.novel_class).flatten()
        raw = images[pool[torch.randint(len(pool), (rows.numel(),), generator=gen)]].to(torch.float32)
    else:
        pool = torch.nonzero(labels != splits.novel_class).flatten()
        src = images[pool[torch.randint(len(pool), (rows.numel(),), generator=gen)]]
        raw = corrupt(src, kind, gen)
    x[rows] = normalise(raw)
    kinds[rows] = KIND_INDEX[kind]
    return Rows(x, kinds)


def make_capture_logger():
    from lightning.pytorch.loggers.logger import Logger

    class Capture(Logger):
        """Keeps the monitor's logged scalars in memory (no disk, no TensorBoard)."""

        def __init__(self, prefix: str):
            super().__init__()
            self.prefix, self.rows = prefix, []

        @property
        def name(self) -> str:
            return "capture"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
            mine = {k: float(v) for k, v in metrics.items() if k.startswith(self.prefix)}
            if mine:
                self.rows.append((step, mine))

    return Capture("jepa/")


def run_once(splits: DigitSplits, stream: Rows, *, steps: int, batch_size: int, seed: int, threshold: float,
             policy: bool, stop_after_batch: Optional[int], heldout_every: int, incoming_every: Any) -> Dict[str, Any]:
    """One demo-configured training run; the monitor's history and the alert metrics it logged."""
    import lightning as L
    from lightning.pytorch import Callback

    from jepa_monitor.callbacks import Alerts, Cadence, JEPAScoreMonitor, Outputs
    from jepa_monitor.demo.lit import DigitJEPA
    from jepa_monitor.demo.run import make_policy

    reference = normalise(splits.reference[0])
    monitor = JEPAScoreMonitor(  # the arguments of jepa_monitor.demo.run.train
        encoder="encoder", heldout=reference, input_key="x", id_key="id",
        cadence=Cadence(heldout_rows=reference.shape[0], every_n_batches=heldout_every,
                        incoming_every_n_batches=incoming_every, incoming_rows=INCOMING_ROWS, seed=seed),
        alerts=Alerts(threshold=threshold), outputs=Outputs(num_images=0, export=False),
        policy=make_policy(0.05) if policy else None)

    class StopAtAlert(Callback):
        """Ends the run at the first data-shift alert at or after ``stop_after_batch``."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            h = monitor.history
            if (stop_after_batch is not None and h and h[-1]["split"] == "incoming" and h[-1]["batch"] >= stop_after_batch
                    and h[-1]["shift_ks"] is not None and h[-1]["shift_ks"] > threshold):
                trainer.should_stop = True

    logger = make_capture_logger()
    torch.manual_seed(seed)
    module = DigitJEPA(seed=seed)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger,
                        callbacks=[monitor, StopAtAlert()], enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, log_every_n_steps=max(1, steps // 100))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(stream, batch_size=batch_size, shuffle=False))
    warned = [str(w.message) for w in caught if "data shift alert" in str(w.message)]
    return {"history": list(monitor.history), "logged": logger.rows, "warned": warned,
            "seconds": time.perf_counter() - start, "batches": monitor._batches}


def summarise(run: Dict[str, Any], threshold: float) -> Dict[str, Any]:
    incoming = [h for h in run["history"] if h["split"] == "incoming"]
    compared = [h for h in incoming if h["shift_ks"] is not None and not math.isnan(h["shift_ks"])]
    shift_on = [h for h in compared if h["shift_ks"] > threshold]
    change = [(step, m["jepa/heldout/model_change_alert"]) for step, m in run["logged"] if "jepa/heldout/model_change_alert" in m]
    change_ks = [(step, m["jepa/heldout/log_density/change_ks"]) for step, m in run["logged"]
                 if "jepa/heldout/log_density/change_ks" in m]
    return {
        "incoming": len(incoming), "compared": len(compared), "compared_batches": [h["batch"] for h in compared],
        "shift_alerts": len(shift_on), "shift_alert_batches": [h["batch"] for h in shift_on],
        "shift_turn_on": len(run["warned"]), "max_shift_ks": max((h["shift_ks"] for h in compared), default=float("nan")),
        "shift_ks": [(h["batch"], round(h["shift_ks"], 3)) for h in compared],
        "change_evals": len(change), "change_alerts": int(sum(v for _, v in change)),
        "change_alert_steps": [s for s, v in change if v], "change_ks": [(s, round(v, 3)) for s, v in change_ks],
    }


def delay(run: Dict[str, Any], onset_batch: int, threshold: float) -> Dict[str, Any]:
    """Incoming evaluations (and batches) from the first one that saw shifted rows to the first alert."""
    seen = [h for h in run["history"] if h["split"] == "incoming" and h["batch"] >= onset_batch]
    first_seen = seen[0]["batch"] if seen else None
    at = next((i for i, h in enumerate(seen) if h["shift_ks"] is not None and h["shift_ks"] > threshold), None)
    first_compared = next((h["batch"] for h in seen if h["shift_ks"] is not None), None)
    out = {"first_seen": first_seen, "first_compared": first_compared,
           "ks_after": [(h["batch"], round(h["shift_ks"], 3)) for h in seen if h["shift_ks"] is not None]}
    if at is None:
        out.update(evals=None, batches=None, alert_batch=None)
    else:
        out.update(evals=at, batches=seen[at]["batch"] - onset_batch, alert_batch=seen[at]["batch"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=["noise", "occluded", "novel_class"], choices=SHIFT_KINDS)
    p.add_argument("--shift-seeds", type=int, nargs="+", default=None, help="seeds of the delay runs (default: --seeds)")
    p.add_argument("--onset", type=float, default=0.5, help="fraction of the run after which shifted rows arrive")
    p.add_argument("--shift-fraction", type=float, default=1.0, help="share of every batch after the onset")
    p.add_argument("--threshold", type=float, default=None, help="Alerts.threshold (default: the monitor's)")
    p.add_argument("--policy", action="store_true", help="attach the demo's Drop policy (the filtered run)")
    p.add_argument("--heldout-every", type=int, default=None,
                   help="held-out cadence in batches (default: the demo's steps // 10); set it to the incoming "
                        "cadence to compare every incoming evaluation")
    p.add_argument("--incoming-every", default=None,
                   help="incoming cadence in batches, or 'auto' (right after each held-out evaluation, the monitor's "
                        "default); default: the demo's steps // 25")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-clean", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print every KS value")
    args = p.parse_args()

    from jepa_monitor.callbacks import Alerts

    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|SummaryWriter).*")
    threshold = args.threshold
    if threshold is None:
        threshold = Alerts().threshold
    steps, batch = args.steps, args.batch_size
    heldout_every = args.heldout_every or max(1, steps // 10)
    incoming_every: Any = args.incoming_every or max(1, steps // 25)
    if incoming_every != "auto":
        incoming_every = int(incoming_every)
    cadence = dict(heldout_every=heldout_every, incoming_every=incoming_every)
    period = heldout_every if incoming_every == "auto" else math.lcm(heldout_every, incoming_every)
    per_period = 1 if incoming_every == "auto" else period // incoming_every
    cadence_text = ("right after each held-out evaluation" if incoming_every == "auto"
                    else f"every {incoming_every} batches")
    onset_batch = int(round(args.onset * steps))
    shift_seeds = args.shift_seeds if args.shift_seeds is not None else args.seeds
    n_ref = {s: int(make_splits(seed=s).reference[0].shape[0]) for s in set(args.seeds) | set(shift_seeds)}
    print(f"settings: {steps} steps x {batch} rows, held-out every {heldout_every} batches ({min(n_ref.values())}-"
          f"{max(n_ref.values())} reference rows, all scored), incoming {cadence_text} "
          f"({INCOMING_ROWS} rows), Alerts(component=log_density, threshold={threshold}), "
          f"policy={'Drop(0.05, warmup=%d)' % (steps // 5) if args.policy else 'none'}, threads={args.threads}, "
          f"torch {torch.__version__}")
    print(f"data shift is compared only where a held-out evaluation (after b batches) meets an incoming one (before "
          f"the next batch): every {period} batches, i.e. 1 incoming evaluation in {per_period}; a shift "
          f"that is caught at the first comparison waits 0-{per_period - 1} incoming evaluations for it")
    print(f"seeds (clean): {args.seeds}; seeds (delay): {shift_seeds}; onset at batch {onset_batch}, "
          f"shifted share of each batch {args.shift_fraction}", flush=True)

    if not args.skip_clean:
        print("\n1. CLEAN stream (no junk, no novel class), whole run")
        print(f"{'seed':>4} {'incoming':>8} {'compared':>8} {'shift alerts':>12} {'turn-on':>7} {'max shift_ks':>12} "
              f"{'model-change alerts':>19} {'seconds':>8}")
        totals = {"compared": 0, "shift_alerts": 0, "change_evals": 0, "change_alerts": 0}
        for seed in args.seeds:
            splits = make_splits(seed=seed)
            run = run_once(splits, clean_stream(splits, steps * batch, seed), steps=steps, batch_size=batch, seed=seed,
                           threshold=threshold, policy=args.policy, stop_after_batch=None, **cadence)
            s = summarise(run, threshold)
            for k in totals:
                totals[k] += s[k]
            print(f"{seed:>4} {s['incoming']:>8} {s['compared']:>8} {s['shift_alerts']:>12} {s['shift_turn_on']:>7} "
                  f"{s['max_shift_ks']:>12.3f} {str(s['change_alerts']) + ' / ' + str(s['change_evals']):>19} "
                  f"{run['seconds']:>8.0f}", flush=True)
            print(f"     compared at batches {s['compared_batches']}; shift alerts at {s['shift_alert_batches']}; "
                  f"model-change alerts at steps {s['change_alert_steps']}")
            if args.verbose:
                print(f"     shift_ks {s['shift_ks']}\n     change_ks {s['change_ks']}")
        print(f"total: {totals['shift_alerts']} data-shift alerts in {totals['compared']} compared incoming "
              f"evaluations over {len(args.seeds)} runs; {totals['change_alerts']} model-change alerts in "
              f"{totals['change_evals']} held-out comparisons", flush=True)

    if args.kinds:
        print(f"\n2. SHIFT from batch {onset_batch}: {args.shift_fraction:.0%} of every batch is the kind; "
              f"delay = incoming evaluations after the first that saw it (incoming: {cadence_text})")
        print(f"{'kind':<12} {'seed':>4} {'first saw':>9} {'first compared':>14} {'alert at':>8} {'delay evals':>11} "
              f"{'delay batches':>13} {'seconds':>8}")
        for kind in args.kinds:
            for seed in shift_seeds:
                splits = make_splits(seed=seed)
                stream = shifted_stream(splits, steps * batch, seed, kind, onset_batch * batch, args.shift_fraction)
                run = run_once(splits, stream, steps=steps, batch_size=batch, seed=seed, threshold=threshold,
                               policy=args.policy, stop_after_batch=onset_batch, **cadence)
                d = delay(run, onset_batch, threshold)
                fmt = lambda v: "none" if v is None else str(v)  # noqa: E731
                print(f"{kind:<12} {seed:>4} {fmt(d['first_seen']):>9} {fmt(d['first_compared']):>14} "
                      f"{fmt(d['alert_batch']):>8} {fmt(d['evals']):>11} {fmt(d['batches']):>13} {run['seconds']:>8.0f}",
                      flush=True)
                if args.verbose:
                    print(f"     shift_ks after the onset {d['ks_after']}")


if __name__ == "__main__":
    main()
