"""A trio Stream over a connected Unix socket, with fewer trips through trio's
scheduler than :class:`trio.SocketStream`, whose receives and sends are two
checkpoints each, about half of the broker's busy time (docs/performance.md).

Here a receive or a send is tried at once, and only when the socket is not
ready does the task wait. A receive that found data at once yields to the
scheduler every :data:`YIELD_EVERY` times in a row, so that a client that
keeps the socket full cannot starve the other connections.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Final

import trio

YIELD_EVERY: Final = 4  # receives in a row that found data at once before one yields
RECEIVE_BUFFER: Final = 256 * 1024
# One buffer for every stream (copied out at once): ``recv(n)`` allocates ``n``
# bytes every call, and one per connection would cost memory per idle client.
_buffer = bytearray(RECEIVE_BUFFER)
_view = memoryview(_buffer)


class UnixStream(trio.abc.Stream):
    """Used by one task for receiving and at most one for sending at a time
    (:meth:`try_send` only while no writer has anything to send)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._ready_in_a_row = 0
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None, *, idle: bool = False) -> bytes:
        """``idle``: the peer waits for us, so wait before the first try (a syscall saved)."""
        sock = self.socket
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if idle:
            await self._wait(trio.lowlevel.wait_readable)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                n = sock.recv_into(_buffer, min(max_bytes or RECEIVE_BUFFER, RECEIVE_BUFFER))
                break
            except BlockingIOError:
                self._ready_in_a_row = 0
                await self._wait(trio.lowlevel.wait_readable)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
        data = bytes(_view[:n])
        self._ready_in_a_row += 1
        if self._ready_in_a_row >= YIELD_EVERY:
            # (Not "whenever other tasks are ready to run": trio's statistics
            # walk every registered socket, O(connections) a receive.)
            self._ready_in_a_row = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def try_send(self, data: bytes | bytearray) -> int:
        """Send what the socket takes of ``data`` now (0 if nothing), without waiting."""
        if self._closed:
            return 0
        try:
            return self.socket.send(data)
        except OSError:  # BlockingIOError, or broken: the next send_all says
            return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.socket
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    await self._wait(trio.lowlevel.wait_writable)
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        await wait(self.socket)
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed while waiting")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
