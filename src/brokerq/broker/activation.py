"""systemd socket activation (docs/systemd.md): the listener comes as file
descriptor 3 with ``LISTEN_FDS=1`` and ``LISTEN_PID``. The broker still takes
``<socket>.lock`` (the lock holder is the broker), never binds, renames or
unlinks the socket (systemd owns it), and on idle exit simply exits.
"""

from __future__ import annotations

import os
import socket

from ..errors import BrokerqError
from ..spawn import LISTEN_BACKLOG, close_in_forked_children

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


class ActivationError(BrokerqError):
    """The sockets systemd passed cannot be served."""


def inherited_listener(socket_path: str) -> socket.socket | None:
    """The listener systemd passed, or None; ``LISTEN_*`` are unset, for no child to take."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid is None or count is None or pid != str(os.getpid()):
        return None
    if count != "1":
        raise ActivationError(f"systemd passed {count} sockets; brokerq serves exactly one")
    sock = socket.socket(fileno=LISTEN_FDS_START)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ActivationError("the socket systemd passed is not a Unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError("the socket systemd passed is not listening")
        bound = sock.getsockname()
        if not isinstance(bound, str) or os.path.realpath(bound) != os.path.realpath(socket_path):
            raise ActivationError(
                f"the socket systemd passed is bound to {bound!r}, not to {socket_path!r} "
                "(give local-queue-broker the path of the unit's ListenStream=)"
            )
    except BaseException:
        sock.detach()  # not ours to close: leave the descriptor as systemd gave it
        raise
    sock.set_inheritable(False)
    # The system's maximum backlog, as a broker that binds its own socket asks for.
    sock.listen(LISTEN_BACKLOG)
    close_in_forked_children(sock)
    return sock
