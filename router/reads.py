"""Reads of stored items, each from one owner of its bucket, failing over to another owner (or to a fresh map, when
the map was stale): get by id, and scan and sample by bucket (the catalog jobs read collections with these).

It may use the base package (lookalike), the shard protocol (protos) and the router's shard access.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lookalike.errors import DeadlineExceeded, InvalidArgument, LookalikeError, StaleShardMap, Unavailable
from lookalike.filters import check_filter
from lookalike.ids import buckets_of
from lookalike.retry import Retry
from lookalike.wire import vectors_from_proto_raw
from protos import shard_pb2
from router.search import SEARCH_ROUNDS
from router.shards import CALLER_ERRORS, Shards


class Reads:
    """get, scan and sample (see the module docstring).

    Args:
        shards: the router's shard maps and clients.
        bucket_counts: ``bucket_counts(name, timeout)``, items per bucket (router.status.Status.bucket_counts).
        retry_s: how long a scan tries when the caller set no deadline (the router's write_retry_s).
    """

    def __init__(self, shards: Shards, bucket_counts: Callable[[str, float | None], np.ndarray], retry_s: float):
        self.shards = shards
        self._bucket_counts = bucket_counts
        self.retry_s = retry_s

    def get(self, name: str, ids: list[str], include_vectors: bool = False, timeout: float | None = None):
        """(found ids in request order, vectors (n, d) or None, serialized payloads). Each id is asked of one
        owner of its bucket, another owner if that one fails, and again with a fresh map if the map was stale."""
        retry = Retry(SEARCH_ROUNDS, timeout, delay=0.02, factor=1.0)  # after a stale map: a 20 ms pause
        smap = self.shards.shard_map(name)
        found: dict[str, tuple] = {}
        pending = list(range(len(ids)))
        tried: set[str] = set()
        last_err: LookalikeError | None = None
        for _ in retry:
            buckets = buckets_of([ids[i] for i in pending], smap.collection.buckets)
            by_shard: dict[str, list[int]] = {}
            for i, b in zip(pending, buckets.tolist()):
                sid = next((s for s in smap.owners[b] if s not in tried), None)
                if sid is None:  # every owner of its bucket failed
                    raise Unavailable(f"get on {name!r}: no owner of bucket {b} answered: {last_err}")
                by_shard.setdefault(sid, []).append(i)
            requests = {sid: shard_pb2.ShardGetRequest(collection=name, ids=[ids[i] for i in idx],
                                                       include_vectors=include_vectors, epoch=smap.epoch)
                        for sid, idx in by_shard.items()}
            pending, stale, failed = [], False, []
            for sid, fut in self.shards.fan_out(smap, list(requests), "Get", requests, retry.left()):
                try:
                    resp = fut.result()
                except CALLER_ERRORS:
                    raise
                except LookalikeError as err:
                    last_err = err
                    pending.extend(by_shard[sid])
                    if isinstance(err, StaleShardMap):
                        stale = True
                    else:
                        failed.append(sid)
                    continue
                vecs = vectors_from_proto_raw(resp.vectors) if include_vectors and resp.ids else None
                for i, uid in enumerate(resp.ids):
                    found[uid] = (vecs[i] if vecs is not None else None, resp.payloads[i])
            if not pending:
                break
            if stale or failed:
                if stale:
                    retry.pause()
                fresh = self.shards.shard_map(name, refresh=True)
                for sid in failed:  # a shard that restarted at a new address is asked again there
                    info = fresh.shards.get(sid)
                    if info is None or not info.address or info.address == smap.shards[sid].address:
                        tried.add(sid)
                smap = fresh
        if pending:
            if isinstance(last_err, StaleShardMap):  # the map kept changing under us: a moment of unavailability
                raise Unavailable(f"get on {name!r}: the shard map kept changing ({last_err}); retry")
            raise last_err
        out_ids = [u for u in dict.fromkeys(ids) if u in found]
        vectors = np.stack([found[u][0] for u in out_ids]) if include_vectors and out_ids else None
        return out_ids, vectors, [found[u][1] for u in out_ids]

    def _per_owner(self, name: str, buckets, method: str, build: Callable[[str, list[int], int], object],
                   timeout: float | None) -> list[tuple[str, list[int], object]]:
        """Sends ``build(shard_id, buckets, epoch)`` to one owner of each bucket, trying another owner or a fresh
        map when one fails. Returns (shard_id, its buckets, response) per call that worked."""
        retry = Retry(timeout=timeout if timeout is not None else self.retry_s)
        pending = sorted({int(b) for b in buckets})
        smap = self.shards.shard_map(name)
        n = smap.collection.buckets
        if any(b < 0 or b >= n for b in pending):
            raise InvalidArgument(f"bucket numbers of {name!r} run from 0 to {n - 1}")
        out, tried, last_err = [], set(), None
        for _attempt in retry:
            if not pending:
                break
            by_shard: dict[str, list[int]] = {}
            for b in pending:
                sid = next((s for s in smap.owners[b] if s not in tried), None)
                if sid is None:
                    raise Unavailable(f"{method} on {name!r}: no owner of bucket {b} answered: {last_err}")
                by_shard.setdefault(sid, []).append(b)
            requests = {sid: build(sid, bs, smap.epoch) for sid, bs in by_shard.items()}
            left = retry.left()
            if left <= 0:
                raise DeadlineExceeded(f"{method} on {name!r} did not complete before the deadline")
            failed: set[int] = set()
            for sid, fut in self.shards.fan_out(smap, list(requests), method, requests, left):
                try:
                    out.append((sid, by_shard[sid], fut.result()))
                except CALLER_ERRORS:
                    raise
                except LookalikeError as err:
                    last_err = err
                    failed.update(by_shard[sid])
                    if not isinstance(err, StaleShardMap):
                        tried.add(sid)
            pending = sorted(failed)
            if pending:
                retry.pause()
                smap = self.shards.shard_map(name, refresh=True)
        return out

    def scan(self, name: str, buckets, include_vectors: bool = False, include_payloads: bool = False,
             timeout: float | None = None, filt=None):
        """The items of some buckets, each read from one owner: (ids, vectors (n, d) or None, payloads or None);
        only those matching ``filt`` (a Filter message) if given."""
        coll = self.shards.shard_map(name).collection
        if filt is not None:
            check_filter(filt, coll.schema, name)

        def build(sid, bs, epoch):
            return shard_pb2.ShardScanRequest(collection=name, buckets=bs, include_vectors=include_vectors,
                                              include_payloads=include_payloads, epoch=epoch, filter=filt)

        ids, vectors, payloads = [], [], []
        for _sid, _bs, resp in self._per_owner(name, buckets, "Scan", build, timeout):
            ids.extend(resp.ids)
            if include_vectors and resp.ids:
                vectors.append(vectors_from_proto_raw(resp.vectors))
            if include_payloads:
                payloads.extend(resp.payloads)
        if include_vectors:
            dtype, cols = (np.uint8, coll.dim // 8) if coll.metric == "hamming" else (np.float32, coll.dim)
            vecs = np.concatenate(vectors) if vectors else np.empty((0, cols), dtype=dtype)
        return ids, (vecs if include_vectors else None), (payloads if include_payloads else None)

    def export(self, name: str, buckets, page: int, timeout: float | None = None):
        """Yields the items of ``buckets``, bucket after bucket in that order, each bucket page by page in id order
        (at most ``page`` items a page, from one owner; another owner or a fresh map when one fails): (ids,
        vectors (n, d), payloads) per page. ``timeout`` bounds each page's call (its retries included)."""
        coll = self.shards.shard_map(name).collection
        cols, dtype = (coll.dim // 8, np.uint8) if coll.metric == "hamming" else (coll.dim, np.float32)
        for bucket in buckets:
            after = ""
            while True:
                def build(sid, bs, epoch, after=after):
                    return shard_pb2.ShardScanRequest(collection=name, buckets=bs, include_vectors=True,
                                                      include_payloads=True, epoch=epoch, after_id=after, limit=page)

                ((_sid, _bs, resp),) = self._per_owner(name, [bucket], "Scan", build, timeout)
                ids = list(resp.ids)
                vectors = vectors_from_proto_raw(resp.vectors) if ids else np.empty((0, cols), dtype=dtype)
                if ids:
                    yield ids, vectors, list(resp.payloads)
                if not resp.more:
                    break
                after = ids[-1]

    def sample(self, name: str, size: int, seed: int = 0, include_vectors: bool = False,
               timeout: float | None = None, filt=None):
        """About ``size`` items from whole buckets drawn in a seeded random order (an id's bucket is a hash of it,
        so this is a uniform sample of items); as :meth:`scan`, cut to ``size``. With ``filt``, the matching items
        of the buckets drawn, drawing more buckets until ``size`` match (or all were drawn)."""
        counts = self._bucket_counts(name, timeout)
        order = np.random.default_rng(seed).permutation(len(counts))
        upto = int(np.searchsorted(np.cumsum(counts[order]), size)) + 1
        ids, x, payloads = self.scan(name, order[:upto].tolist(), include_vectors, True, timeout, filt)
        while filt is not None and len(ids) < size and upto < len(order):  # few match: draw more buckets
            more = order[upto:upto * 2 + 1].tolist()
            upto += len(more)
            ids2, x2, payloads2 = self.scan(name, more, include_vectors, True, timeout, filt)
            ids, payloads = ids + ids2, payloads + payloads2
            x = np.concatenate([x, x2]) if x is not None else None
        keep = min(size, len(ids))
        return ids[:keep], (x[:keep] if x is not None else None), payloads[:keep]
