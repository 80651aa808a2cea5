"""PatchCore anomaly detection as an experiment framework."""

__version__ = "0.1.0"
