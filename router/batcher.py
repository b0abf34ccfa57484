"""Batches concurrent searches: many callers with one query each become one fan-out with many queries.

A search costs a fixed amount per request (a gRPC call to every shard in the cover, a FAISS call on each) and a
small amount per query. When many callers search at once, the batcher gathers the queries that arrive while
earlier batches are still running and sends them as one request, so the shards make one FAISS call for all of
them and the fixed cost is paid once.

Rules, per compatible group (same collection, k, search parameters, min_coverage and payload flag):

- a search that finds nothing running goes at once: a lone caller never waits;
- otherwise it joins the group's pending batch; the first search of a batch (its leader) waits up to
  ``max_wait_s`` for more queries, sends when the batch holds ``max_batch`` queries, and in any case waits until
  fewer than ``max_inflight`` batches of the group are running;
- each caller gets its own rows of the merged answer, so a batched search returns what the same search alone
  returns (the coverage and epoch of the batch it went with).

The batch's timeout is the latest of its callers' deadlines (none when one has none); each caller waits no
longer than its own.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from lookalike.errors import DeadlineExceeded

# Defaults: gather for at most 300 us, at most 256 queries a batch, two batches of a group running at once.
MAX_WAIT_S = 300e-6
MAX_BATCH = 256
MAX_INFLIGHT = 2


@dataclasses.dataclass
class _Call:
    xq: np.ndarray
    deadline: float | None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class _Group:
    def __init__(self):
        self.pending: list[_Call] = []
        self.queued = 0  # queries in pending
        self.leader = False  # a caller is gathering the pending batch
        self.inflight = 0


class SearchBatcher:
    """Wraps ``search(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout)``.

    Args:
        search: the unbatched search (``Router.search_now``); returns a ``SearchResult``.
        max_wait_s: how long a batch's leader gathers while other batches are running.
        max_batch: queries in a batch that send it at once.
        max_inflight: batches of one group running at once.
    """

    def __init__(self, search, max_wait_s: float = MAX_WAIT_S, max_batch: int = MAX_BATCH,
                 max_inflight: int = MAX_INFLIGHT):
        self._search = search
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self.max_inflight = max(1, max_inflight)
        self._cond = threading.Condition()
        self._groups: dict[tuple, _Group] = {}
        self.batches = 0  # batches sent (for tests and stats)
        self.queries = 0

    def search(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
               min_coverage: float = 1.0, include_payloads: bool = False, timeout: float | None = None):
        if len(xq) >= self.max_batch:  # already a big batch: nothing to gain by waiting
            return self._search(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout)
        key = (name, k, nprobe, ef_search, min_coverage, include_payloads, xq.dtype.str, xq.shape[1])
        call = _Call(xq, None if timeout is None else time.monotonic() + timeout)
        with self._cond:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group()
            group.pending.append(call)
            group.queued += len(xq)
            if group.leader:  # someone gathers this batch; it sends ours too
                self._cond.notify_all()
                lead = False
            else:
                group.leader = lead = True
                batch = self._gather(group)
        if not lead:
            if not call.done.wait(None if call.deadline is None else max(0.0, call.deadline - time.monotonic())):
                raise DeadlineExceeded("the search's deadline passed while it waited in a batch")
            if call.error is not None:
                raise call.error
            return call.result
        self._run(key, group, batch, (nprobe, ef_search, min_coverage, include_payloads))
        if call.error is not None:
            raise call.error
        return call.result

    def _gather(self, group: _Group) -> list[_Call]:
        """Called by the leader under the lock: waits for companions and a free slot, then takes the batch."""
        until = time.monotonic() + self.max_wait_s
        while True:
            now = time.monotonic()
            busy = group.inflight >= self.max_inflight
            gathering = group.inflight > 0 and now < until and group.queued < self.max_batch
            if not busy and not gathering:
                break
            self._cond.wait(None if busy else until - now)
        batch, group.pending, group.queued, group.leader = group.pending, [], 0, False
        group.inflight += 1
        return batch

    def _run(self, key: tuple, group: _Group, batch: list[_Call], params: tuple) -> None:
        name, k = key[0], key[1]
        nprobe, ef_search, min_coverage, include_payloads = params
        deadlines = [c.deadline for c in batch]
        timeout = None if None in deadlines else max(0.0, max(deadlines) - time.monotonic())
        try:
            xq = batch[0].xq if len(batch) == 1 else np.concatenate([c.xq for c in batch])
            res = self._search(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout)
            start = 0
            for c in batch:
                end = start + len(c.xq)
                c.result = dataclasses.replace(
                    res, D=res.D[start:end], ids=res.ids[start:end],
                    payloads=None if res.payloads is None else res.payloads[start:end])
                start = end
        except BaseException as err:  # every caller of the batch gets the batch's error
            for c in batch:
                c.error = err
        finally:
            with self._cond:
                group.inflight -= 1
                self.batches += 1
                self.queries += sum(len(c.xq) for c in batch)
                if not group.inflight and not group.pending and not group.leader:
                    self._groups.pop(key, None)
                self._cond.notify_all()
            for c in batch:
                c.done.set()
