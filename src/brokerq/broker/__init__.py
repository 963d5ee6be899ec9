"""The broker wing: the sans-IO core and the trio I/O around it.

:mod:`.core` holds every queue and decides every request (with
:mod:`.state`, :mod:`.ready`, :mod:`.topics`, :mod:`.limits`, and
:mod:`.records` for what it journals); :mod:`.journal` keeps the records
on disk. Around them, trio: :mod:`.server` accepts and commits,
:mod:`.connection` serves one client, :mod:`.streaming` feeds prefetching
consumers, :mod:`.daemon` is ``local-queue-broker``. The wing imports the
shared modules (protocol, errors, spawn, pause, version), never the
client's. See docs/architecture.md.
"""
