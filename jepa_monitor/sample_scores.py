"""What one scoring pass returns: every per-sample component, and their names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The per-sample score components, in the order every table, export and gather uses.
COMPONENTS = ("jepa_score", "log_prior", "log_density")


@dataclass
class SampleScores:
    """Every per-sample component of one scoring pass (all tensors on the input's device).

    Attributes:
        jepa_score: Σ log σₖ(J_f(x)) over the rank, float32 (B,). Higher = more probable.
        log_prior: log-density of the embedding under the Gaussian it is read through
            (:mod:`jepa_monitor.reading`): log N(f(x); μ, Σ) for a fitted Gaussian, or the paper's
            -½‖f(x)‖² - K/2·log 2π under N(0, I); float32 (B,).
        log_density: ``jepa_score + log_prior``, float32 (B,): exactly log p(x) when f maps the
            data bijectively onto that Gaussian.
        n_floored: how many of the min(K, D) singular values were raised to the floor, int64 (B,).
            Non-zero means the Jacobian is (numerically) rank-deficient for that sample.
        embedding: f(x) after output selection and pooling, float32 (B, K), detached.
        input_dim: D, the number of input features differentiated against.
        method: "exact" or the approximation used.
    """

    jepa_score: torch.Tensor
    log_prior: torch.Tensor
    log_density: torch.Tensor
    n_floored: torch.Tensor
    embedding: torch.Tensor
    input_dim: int
    method: str

    @property
    def embed_dim(self) -> int:
        return self.embedding.shape[1]

    @property
    def rank_dim(self) -> int:
        """min(K, D): how many singular values each score sums."""
        return min(self.embed_dim, self.input_dim)

    def select(self, index: torch.Tensor) -> "SampleScores":
        """The rows ``index`` of every per-sample field."""
        return SampleScores(self.jepa_score[index], self.log_prior[index], self.log_density[index],
                            self.n_floored[index], self.embedding[index], self.input_dim, self.method)

    def components(self) -> dict:
        """{component name: (B,) scores} for every name of :data:`COMPONENTS`."""
        return {c: getattr(self, c) for c in COMPONENTS}
