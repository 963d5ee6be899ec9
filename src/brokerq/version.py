"""The package's version: one place that both wings, the CLI and the public
face read (the broker reports it in hello and stats, the client's face
exports it), so that neither wing imports the other's to learn it."""

__version__ = "0.1.0"
