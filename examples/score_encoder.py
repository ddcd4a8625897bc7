"""Score a small example encoder on random inputs and print the per-sample components."""

import torch

import jepa_monitor

generator = torch.Generator().manual_seed(0)
torch.manual_seed(0)
encoder = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
x = torch.randn(6, 32, generator=generator)
x[5] *= 4.0  # an atypical sample

scores = jepa_monitor.score_samples(encoder, x)
print(f"{'sample':>6} {'jepa_score':>11} {'log_prior':>10} {'log_density':>12} {'floored':>8}")
for i in range(x.shape[0]):
    print(
        f"{i:>6} {scores.jepa_score[i].item():>11.3f} {scores.log_prior[i].item():>10.3f} "
        f"{scores.log_density[i].item():>12.3f} {int(scores.n_floored[i]):>8}"
    )
