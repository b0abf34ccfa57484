"""The search path: k-NN over all buckets of a collection, fanned out to a cover of its shards and merged once.

The search is written once, as a coroutine (:meth:`Search._search`). What it waits for (a shard map from the
control plane, a round of shard calls, a pause before a retry, choosing the IVF lists or merging) it asks of an
``io`` object, which comes in two kinds:

- :class:`_OnLoop` for :meth:`Search.search_async`, the router's asyncio server: the shard calls are ``grpc.aio``
  calls gathered on the running loop (``ShardClient.acall``), so a search waits on no thread; what can block (a
  map from the controller, a big merge) goes to an executor.
- :class:`_Blocking` for :meth:`Search.search`, the synchronous wrapper (library users, catalog jobs, tests): the
  shard calls are blocking calls on the shard clients' long-lived threads (``ShardClient.call``), and the rest is
  done in the calling thread. Its methods are coroutines that never suspend, so the wrapper runs the search to its
  end in the calling thread with no event loop (:func:`_run_to_end`): no loop, and no asyncio channel per shard,
  per caller.

It may use the base package (lookalike), the shard protocol (protos) and the router's shard access, merge and
coarse quantizers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time

import numpy as np

from lookalike.config import RPC, check_answer_size, check_search_params
from lookalike.errors import InvalidArgument, LookalikeError, StaleShardMap, Unavailable
from lookalike.filters import check_filter
from lookalike.metrics import FANOUT_SHARDS, PARTIAL_ANSWERS
from lookalike.retry import Retry
from lookalike.topk import merge_topk
from lookalike.wire import vectors_to_proto
from protos import shard_pb2
from router.coarse import QUANTIZE_ON_LOOP, CoarseQuantizers
from router.shards import CALLER_ERRORS, Shards

log = logging.getLogger(__name__)

# Rounds of a search (and of a get): the first asks a cover of all buckets; later ones ask other owners of the
# buckets still missing (failover), or the same shards with a fresh map when a shard said the map was stale (a
# bucket move).
SEARCH_ROUNDS = 6

# Result slots (queries x k x answering shards) up to which search_async merges on the event loop rather than on a
# thread. Measured here: 0.04 ms at 40 slots (batch 1), 0.5 ms at 4,000 (batch 100), 2.3 ms at 20,000. The merge is
# mostly Python holding the GIL, so a thread saves the loop little for these sizes; it lets the loop interleave
# other callers during the bigger merges.
_MERGE_ON_LOOP = 20_000


@dataclasses.dataclass
class SearchResult:
    """Neighbours of a batch of queries.

    Attributes:
        D: shape (nq, k) float32 distances in the collection's metric (see ``larger_is_better``); rows with fewer
            than k results are padded with the worst float.
        ids: nq lists of up to k ids, best first.
        payloads: nq lists of serialized Payload (None where empty), when asked for.
        coverage: fraction of buckets that answered (1.0: complete).
        epoch: shard-map epoch used.
        plans: filtered searches: "<shard>: <plan>" for each shard answer (shard.filtered); empty otherwise.
    """

    D: np.ndarray
    ids: list[list[str]]
    payloads: list[list] | None
    coverage: float
    epoch: int
    plans: list[str] = dataclasses.field(default_factory=list)


class Search:
    """Searches a collection's shards (see the module docstring).

    Args:
        shards: the router's shard maps and clients.
        coarse: the coarse quantizers (router.coarse), to choose the IVF lists once for all shards.
    """

    def __init__(self, shards: Shards, coarse: CoarseQuantizers):
        self.shards = shards
        self._coarse = coarse
        self._turn = itertools.count()

    def search(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
               min_coverage: float = 1.0, include_payloads: bool = False, timeout: float | None = None, filt=None):
        """k-NN over all buckets: each shard answers for the buckets it holds; one merge.

        Args:
            xq: shape (nq, d) float32 (or (nq, d/8) uint8 codes), already validated.
            min_coverage: fraction of buckets that must answer, in (0, 1].
            filt: a ``Filter`` message (lookalike.filters), or None: only the items matching it are returned.

        Returns:
            SearchResult; its ``payloads`` hold protobuf Payload messages when asked for.

        Raises:
            Unavailable: fewer buckets answered than min_coverage.
        """
        return _run_to_end(self._search(_Blocking(self.shards), name, xq, k, nprobe, ef_search, min_coverage,
                                        include_payloads, timeout, filt))

    async def search_async(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
                           min_coverage: float = 1.0, include_payloads: bool = False, timeout: float | None = None,
                           executor=None, filt=None):
        """:meth:`search` as a coroutine, for the router's asyncio server: the shard calls are made on the running
        loop (``ShardClient.acall``), so a search waits on no thread. What can block runs on a thread: a big merge on
        ``executor`` (None: the loop's default), fetching a shard map from the control plane on the loop's default
        executor."""
        return await self._search(_OnLoop(self.shards, executor), name, xq, k, nprobe, ef_search, min_coverage,
                                  include_payloads, timeout, filt)

    async def _search(self, io, name: str, xq: np.ndarray, k: int, nprobe: int, ef_search: int,
                      min_coverage: float, include_payloads: bool, timeout: float | None,
                      filt=None) -> SearchResult:
        """The search, once for both wrappers; ``io`` does what it waits for (:class:`_OnLoop`, :class:`_Blocking`)."""
        check_search_params(nprobe, ef_search)
        check_answer_size(len(xq), k, include_payloads)  # refused before every shard runs the whole search
        # Rounds within the deadline; a round after a stale map waits 0.02, 0.04, ... at most 0.2 s first.
        retry = Retry(SEARCH_ROUNDS, timeout, delay=0.01, max_delay=0.2)
        smap = self.shards.cached(name)
        if smap is None:  # not cached: from the control plane
            try:
                smap = await io.shard_map(name, False, retry.left())
            except TimeoutError:
                raise Unavailable(f"the control plane did not give the shard map of {name!r} before the search's "
                                  "deadline") from None
        req = shard_pb2.ShardSearchRequest(collection=name, k=k, include_payloads=include_payloads)
        req.queries.CopyFrom(vectors_to_proto(xq))
        req.params.nprobe = nprobe
        req.params.ef_search = ef_search
        cfg = smap.collection
        if filt is not None:  # each shard plans its own filtered search (shard.filtered): no coarse lists
            check_filter(filt, cfg.schema, name)
            req.filter.CopyFrom(filt)
        quantizer = self._coarse.ready(cfg) if filt is None else None
        if quantizer is not None:  # the IVF lists each query probes, chosen here once for all shards
            req.coarse.CopyFrom(await io.compute(lambda: CoarseQuantizers.assign(quantizer, cfg, xq, nprobe),
                                                 len(xq) * quantizer.index.ntotal * cfg.dim > QUANTIZE_ON_LOOP))
        nq = len(xq)
        n_buckets = smap.collection.buckets
        covered = np.zeros(n_buckets, dtype=bool)
        answered: set[str] = set()
        responses, failures, plans = [], {}, []
        rotation = next(self._turn)
        control_away = False  # a fresh map was asked for and the control plane did not answer in time
        calls = 0
        for attempt in retry:
            left = retry.left()
            if left is not None and left <= 0:
                break
            # Every shard answers for all it holds, so a cover of the missing buckets is enough. A shard that
            # answered already may be asked again: under a fresh map it may own buckets it was still copying in.
            first = not answered
            targets = smap.cover(None if first else ~covered, set(failures), rotation)
            if not targets:
                break
            req.epoch = smap.epoch
            calls += len(targets)
            answered_now = []
            for sids, resp, failed in await io.call(smap, targets, req, left):  # one call per shard process
                if isinstance(resp, CALLER_ERRORS):
                    raise resp
                if isinstance(resp, LookalikeError):
                    failures.update(dict.fromkeys(sids, resp))
                    continue
                for err in failed.values():
                    if isinstance(err, CALLER_ERRORS):
                        raise err
                failures.update(failed)
                ok = [sid for sid in sids if sid not in failed]
                for sid in ok:
                    failures.pop(sid, None)
                    answered.add(sid)
                    answered_now.append(sid)
                if not ok:
                    continue
                responses.append(resp)
                if resp.plan:  # a process of several shards names each in its plan's lines
                    plans.extend([f"{ok[0]}: {resp.plan}"] if len(sids) == 1 else resp.plan.split("\n"))
            if first and not failures:  # the usual case: the whole cover answered, every owned bucket is covered
                covered = smap.owned
                break
            for sid in answered_now:
                covered |= smap.served_by(sid)
            if covered.all():
                break
            # Buckets are missing. A fresh map may move them (a move, or a shard that restarted at a new
            # address); a shard that said the map was stale is asked again under the fresh one.
            stale = any(isinstance(e, StaleShardMap) for e in failures.values())
            if stale and attempt:
                await io.pause(retry)
            left = retry.left()
            try:  # half of the time left at most: the other half asks the shards again
                fresh = await io.shard_map(name, True, None if left is None else left / 2)
            except TimeoutError:  # answer with what the cached map reached; keep it for the searches to come
                control_away = True
                break
            for sid in list(failures):
                info = fresh.shards.get(sid)
                if isinstance(failures[sid], StaleShardMap) or (
                        info is not None and info.address and info.address != smap.shards[sid].address):
                    failures.pop(sid)
            smap = fresh
        coverage = smap.owned_fraction if covered is smap.owned else float(covered.sum()) / n_buckets
        FANOUT_SHARDS.observe(calls)
        failed = "; ".join(f"{sid}: {err}" for sid, err in failures.items())
        if failures and not control_away:
            self.shards.invalidate(name)
            _search_warnings.warning(
                (name, tuple(sorted((sid, type(err).__name__) for sid, err in failures.items()))),
                "search on %s: %d shard(s) failed: %s", name, len(failures), failed)
        if coverage < min_coverage or not responses:
            raise Unavailable(
                f"only {int(covered.sum())} of {n_buckets} buckets of {name!r} answered (coverage {coverage:.3f} "
                f"< min_coverage {min_coverage:g}); failed: {failed or 'none'}")
        if coverage < 1:
            PARTIAL_ANSWERS.labels(collection=name).inc()
        larger_is_better = smap.collection.larger_is_better

        def finish():
            D, out_ids, out_pl = _merge_responses(responses, nq, k, larger_is_better, include_payloads)
            return SearchResult(D, out_ids, out_pl, coverage, smap.epoch, plans)
        return await io.compute(finish, nq * k * len(responses) > _MERGE_ON_LOOP)


class _OnLoop:
    """What :meth:`Search._search` waits for, on the running event loop; what can block goes to ``executor``."""

    def __init__(self, shards: Shards, executor):
        self.shards = shards
        self.executor = executor

    async def shard_map(self, name: str, refresh: bool, timeout: float | None):
        """A call to the control plane, on the loop's default executor: while the control plane hangs these calls
        wait there, and the search threads stay free for merges. Raises TimeoutError after ``timeout`` seconds
        (None: the default deadline, lookalike.config.RpcPolicy)."""
        fut = asyncio.get_running_loop().run_in_executor(None, self.shards.shard_map, name, refresh)
        return await asyncio.wait_for(fut, max(0.0, RPC.default_deadline_s if timeout is None else timeout))

    async def call(self, smap, shard_ids, request, timeout):
        """A Search to each shard process, concurrently (router.shards ``Shards.search``)."""
        return await self.shards.search_async(smap, shard_ids, request, timeout)

    async def pause(self, retry: Retry) -> None:
        await retry.pause_async()

    async def compute(self, fn, heavy: bool):
        if not heavy:  # cheaper here than a thread hop
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)


class _Blocking:
    """The same in the calling thread, blocking it: coroutines that never suspend (see :func:`_run_to_end`)."""

    def __init__(self, shards: Shards):
        self.shards = shards

    async def shard_map(self, name: str, refresh: bool, timeout: float | None):  # blocking: timeout not applied
        return self.shards.shard_map(name, refresh=refresh)

    async def call(self, smap, shard_ids, request, timeout):
        return self.shards.search(smap, shard_ids, request, timeout)

    async def pause(self, retry: Retry) -> None:
        retry.pause()

    async def compute(self, fn, heavy: bool):
        return fn()


def _run_to_end(coro):
    """Runs a coroutine that never suspends (it awaits only :class:`_Blocking`'s methods) in this thread; returns
    its value or raises what it raised."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the synchronous search awaited something that needs an event loop")


def _merge_responses(responses, nq: int, k: int, larger_is_better: bool, include_payloads: bool):
    """One top-k from the shards' answers: (D (nq, k), nq lists of ids, nq lists of payloads or None)."""
    Ds = [np.frombuffer(r.distances, dtype="<f4").reshape(nq, k) for r in responses]
    Ls = [np.frombuffer(r.labels, dtype="<i8").reshape(nq, k) for r in responses]
    payloads = []
    if include_payloads:
        for r in responses:
            payloads.extend(r.payloads)
    D, I = merge_topk(np.stack(Ds), np.stack(Ls), larger_is_better)
    counts = (I >= 0).sum(axis=1)
    kept = I[I >= 0]  # row by row, best first
    ids = _kept_ids(responses, kept, nq * k)
    out_ids, out_pl = [], [] if include_payloads else None
    at = 0
    for q, c in enumerate(counts.tolist()):
        out_ids.append(ids[at:at + c])
        if include_payloads:
            out_pl.append([payloads[i] for i in kept[at:at + c].tolist()])
        at += c
    return D, out_ids, out_pl


def _kept_ids(responses, kept: np.ndarray, slots: int) -> list[str]:
    """The ids at ``kept`` (indexes into the responses' slots, ``slots`` per response, one after the other): decoded
    from the shards' packed ids (only these, not the (S - 1) x nq x k others), or taken from the repeated ``ids``
    of a shard that sent them instead (an older version)."""
    if not all(len(r.id_lengths) == 2 * slots or (not r.id_lengths and len(r.ids) == slots) for r in responses):
        raise Unavailable(f"a shard answered a search with ids for other than its {slots} result slots")
    if any(not r.id_lengths for r in responses):  # an older shard among them: every id, then the kept ones
        every = [u for r in responses for u in (_kept_ids([r], np.arange(slots), slots) if r.id_lengths else r.ids)]
        return [every[i] for i in kept.tolist()]
    lengths = np.concatenate([np.frombuffer(r.id_lengths, dtype="<u2") for r in responses]).astype(np.int64)
    ends = np.cumsum(lengths)
    blob = b"".join(r.id_bytes for r in responses)
    if len(ends) and ends[-1] != len(blob):
        raise Unavailable("a shard answered a search with id lengths that do not add up to its id bytes")
    stops = ends[kept].tolist()
    starts = (ends[kept] - lengths[kept]).tolist()
    if blob.isascii():  # one decode, then slices of the string (one byte is one character)
        text = blob.decode("ascii")
        return [text[a:b] for a, b in zip(starts, stops)]
    return [blob[a:b].decode("utf-8") for a, b in zip(starts, stops)]


def answer_ids(resp: shard_pb2.ShardSearchResponse) -> list[str]:
    """Every slot's id of a shard's search answer ("" for none), packed or not."""
    slots = resp.nq * resp.k
    return _kept_ids([resp], np.arange(slots), slots)


def check_min_coverage(value: float | None) -> float:
    if value is None:
        return 1.0
    if not 0.0 < value <= 1.0:
        raise InvalidArgument(f"min_coverage must be in (0, 1], got {value}")
    return float(value)


class RateLimitedLog:
    """Logs at most one line per key every ``interval_s`` seconds; the next line that gets out says how many
    like it were left out since. For warnings that every request can repeat (a shard down fails each search)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 1024):
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: dict[object, list] = {}  # key -> [time of the last line logged, lines left out since]

    def warning(self, key, msg: str, *args) -> bool:
        """Logs ``msg % args`` unless a line of ``key`` went out less than interval_s ago. Returns whether it
        logged."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.interval_s:
                seen[1] += 1
                return False
            left_out = 0 if seen is None else seen[1]
            if seen is None and len(self._seen) >= self.max_keys:  # forget keys that went quiet
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
            self._seen[key] = [now, 0]
        if left_out:
            msg += " (and %d more like it since the last such line, not logged)"
            args = args + (left_out,)
        self.logger.warning(msg, *args)
        return True


_search_warnings = RateLimitedLog(log)
