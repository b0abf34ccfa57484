"""What the cluster holds: every shard's Stats, and items per collection and per bucket worked out from them (the
census behind ListCollections, DescribeCollection and ClusterStatus, and the bucket counts the catalog jobs page
by). It may use the base package (lookalike), the shard protocol (protos) and the router's shard access.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.retry import Retry
from lookalike.shardmap import ShardInfo, ShardMap
from protos import shard_pb2
from router.shards import Shards, outcome


@dataclasses.dataclass
class Census:
    """One look at the whole cluster: what the controller says (shards, every collection's map) and what the
    shards say (their Stats), with each collection's item count worked out from both.

    Attributes:
        shards: (info, ShardStatsResponse or None when it did not answer) for every shard the controller knows.
        maps: collection name -> its shard map; all at one epoch.
        counts: collection name -> items stored, each bucket counted once (see :meth:`Status.count`).
    """

    shards: list[tuple[ShardInfo, object | None]]
    maps: dict[str, ShardMap]
    counts: dict[str, int]


class Status:
    """Shards' Stats and item counts (see the module docstring).

    Args:
        shards: the router's shard maps and clients (and, through them, the control plane).
    """

    def __init__(self, shards: Shards):
        self.shards = shards

    def count(self, name: str, timeout: float | None = 5.0) -> int:
        """Items stored in a collection: per bucket, what its owners report (each bucket counted once), under the
        control plane's current map (a cached one may predate a move: its owners have dropped the bucket). Shards
        that do not answer count nothing, after one more try (one may have moved)."""
        return int(self.bucket_counts(name, timeout).sum())

    def bucket_counts(self, name: str, timeout: float | None = 5.0) -> np.ndarray:
        """Items per bucket of a collection, shape (buckets,) int64 (see :meth:`count`)."""
        for _attempt in Retry(attempts=2):
            smap = self.shards.shard_map(name, refresh=True)
            stats = {}
            for sid, fut in self.shards.fan_out(smap, smap.shard_ids, "Stats", shard_pb2.ShardStatsRequest(),
                                                timeout):
                try:
                    stats[sid] = fut.result()
                except LookalikeError:
                    continue
            if len(stats) == len(smap.shard_ids):
                break
        return _per_bucket(smap, stats)

    def census(self, timeout: float | None = 5.0) -> Census:
        """Every shard's Stats and every collection's item count, from one fan-out: one Stats call per shard, all
        at once, whatever the number of collections (``timeout`` seconds each), and two calls to the controller
        (shards, maps). Counted as :meth:`count` counts: when a shard holding buckets did not answer, once more
        with fresh maps (it may have restarted at a new address)."""
        control = self.shards.control
        for _attempt in Retry(attempts=2):
            infos = control.shards()
            maps = control.shard_maps()
            shards = self.shard_stats(timeout, infos)
            answered = {info.shard_id: st for info, st in shards if st is not None}
            if all(sid in answered for smap in maps.values() for sid in smap.shard_ids):
                break
        counts = {name: int(_per_bucket(smap, answered).sum()) for name, smap in maps.items()}
        return Census(shards, maps, counts)

    def shard_stats(self, timeout: float | None = 2.0,
                    infos: list[ShardInfo] | None = None) -> list[tuple[ShardInfo, object | None]]:
        """(info, ShardStatsResponse or None if unreachable) for every shard the controller knows (or of
        ``infos``), asked all at once."""
        if infos is None:
            infos = self.shards.control.shards()
        calls = []
        for info in infos:
            try:
                fut = (self.shards.client_at(info.address).call("Stats", shard_pb2.ShardStatsRequest(), timeout,
                                                                 info.shard_id)
                       if info.address else None)
            except LookalikeError:
                fut = None
            calls.append((info, fut))
        out = []
        for info, fut in calls:
            resp = outcome(fut) if fut is not None else None
            out.append((info, None if isinstance(resp, LookalikeError) else resp))
        return out


def _per_bucket(smap: ShardMap, stats: dict) -> np.ndarray:
    """Items per bucket of ``smap``'s collection, shape (buckets,) int64, from the shards' Stats (shard id ->
    ShardStatsResponse): per bucket the largest count any of its owners reports (joining and leaving holders are
    not counted, so a bucket being moved counts once); 0 for buckets no owner reported."""
    name = smap.collection.name
    per_bucket = np.zeros(smap.collection.buckets, dtype=np.int64)
    for sid, resp in stats.items():
        for c in resp.collections:
            if c.name == name and len(c.bucket_counts) == 4 * len(per_bucket):
                counts = np.frombuffer(c.bucket_counts, dtype="<u4").astype(np.int64)
                per_bucket = np.maximum(per_bucket, np.where(smap.served_by(sid), counts, 0))
    return per_bucket
