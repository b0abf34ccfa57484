"""Writes: each goes to every holder of its buckets (owners, and shards joining or leaving them during a move).

Upsert and delete route items by their ids' buckets; the k-means job's labelling (assign_clusters) routes whole
buckets. A holder that does not take a write (a stale map, a restarting shard) is tried again, with a fresh map,
until the deadline: writes are idempotent. It may use the base package (lookalike), the shard protocol (protos)
and the router's shard access.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from lookalike.errors import Busy, DeadlineExceeded, LookalikeError, StaleShardMap, Unavailable
from lookalike.ids import buckets_of
from lookalike.retry import Retry
from lookalike.wire import vectors_to_proto
from protos import shard_pb2
from router.shards import CALLER_ERRORS, Shards

log = logging.getLogger(__name__)


class Writes:
    """Upsert, delete and cluster labels, to every holder (see the module docstring).

    Args:
        shards: the router's shard maps and clients.
        write_retry_s: how long a write waits for its holders when the caller set no deadline (see
            router.core.Router).
    """

    def __init__(self, shards: Shards, write_retry_s: float):
        self.shards = shards
        self.write_retry_s = write_retry_s

    def _retry(self, timeout: float | None) -> Retry:
        """Until the caller's deadline, or write_retry_s; pauses 0.05, 0.1, ... 1 s."""
        return Retry(timeout=timeout if timeout is not None else self.write_retry_s)

    def _write(self, name: str, ids: list[str], build: Callable[[np.ndarray, int], object], method: str,
               timeout: float | None) -> list:
        """Sends a write to every holder of each id's bucket, retrying stale maps, restarting shards and busy ones
        (a full write gate) until the deadline. A holder that stored it is not asked again while the map stays the
        same. Returns the responses of the replica-0 owners."""
        retry = self._retry(timeout)
        done: dict[str, object] = {}    # holder -> its response, under the map of epoch `epoch`
        epoch = None
        for attempt in retry:
            smap = self.shards.shard_map(name, refresh=attempt > 0)
            if smap.epoch != epoch:      # other holders, or other items each: all of them again
                done, epoch = {}, smap.epoch
            buckets = buckets_of(ids, smap.collection.buckets)
            holders = smap.write_mask[buckets]              # (n, shards): owners, joining and leaving
            targets = {smap.shard_ids[j]: j for j in np.flatnonzero(holders.any(axis=0)).tolist()}
            requests = {sid: build(np.flatnonzero(holders[:, j]), smap.epoch)
                        for sid, j in targets.items() if sid not in done}
            primary = {smap.owners[b][0] for b in np.unique(buckets).tolist()}
            remaining = retry.left()
            if remaining <= 0:
                raise DeadlineExceeded(f"write to collection {name!r} did not complete before the deadline")
            calls = self.shards.fan_out(smap, list(requests), method, requests, remaining)
            retry_err, busy = None, None
            for sid, fut in calls:
                try:
                    done[sid] = fut.result()
                except Busy as err:         # the others may have stored it: this one must too, or they differ
                    retry_err = busy = err
                except (StaleShardMap, Unavailable, DeadlineExceeded) as err:
                    retry_err = err
            if retry_err is None:
                return [done[sid] for sid in targets if sid in primary]
            # Some holder did not take it: the map may be stale (a move, a restarted shard's new address), or the
            # shard is busy. Writes are idempotent, so the holders that did not store it are sent it again.
            if retry.left() <= max(retry.delay, busy.retry_after_s if busy else 0):
                if busy is not None:
                    raise Busy(f"write to collection {name!r} was stored by {len(done)} of the {len(targets)} shards "
                               f"holding its items; the others stayed busy until its deadline ({busy}). Send it "
                               "again: writes are idempotent, and the shards that have it keep it once",
                               busy.retry_after_s)
                raise Unavailable(f"write to collection {name!r} could not reach every owner: {retry_err}")
            log.info("retrying write to %s after: %s", name, retry_err)
            retry.pause()

    def upsert(self, name: str, ids: list[str], x: np.ndarray, payloads=None, timeout: float | None = None) -> int:
        """Writes items to every owner; returns once all are durable.

        Args:
            x: shape (n, d) float32, or (n, d/8) uint8 codes, validated.
            payloads: None, or n ``Payload`` messages (validated for size).
        """
        pl = payloads if payloads is not None and len(payloads) else None

        def build(idx: np.ndarray, epoch: int):
            req = shard_pb2.ShardUpsertRequest(collection=name, ids=[ids[i] for i in idx], epoch=epoch)
            req.vectors.CopyFrom(vectors_to_proto(x[idx]))
            if pl is not None:
                req.payloads.extend(pl[i] for i in idx)
            return req

        self._write(name, ids, build, "Upsert", timeout)
        return len(ids)

    def delete(self, name: str, ids: list[str], timeout: float | None = None) -> tuple[int, int]:
        """Removes items from every owner; returns (removed, missing).

        The counts come from the shards that are replica 0 of some of the ids; with replication > 1 such a shard
        also counts the ids it holds as another replica, so the counts are exact only for replication 1.
        """

        def build(idx: np.ndarray, epoch: int):
            return shard_pb2.ShardDeleteRequest(collection=name, ids=[ids[i] for i in idx], epoch=epoch)

        responses = self._write(name, ids, build, "Delete", timeout)
        return sum(r.count for r in responses), sum(r.missing for r in responses)

    def assign_clusters(self, name: str, centroids: np.ndarray, field: str, buckets,
                        timeout: float | None = None) -> np.ndarray:
        """Every holder of each bucket in ``buckets`` labels that bucket's items with their nearest centroid
        (payload ``field``); a shard that fails is asked again, with a fresh map, until the deadline. Returns items
        per centroid (each bucket counted once, by its first owner)."""
        retry = self._retry(timeout)
        todo = {int(b) for b in buckets}
        sizes = np.zeros(len(centroids), dtype=np.int64)
        last_err = None
        cent = vectors_to_proto(np.ascontiguousarray(centroids, dtype=np.float32))
        done: set[tuple[str, int]] = set()   # (shard, bucket) labelled
        counted: set[int] = set()
        for _attempt in retry:
            if not todo:
                break
            smap = self.shards.shard_map(name, refresh=last_err is not None)
            holders = smap.write_mask                          # owners, joining and leaving
            requests, sent = {}, {}
            for j, sid in enumerate(smap.shard_ids):
                bs = sorted(b for b in todo if holders[b, j] and (sid, b) not in done)
                if bs:
                    req = shard_pb2.ShardAssignRequest(
                        collection=name, field=field, buckets=bs, epoch=smap.epoch,
                        count_buckets=[b for b in bs if b not in counted and smap.owners[b][:1] == (sid,)])
                    req.centroids.CopyFrom(cent)
                    requests[sid], sent[sid] = req, req
            left = retry.left()
            if left <= 0:
                raise Unavailable(f"labelling {name!r}: {len(todo)} bucket(s) not done before the deadline: {last_err}")
            for sid, fut in self.shards.fan_out(smap, list(requests), "AssignClusters", requests, left):
                try:
                    sizes += np.asarray(fut.result().sizes, dtype=np.int64)
                except CALLER_ERRORS:
                    raise
                except LookalikeError as err:
                    last_err = err
                    continue
                done.update((sid, b) for b in sent[sid].buckets)
                counted.update(sent[sid].count_buckets)
            # a bucket is done once every holder (under the latest map) labelled it
            todo = {b for b in todo if any((s, b) not in done for s in smap._holders(b))}
            if todo:
                retry.pause()
        return sizes
