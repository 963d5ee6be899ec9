"""The broker wing: the sans-IO core, and the trio I/O around it.

:mod:`.core` (a folder) holds every queue and decides every request, given
the time: it imports no trio and does no I/O. Around it, trio:
:mod:`.server` accepts connections, :mod:`.connection` (with
:mod:`.replies`, :mod:`.delivery`, :mod:`.feeds`, :mod:`.streaming`) serves
one client, :mod:`.broker_base` commits the :mod:`.journal` (format in
:mod:`.journal_file`), :mod:`.daemon` is ``local-queue-broker``. The wing
imports the shared modules (protocol, errors, spawn, pause, version), never
the client's. See docs/architecture.md.
"""
