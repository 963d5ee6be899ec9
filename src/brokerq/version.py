"""The package's version, in one place that both wings read, so that neither
imports the other's to learn it."""

__version__ = "0.1.0"
