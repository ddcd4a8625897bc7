"""Lightning callbacks of jepa-monitor (installed as ``jepa_monitor.callbacks``)."""

from ._options import Alerts, Cadence, Outputs
from .monitor import JEPAScoreMonitor

__all__ = ["Alerts", "Cadence", "JEPAScoreMonitor", "Outputs"]
