"""Score a small encoder on random inputs and print the per-sample components.

    python examples/score_encoder.py [--rows 6]

The last row is scaled ×4, an atypical sample. The components are printed under the paper's
N(0, I) reading and under a Gaussian fitted to reference embeddings (the monitor's default reading).
"""

import argparse

import torch

import jepa_monitor
from jepa_monitor.reading import fit_reading


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    x = torch.randn(args.rows, 32, generator=generator)
    x[-1] *= 4.0  # an atypical sample
    reference = torch.randn(256, 32, generator=generator)  # distinct from the scored rows

    scorer = jepa_monitor.Scorer(encoder)
    isotropic = scorer.score(x)
    fitted = scorer.replace(prior=fit_reading(scorer.embed(reference))).score(x)
    print(f"{'sample':>6} {'jepa_score':>11} {'log_prior':>10} {'log_density':>12} {'fitted log_density':>19} {'floored':>8}")
    for i in range(x.shape[0]):
        print(
            f"{i:>6} {isotropic.jepa_score[i].item():>11.3f} {isotropic.log_prior[i].item():>10.3f} "
            f"{isotropic.log_density[i].item():>12.3f} {fitted.log_density[i].item():>19.3f} "
            f"{int(isotropic.n_floored[i]):>8}"
        )
    return {"isotropic": isotropic, "fitted": fitted}


if __name__ == "__main__":
    main()
