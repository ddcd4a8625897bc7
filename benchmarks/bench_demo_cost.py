"""What curating every batch costs the demo: filtered / unfiltered training wall time over paired runs.

One demo run pair is noisy: on the 2-core machine the unfiltered run alone took 49-60 s across runs
of the same code, so one ratio carries about +-0.1. This script runs ``--pairs`` pairs back to back
(the demo's data, model, monitor and ``Drop()`` defaults, ``jepa_monitor.demo.run.train``), the
filtered run first in even pairs and second in odd ones (a drift in machine speed then does not
favour one side), and prints per pair:

- ``filtered``, ``unfiltered``: ``trainer.fit`` seconds of each run;
- ``ratio``: filtered / unfiltered (the demo's "Filtered / unfiltered training wall time");
- ``curation``: seconds the monitor spent curating inside the filtered run (deciding every batch and
  refreshing the reference; ``callbacks/_clock.py``), and ``within`` = 1 + curation / (filtered -
  curation): the ratio read from the filtered run alone, immune to run-to-run speed changes (a slight
  over-estimate: the rest of the filtered run trains on the ~10 % fewer rows the policy kept);

then the median and range of ``ratio`` and ``within``. The curated rows are identical in every
filtered run (count-paced; the script checks the policy's counters agree).

    OMP_NUM_THREADS=1 python benchmarks/bench_demo_cost.py --pairs 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jepa_monitor.demo.data import DigitStream, make_splits  # noqa: E402
from jepa_monitor.demo.run import DemoConfig, make_policy, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pass-share", type=float, default=None, help="the policy's pass_share (default: the policy's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    splits = make_splits(seed=args.seed)
    stream = DigitStream(splits, args.steps * args.batch_size, seed=args.seed)
    print(f"demo cost: {args.pairs} pairs, {args.steps} steps x {args.batch_size} rows, seed {args.seed}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, pass_share {args.pass_share or 'default'}")
    print(f"{'pair':>4} {'order':>9} {'filtered':>9} {'unfiltered':>11} {'ratio':>6} {'curation':>9} {'within':>7}")
    ratios, within, counts = [], [], []
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = DemoConfig(logdir=logdir, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            progress=False, threads=args.threads)
        if args.pass_share is not None:
            config.pass_share = args.pass_share
        for pair in range(args.pairs):
            runs = {}
            order = ("filtered", "unfiltered") if pair % 2 == 0 else ("unfiltered", "filtered")
            for version in order:
                policy = make_policy(config.quantile, config.pass_share) if version == "filtered" else None
                runs[version] = train(config, splits, stream, device="cpu", policy=policy, version=f"{version}{pair}")
                if policy is not None:
                    counts.append(dict(policy.counts))
            f, u, c = runs["filtered"].seconds, runs["unfiltered"].seconds, runs["filtered"].curation_seconds
            ratios.append(f / u)
            within.append(1 + c / (f - c))
            print(f"{pair:>4} {order[0][:1] + '-' + order[1][:1]:>9} {f:>9.1f} {u:>11.1f} {ratios[-1]:>6.2f} {c:>9.1f} "
                  f"{within[-1]:>7.2f}")
    print(f"ratio  median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"within median {statistics.median(within):.2f}, range {min(within):.2f}-{max(within):.2f}")
    same = all(c == counts[0] for c in counts)
    print(f"policy counters identical in every filtered run: {same} (rows dropped {int(counts[0]['rows_dropped'])}, "
          f"Jacobian rows {int(counts[0]['rows_scored'])})")


if __name__ == "__main__":
    main()
