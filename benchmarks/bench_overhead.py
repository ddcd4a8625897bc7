"""Wall-time overhead of JEPAScoreMonitor on a small CPU training run.

The same run (seeded: same weights, same batches) is trained with and without the callback, the two
alternating ``--repeats`` times; the ratio of the medians is the overhead. Both runs write to a
TensorBoard logger, so the ratio counts the monitor's own logging, histograms, images and export.
The example: a small convolutional encoder (8x8 single-channel images, embedding K=16, as in the
demo) trained with a two-view invariance loss plus a variance term, batch 64.

    python benchmarks/bench_overhead.py                 # default cadence and held-out size
    python benchmarks/bench_overhead.py --every 100 --incoming-every 20   # a denser setting
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from dataclasses import replace

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jepa_monitor.callbacks import Cadence, JEPAScoreMonitor


class Encoder(nn.Module):
    def __init__(self, width=16, embed_dim=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
            nn.Linear(2 * width * 16, 64), nn.GELU(), nn.Linear(64, embed_dim),
        )

    def forward(self, x):
        return self.net(x)


class TwoViewModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        a = self.encoder(x + 0.1 * torch.randn_like(x))
        b = self.encoder(x + 0.1 * torch.randn_like(x))
        variance = torch.relu(1 - torch.cat([a, b]).std(0)).mean()
        return (a - b).pow(2).mean() + variance

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TimedMonitor(JEPAScoreMonitor):
    """Counts the wall time spent inside every hook of the monitor: scoring, statistics, logging,
    TensorBoard and export. Its share of a run's wall time is robust to a busy machine, where the
    with/without ratio of two separate runs is not."""

    hook_seconds = 0.0


def _timed(name):
    def hook(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return getattr(JEPAScoreMonitor, name)(self, *args, **kwargs)
        finally:
            self.hook_seconds += time.perf_counter() - start

    return hook


for _name in ("on_fit_start", "on_train_batch_start", "on_train_batch_end", "on_train_end", "teardown"):
    setattr(TimedMonitor, _name, _timed(_name))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g)


def run(steps, monitor_kwargs, root):
    pl.seed_everything(0, verbose=False)
    model = TwoViewModule()
    train = DataLoader(TensorDataset(data(64 * 50, 0)), batch_size=64, shuffle=True)
    callbacks = []
    if monitor_kwargs is not None:
        callbacks.append(TimedMonitor("encoder", DataLoader(TensorDataset(data(512, 1)), batch_size=64), **monitor_kwargs))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(root, name="bench"),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=callbacks, log_every_n_steps=50,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model, train)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    seconds = callbacks[0].hook_seconds if callbacks else 0.0
    return wall, cpu, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=None, help="Cadence.every_n_batches (default: the callback's)")
    parser.add_argument("--incoming-every", type=int, default=None, help="Cadence.incoming_every_n_batches")
    args = parser.parse_args()
    cadence = Cadence()
    if args.every is not None:
        cadence = replace(cadence, every_n_batches=args.every)
    if args.incoming_every is not None:
        cadence = replace(cadence, incoming_every_n_batches=args.incoming_every)
    kwargs = {"cadence": cadence}
    cfg = {k: getattr(cadence, k) for k in ("every_n_batches", "incoming_every_n_batches", "heldout_rows", "incoming_rows")}
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())
    plain, watched, scoring = [], [], []
    with tempfile.TemporaryDirectory() as root:
        run(50, kwargs, root)  # warm-up: imports, first-call allocations
        for _ in range(args.repeats):
            plain.append(run(args.steps, None, root)[:2])
            wall, cpu, seconds = run(args.steps, kwargs, root)
            watched.append((wall, cpu))
            scoring.append(seconds / wall)
    print(f"config: steps={args.steps} batch=64 K=16 D=64 threads={torch.get_num_threads()} " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    print(f"{'clock':<14}{'without (min)':>14}{'with (min)':>12}{'ratio min':>11}{'ratio median':>14}  all runs without | with")
    for i, clock in enumerate(("wall", "process CPU")):
        p = [r[i] for r in plain]
        w = [r[i] for r in watched]
        print(f"{clock:<14}{min(p):>14.2f}{min(w):>12.2f}{min(w) / min(p):>11.3f}"
              f"{statistics.median(w) / statistics.median(p):>14.3f}  "
              f"{', '.join(f'{t:.1f}' for t in p)} | {', '.join(f'{t:.1f}' for t in w)}")
    share = statistics.median(scoring)
    print(f"time inside the monitor's hooks / wall time of the monitored run (median): {100 * share:.2f}% "
          f"-> ratio {1 / (1 - share):.3f}  (target: ratio <= 1.05)")


if __name__ == "__main__":
    main()
