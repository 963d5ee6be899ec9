"""An asyncio loop for blocking callers: run by the calling thread itself
when it can, by a service thread when it cannot.

nats-py is asyncio-only, so the blocking client needs a loop. Running it in
a thread of its own and handing each call over (``run_coroutine_threadsafe``)
costs two thread wakeups a call, about 80 µs on a small VM: a reserve and
its ack paid more than nats-py's own work for them (bench/nats.py: 1.8x the
direct figures). So a call runs the loop in the caller's thread
(``run_until_complete``) whenever nobody else is running it: no handover at
all. One thread at a time may run a loop, so the rules are:

* A call finding the loop free runs it for the call's length (the *fast
  path*); anything else scheduled on the loop (nats-py's reader, pings,
  other threads' calls) runs meanwhile too.
* A call finding the loop busy (another thread's call, or the service
  thread) hands its coroutine over, as before, and counts as *foreign*.
* The thread that stops running the loop while foreign calls are pending
  hands the loop to the service thread, which runs it until none is left.
* When no call runs, the service thread runs a pass of the loop every
  ``IDLE_TICK`` seconds, so an idle connection still answers the
  server's pings, reconnects, flushes what was queued, and a reserved
  message's lease of its own is kept (:mod:`.aio_message`).

Ctrl-C in a fast-path call cancels the call's task (as ``asyncio.run``
does) rather than raising inside nats-py's code, and is raised once the
task has ended, so the connection is never left half-parsed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import signal
import threading
from collections.abc import Awaitable
from types import FrameType
from typing import Any, TypeVar

from ..errors import BrokerUnavailable

T = TypeVar("T")

#: The C module under ``signal`` (no stubs): ``signal.signal`` turns every
#: handler into an enum by raising and catching a ValueError, some 7 us a
#: call, which the blocking client would pay twice on every call.
_signal: Any = importlib.import_module("_signal")
#: How often the service thread runs a pass of the loop when no call does
#: (seconds): what timers and the server's messages need done meanwhile
#: advances a step a pass.
IDLE_TICK = 0.1
#: Who runs the loop: None (nobody), this marker (the service thread), or a caller's thread id.
_SERVICE = -1


class Driver:
    """One asyncio loop, run by whichever thread needs it (see the module's docstring)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._mutex = threading.Lock()
        self._runner: int | None = None
        self._foreign = 0
        self._closed = False
        self._wake = threading.Event()
        self._service = threading.Thread(target=self._serve, daemon=True, name="brokerq-nats")
        self._service.start()

    def run(self, coro: Awaitable[T], wait: float | None) -> T:
        """``coro``'s result; after ``wait`` seconds (None: never) it is
        cancelled and BrokerUnavailable raised, so no pull goes on for nobody."""
        call = coro
        nested = asyncio._get_running_loop() is not None  # (a caller inside some loop)
        with self._mutex:
            fast = self._runner is None and not nested and not self._closed
            if fast:
                self._runner = threading.get_ident()
            else:
                self._foreign += 1
                future = asyncio.run_coroutine_threadsafe(self._foreign_call(call), self.loop)
                if self._runner is None:
                    self._runner = _SERVICE
                    self._wake.set()
        if fast:
            return self._run_here(call, wait)
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the call's own (a JoinTimeout is a TimeoutError too), not our wait's
            future.cancel()
            raise BrokerUnavailable(f"NATS did not answer within {wait} s") from None
        except BaseException:
            future.cancel()
            raise

    def _run_here(self, call: Awaitable[T], wait: float | None) -> T:
        """The fast path: run the loop in this thread until ``call`` ends.

        The call's task stops the loop itself as it ends (``run_until_complete``
        would take one more pass of the loop to see it done: a poll of the
        sockets, on every call)."""
        task = self.loop.create_task(self._stopping_when_done(call, wait))
        interrupted = _CancelOnSigint(task, self.loop)
        try:
            with interrupted:
                while not task.done():
                    self.loop.run_forever()
                try:
                    return task.result()
                except asyncio.CancelledError:
                    if interrupted.count:
                        raise KeyboardInterrupt() from None
                    raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    self.loop.run_until_complete(task)
            self._release()

    async def _stopping_when_done(self, call: Awaitable[T], wait: float | None) -> T:
        try:
            return await _bounded(call, wait)
        finally:
            self.loop.stop()

    def _release(self) -> None:
        """Stop running the loop: the service thread takes it if foreign calls wait."""
        with self._mutex:
            if self._foreign:
                self._runner = _SERVICE
                self._wake.set()
            else:
                self._runner = None

    async def _foreign_call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        finally:
            # Counted done a pass later, with the callback that hands the
            # result to the waiting thread: stopping the loop now would leave
            # that callback, and the thread, waiting for the next pass.
            self.loop.call_soon(self._foreign_done)

    def _foreign_done(self) -> None:
        with self._mutex:
            self._foreign -= 1
            last = self._foreign == 0 and self._runner == _SERVICE
        if last:
            self.loop.stop()  # (the service thread's run_forever: see _serve)

    def _serve(self) -> None:
        """The service thread: run the loop for foreign calls, and a pass every IDLE_TICK."""
        while True:
            self._wake.wait(IDLE_TICK)
            self._wake.clear()
            with self._mutex:
                if self._runner is None:
                    self._runner = _SERVICE
                elif self._runner != _SERVICE:
                    continue  # a caller runs the loop: nothing to do
                if self._closed and not self._foreign:
                    self._runner = None
                    return
            while True:
                if not self._foreign:
                    self.loop.call_soon(self.loop.stop)  # one pass only
                self.loop.run_forever()  # (with foreign calls: until the last one ends)
                with self._mutex:
                    if not self._foreign:
                        self._runner = None
                        break

    def close(self, timeout: float) -> None:
        """End the service thread and close the loop (once nobody runs it)."""
        with self._mutex:
            self._closed = True
        self._wake.set()
        self._service.join(timeout)
        with self._mutex:
            idle = self._runner is None and not self._service.is_alive()
        if idle:
            self.loop.close()


async def _bounded(call: Awaitable[T], wait: float | None) -> T:
    scope = asyncio.timeout(wait)
    try:
        async with scope:
            return await call
    except TimeoutError:
        if scope.expired():
            raise BrokerUnavailable(f"NATS did not answer within {wait} s") from None
        raise


class _CancelOnSigint:
    """In the main thread, Ctrl-C cancels ``task`` instead of raising in the loop's callbacks."""

    def __init__(self, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.task = task
        self.loop = loop
        self.count = 0
        self._previous: Any = None

    def __enter__(self) -> _CancelOnSigint:
        if (
            threading.current_thread() is threading.main_thread()
            and _signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = _signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count == 1 and not self.task.done():
            self.task.cancel()
            self.loop.call_soon_threadsafe(lambda: None)  # (wake the loop's select)
            return
        raise KeyboardInterrupt()

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            _signal.signal(signal.SIGINT, self._previous)
