"""What a shard admits to run: no call whose caller is gone or whose deadline passed (:func:`check_call`), and no
more writes at once than :class:`WriteGate` lets through, so that held-up writes (a slow fsync, a long wait for a
collection's write order) cannot take every thread of the shard's gRPC server and leave none to searches.

gRPC's synchronous server has one thread pool for every call; a write that waits holds its thread as one that
runs does. So the gate bounds both: ``running`` writes at once, ``waiting`` more queued for a slot (each until its
deadline), and any beyond answered RESOURCE_EXHAUSTED at once; the server's other threads stay free for searches
and reads. Uses the base package.
"""

from __future__ import annotations

import contextlib
import threading

from lookalike.config import RPC
from lookalike.errors import Busy, Cancelled, DeadlineExceeded, ResourceExhausted


def time_left(context) -> float | None:
    """Seconds left of the call's deadline; None when it has none (gRPC then reports about 2**63 s)."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None or remaining > 1e8 else remaining


def check_call(context, what: str) -> None:
    """Raises Cancelled if the caller cancelled the call or went away, DeadlineExceeded if its deadline passed:
    ``what`` (e.g. "the search") is not worth running, or answering.

    Raises:
        Cancelled, DeadlineExceeded.
    """
    if context is None:
        return
    if not context.is_active():
        raise Cancelled(f"{what} was not run: its caller cancelled it or went away")
    left = time_left(context)
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"{what} was not run: its deadline passed while it waited on the shard")

_RETRY_AFTER_S = 0.05  # the retry hint of a write refused by a full gate (writes take milliseconds to tens of them)


class WriteGate:
    """Lets at most ``running`` writes run at once and ``waiting`` more wait for a slot (see the module docstring).

    Args:
        running: writes at once.
        waiting: writes queued beyond those; a write past both gets RESOURCE_EXHAUSTED at once.
        what: names the shard in the error ("shard shard-0").
    """

    def __init__(self, running: int, waiting: int, what: str):
        if running < 1 or waiting < 0:
            raise ValueError(f"a write gate needs running >= 1 and waiting >= 0, got {running} and {waiting}")
        self.running = running
        self.waiting = waiting
        self.what = what
        self._slots = threading.Semaphore(running)
        self._lock = threading.Lock()
        self._queued = 0

    @contextlib.contextmanager
    def admit(self, context=None):
        """Holds a write slot for the ``with`` block; waits for one until the call's deadline (or the default
        deadline, lookalike.config.RpcPolicy.default_deadline_s, for a call without one).

        Raises:
            Busy: ``running`` writes run and ``waiting`` wait already (a RESOURCE_EXHAUSTED that passes: the router
                tries that shard again within the write's deadline).
            ResourceExhausted: no slot freed in time.
        """
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._queued >= self.waiting:
                    raise Busy(
                        f"{self.what} has {self.running} writes running and {self.waiting} waiting (its storage is "
                        "slow or writes come faster than it stores them): retry with backoff", _RETRY_AFTER_S)
                self._queued += 1
            try:
                left = time_left(context)
                got = self._slots.acquire(timeout=max(0.0, RPC.default_deadline_s if left is None else left))
            finally:
                with self._lock:
                    self._queued -= 1
            if not got:
                raise ResourceExhausted(f"{self.what}: the write waited its whole deadline for one of the "
                                        f"{self.running} write slots (its storage is slow): retry with backoff")
        try:
            check_call(context, "the write")  # after a wait its caller may be gone
            yield
        finally:
            self._slots.release()
