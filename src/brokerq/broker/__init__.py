"""The broker wing: the sans-IO core (:mod:`.core`) and the trio I/O around it."""
