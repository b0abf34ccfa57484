"""A read-write lock: the one a collection's searches share and its writes take alone (see shard.collection); and
a lock per name (a shard's opening and dropping of a collection, see shard.shard); and the pause that lets a lock's
waiters in between the parts of a long task.

Uses only the standard library.
"""

from __future__ import annotations

import threading
import time


def let_waiters_in() -> None:
    """Called between two holds of a lock by a long task done in parts (a pack of shared IVF lists, a move into a
    trained index): the threads that waited for the lock take it. Released, neither ``threading.Lock`` nor
    :class:`RWLock` is handed to a waiter: the releasing thread, running, would take it again at once."""
    time.sleep(0.001)


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    class _Ctx:
        def __init__(self, acquire, release):
            self._acquire, self._release = acquire, release

        def __enter__(self):
            self._acquire()

        def __exit__(self, *exc):
            self._release()

    def read(self):
        return self._Ctx(self.acquire_read, self.release_read)

    def write(self):
        return self._Ctx(self.acquire_write, self.release_write)


class NamedLocks:
    """One lock per name, made when first asked for (names are few: a shard's collections)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def of(self, name: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(name, threading.Lock())
