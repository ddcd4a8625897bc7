"""Lightning callbacks of jepa-monitor (installed as ``jepa_monitor.callbacks``)."""
