"""consortium: federated fraud and anomaly detection without sharing data."""

__version__ = "0.1.0"
