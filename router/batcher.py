"""Batches concurrent searches: many callers with one query each become one fan-out with many queries.

A search costs a fixed amount per request (a gRPC call to every shard in the cover, a FAISS call on each) and a
small amount per query. When many callers search at once, the batcher gathers the queries that arrive while
earlier batches are still running and sends them as one request, so the shards make one FAISS call for all of
them and the fixed cost is paid once.

It lives in the router's asyncio gRPC server (router/server.py): callers are coroutines on the server's event
loop, so gathering them takes no lock and no thread per waiting caller; a batch runs the unbatched search, a
coroutine on the same loop (``Router.search_async``), or a blocking function on a thread of ``executor``.

Rules, per compatible group (same collection, k, search parameters, min_coverage and payload flag):

- a search that finds nothing of its group running goes at once: a lone caller never waits;
- otherwise it joins the group's pending batch, which goes as soon as fewer than ``max_inflight`` batches of the
  group are running (by default one: the pending batch goes when the running one ends, with every query that
  arrived meanwhile), then waits at most ``max_wait_s`` for more queries (when ``max_inflight`` > 1 lets it go
  while another runs), and goes at once when it holds ``max_batch`` queries and a slot is free;
- each caller gets its own rows of the merged answer, so a batched search returns what the same search alone
  returns (with the coverage and epoch of the batch it went with).

So no search waits longer than one batch of its kind takes, plus ``max_wait_s``; under load the batches grow with
it (with C callers in flight, about C/2 queries a batch).

The batch's timeout is the latest of its callers' deadlines (none when one has none); each caller waits no
longer than its own; a failed batch fails each of its callers with its error.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import time

import numpy as np

from lookalike.config import LIMITS, max_search_rows
from lookalike.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from lookalike.metrics import BATCH_QUERIES

# Defaults: one batch of a group running at once (measured on 2 cores with 64 single-query clients: larger
# batches and fewer requests gave 5-15% more queries per second and a lower p50 than two at once; see
# docs/BENCHMARKS.md), at most 256 queries a batch, gathering at most 300 us when more than one may run.
MAX_WAIT_S = 300e-6
MAX_BATCH = 256
MAX_INFLIGHT = 1


@dataclasses.dataclass
class _Call:
    xq: np.ndarray
    deadline: float | None
    future: asyncio.Future
    # the caller's context (its trace): a batch's shard calls are made in its first call's
    context: contextvars.Context = dataclasses.field(default_factory=contextvars.copy_context)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("the search's deadline passed while it waited in a batch"))


class _Group:
    def __init__(self, max_rows: int):
        self.max_rows = max_rows  # queries one batch may carry (see SearchBatcher._send)
        self.pending: list[_Call] = []
        self.queued = 0  # queries in pending
        self.inflight = 0
        self.timer: asyncio.TimerHandle | None = None


class SearchBatcher:
    """Batches ``search(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout)`` calls made
    from coroutines on one event loop.

    Args:
        search: the unbatched search (``Router.search_async``, or the blocking ``Router.search``); returns a
            ``SearchResult``.
        executor: where batches of a blocking ``search`` run (a ``concurrent.futures`` executor).
        max_wait_s: how long a batch gathers while another of its group runs.
        max_batch: queries that send a batch at once.
        max_inflight: batches of one group running at once.
    """

    def __init__(self, search, executor, max_wait_s: float = MAX_WAIT_S, max_batch: int = MAX_BATCH,
                 max_inflight: int = MAX_INFLIGHT):
        self._search = search
        self._executor = executor
        self._is_async = inspect.iscoroutinefunction(search)  # partials of coroutine functions count too
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self.max_inflight = max(1, max_inflight)
        self._groups: dict[tuple, _Group] = {}
        self.batches = 0  # batches sent (for tests and benchmarks)
        self.queries = 0

    async def search(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
                     min_coverage: float = 1.0, include_payloads: bool = False, timeout: float | None = None):
        loop = asyncio.get_running_loop()
        if len(xq) >= self.max_batch:  # already a big batch: nothing to gain by waiting
            return await self._start(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout)
        key = (name, k, nprobe, ef_search, min_coverage, include_payloads, xq.dtype.str, xq.shape[1])
        group = self._groups.get(key)
        if group is None:
            # As many queries as one search can carry: the shards' answer and the request to them each fit in a
            # message (see also _done).
            rows = min(max_search_rows(k, include_payloads),
                       LIMITS.max_message_bytes // 2 // max(1, xq.dtype.itemsize * xq.shape[1]))
            group = self._groups[key] = _Group(rows)
        call = _Call(xq, None if timeout is None else time.monotonic() + timeout, loop.create_future())
        group.pending.append(call)
        group.queued += len(xq)
        self._schedule(key, group)
        if timeout is None:
            return await call.future
        # A timer rather than asyncio.wait_for, which costs a task per call.
        timer = loop.call_later(timeout, _expire, call.future)
        try:
            return await call.future
        finally:
            timer.cancel()

    def _schedule(self, key: tuple, group: _Group) -> None:
        """Sends the pending batch now, or arms its timer, or leaves it for the end of a running batch."""
        if not group.pending or group.inflight >= self.max_inflight:
            return
        if group.inflight == 0 or group.queued >= self.max_batch or self.max_wait_s <= 0:
            self._send(key, group)
        elif group.timer is None:
            group.timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._on_timer, key, group)

    def _on_timer(self, key: tuple, group: _Group) -> None:
        group.timer = None
        self._schedule_now(key, group)

    def _schedule_now(self, key: tuple, group: _Group) -> None:
        if group.pending and group.inflight < self.max_inflight:
            self._send(key, group)

    def _send(self, key: tuple, group: _Group) -> None:
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        # As many pending calls as the group's max_rows allows, at least one; the rest go next.
        take, n = 0, 0
        while take < len(group.pending) and (not take or n + len(group.pending[take].xq) <= group.max_rows):
            n += len(group.pending[take].xq)
            take += 1
        batch, group.pending = group.pending[:take], group.pending[take:]
        group.queued -= n
        self._run(key, group, batch)
        if group.pending:  # what did not fit: now if another batch may run, else when one ends
            self._schedule(key, group)

    def _run(self, key: tuple, group: _Group, batch: list[_Call]) -> None:
        group.inflight += 1
        name, k, nprobe, ef_search, min_coverage, include_payloads = key[:6]
        deadlines = [c.deadline for c in batch]
        timeout = None if None in deadlines else max(0.0, max(deadlines) - time.monotonic())
        xq = batch[0].xq if len(batch) == 1 else np.concatenate([c.xq for c in batch])
        BATCH_QUERIES.observe(len(xq))
        fut = batch[0].context.run(self._start, name, xq, k, nprobe, ef_search, min_coverage, include_payloads,
                                   timeout)
        fut.add_done_callback(lambda f: self._done(key, group, batch, f))

    def _start(self, *args) -> asyncio.Future:
        """One unbatched search, running: a task on this loop, or a blocking call on a thread of the executor."""
        if self._is_async:
            return asyncio.ensure_future(self._search(*args))
        return asyncio.get_running_loop().run_in_executor(self._executor, self._search, *args)

    def _done(self, key: tuple, group: _Group, batch: list[_Call], fut: asyncio.Future) -> None:
        group.inflight -= 1
        err = Unavailable("the search was cancelled: the router is stopping") if fut.cancelled() else fut.exception()
        if isinstance(err, ResourceExhausted) and len(batch) > 1:
            # The batch's answer passed the message limit (it grows with the ids' lengths, which the cap in _send
            # cannot know): its calls go again in halves, down to one each, which gets what it would have alone.
            half = len(batch) // 2
            self._run(key, group, batch[:half])
            self._run(key, group, batch[half:])
            return
        self.batches += 1
        self.queries += sum(len(c.xq) for c in batch)
        res = None if err is not None else fut.result()
        start = 0
        for c in batch:
            end = start + len(c.xq)
            if not c.future.done():  # its caller may have given up (deadline, cancelled call)
                if err is not None:
                    c.future.set_exception(err)
                else:
                    c.future.set_result(dataclasses.replace(
                        res, D=res.D[start:end], ids=res.ids[start:end],
                        payloads=None if res.payloads is None else res.payloads[start:end]))
            start = end
        if group.pending:
            self._schedule_now(key, group)  # what gathered while this batch ran goes now
        elif not group.inflight and group.timer is None:
            self._groups.pop(key, None)
