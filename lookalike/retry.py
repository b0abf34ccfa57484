"""The schedule of a loop that tries something again: how many tries, until when, and how long to pause between.

One helper for every such loop (the router's writes, reads, searches and counts; joining a Ray cluster), so that
each loop says only what it tries and when a try failed. It imports nothing of the project (base package: standard library only).

    retry = Retry(timeout=30.0)               # until 30 s from now; pauses 0.05, 0.1, 0.2, ... 1.0 s
    for attempt in retry:                     # attempt 0, 1, 2, ...
        if retry.left() <= 0:
            raise DeadlineExceeded(...)
        if try_it():
            break
        retry.pause()                         # or `await retry.pause_async()` on an event loop

The loop decides what a try is, whether it failed, whether to pause and what to raise at the end; ``Retry`` only
counts the tries, keeps the deadline and computes the pause of the current try: ``delay * factor ** attempt``,
at most ``max_delay``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator


class Retry:
    """Tries, a deadline and an exponential backoff, for one run of a retry loop (make a new one per run).

    Args:
        attempts: the most tries; None: as many as the deadline allows (the loop checks :meth:`left`).
        timeout: seconds from now to the deadline; None: no deadline.
        delay: the pause after the first try (attempt 0), in seconds.
        factor: each later try's pause is ``factor`` times the one before (1: a fixed pause).
        max_delay: the longest pause.
    """

    def __init__(self, attempts: int | None = None, timeout: float | None = None, delay: float = 0.05,
                 factor: float = 2.0, max_delay: float = 1.0):
        self.attempts = attempts
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.first_delay = delay
        self.factor = factor
        self.max_delay = max_delay
        self.attempt = -1  # the try under way: set by iterating

    def __iter__(self) -> Iterator[int]:
        """The tries' numbers, 0 first; ``attempts`` of them, or without end when attempts is None."""
        tries = itertools.count() if self.attempts is None else range(self.attempts)
        for self.attempt in tries:
            yield self.attempt

    def left(self) -> float | None:
        """Seconds until the deadline (negative once passed), or None when there is none."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        """Whether the deadline has passed (never, without one)."""
        left = self.left()
        return left is not None and left <= 0

    @property
    def delay(self) -> float:
        """The pause after the current try: ``delay * factor ** attempt``, at most ``max_delay``."""
        return min(self.first_delay * self.factor ** max(self.attempt, 0), self.max_delay)

    def pause(self) -> None:
        """Sleeps the current try's :attr:`delay` (blocking this thread)."""
        time.sleep(self.delay)

    async def pause_async(self) -> None:
        """:meth:`pause` on the running event loop."""
        await asyncio.sleep(self.delay)
