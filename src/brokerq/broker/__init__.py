"""The broker wing: the sans-IO core (:mod:`.core`, no trio and no I/O), and
the trio I/O around it (docs/architecture.md). It imports the shared modules,
never the client's.
"""
