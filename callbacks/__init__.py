"""Lightning callbacks of jepa-monitor (installed as ``jepa_monitor.callbacks``)."""

from .monitor import JEPAScoreMonitor

__all__ = ["JEPAScoreMonitor"]
