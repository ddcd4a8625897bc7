"""jepa-monitor: watch training data through the encoder's own density estimate (JEPA-SCORE).

The core (this package, minus ``jepa_monitor.callbacks`` and ``jepa_monitor.demo``) is pure torch +
numpy: functions take tensors and return tensors. The Lightning layer lives in
:mod:`jepa_monitor.callbacks`.
"""

from ._version import __version__
from .gaussian import gaussian_log_prior
from .scorer import Scorer
from .sample_scores import COMPONENTS, SampleScores
from .functional import jepa_score, log_density, score_samples
from .whitening import Whitening, WhitenedEncoder, whitened_components

__all__ = [
    "COMPONENTS",
    "SampleScores",
    "Scorer",
    "Whitening",
    "WhitenedEncoder",
    "__version__",
    "gaussian_log_prior",
    "jepa_score",
    "log_density",
    "score_samples",
    "whitened_components",
]
