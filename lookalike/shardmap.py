"""The shard map: which shards own each bucket of a collection, at which epoch, and where the shards listen.

Per bucket there are three kinds of holder (see control.controller for the move protocol):

- **owners**: hold the bucket, current, and are searched for it (R of them with replication R);
- **joining**: a move's target, copying the bucket in; it receives the bucket's writes but is not counted as
  answering for it yet;
- **leaving**: a move's source after the target took over; it still receives writes until it drops the bucket.

Writes go to all three; a search needs, for every bucket, one answer from an owner. Every shard answers for
everything it holds, so a search asks a *cover*: a few shards whose owned buckets together are all buckets.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    shard_id: str
    address: str = ""      # host:port of its gRPC server; "" while (re)starting
    node: str = ""         # Ray node id or host
    serving: bool = False
    problem: str = ""      # why it does not start, when known ("cannot be placed: it needs 1 CPU and ...")


@dataclasses.dataclass(frozen=True)
class ShardMap:
    """One collection's placement at one epoch.

    Attributes:
        epoch: increases with every change of placement, collections or shard addresses.
        collection: the collection's config.
        owners: per bucket, the shard ids that serve it; length ``collection.buckets``.
        shards: shard id -> ShardInfo, for every shard of the cluster.
        joining: per bucket, shards copying it in (empty tuple: none); () when no move runs.
        leaving: per bucket, shards about to drop it; () when no move runs.
    """

    epoch: int
    collection: CollectionConfig
    owners: tuple[tuple[str, ...], ...]
    shards: dict[str, ShardInfo]
    joining: tuple[tuple[str, ...], ...] = ()
    leaving: tuple[tuple[str, ...], ...] = ()

    def _holders(self, b: int) -> tuple[str, ...]:
        extra = (self.joining[b] if self.joining else ()) + (self.leaving[b] if self.leaving else ())
        return self.owners[b] + extra

    @functools.cached_property
    def shard_ids(self) -> list[str]:
        """Every shard holding some bucket (owner, joining or leaving), in first-seen order."""
        return list(dict.fromkeys(s for b in range(len(self.owners)) for s in self._holders(b)))

    @functools.cached_property
    def _pos(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.shard_ids)}

    def _mask(self, holders) -> np.ndarray:
        m = np.zeros((len(self.owners), len(self.shard_ids)), dtype=bool)
        for b, hs in enumerate(holders):
            m[b, [self._pos[s] for s in hs]] = True
        return m

    @functools.cached_property
    def serving_mask(self) -> np.ndarray:
        """shape (buckets, len(shard_ids)) bool: shard j is an owner of bucket b."""
        return self._mask(self.owners)

    @functools.cached_property
    def owned(self) -> np.ndarray:
        """shape (buckets,) bool: the bucket has an owner (read only: shared by every search with this map)."""
        owned = self.serving_mask.any(axis=1)
        owned.flags.writeable = False
        return owned

    @functools.cached_property
    def owned_fraction(self) -> float:
        return float(self.owned.sum()) / len(self.owners)

    @functools.cached_property
    def write_mask(self) -> np.ndarray:
        """shape (buckets, len(shard_ids)) bool: shard j receives bucket b's writes."""
        return self._mask(self._holders(b) for b in range(len(self.owners)))

    @functools.cached_property
    def _covers(self) -> dict[int, list[str]]:
        return {}

    def cover(self, need: np.ndarray | None = None, exclude=(), rotation: int = 0) -> list[str]:
        """A few owners that together serve every bucket in ``need`` (all when None), never one of ``exclude``:
        greedy set cover, ties broken in shard order rotated by ``rotation`` (so that successive searches spread
        over the replicas). Buckets no allowed shard owns are left out."""
        n = len(self.shard_ids)
        if not n:
            return []
        rotation %= n
        cacheable = need is None and not exclude
        if cacheable and rotation in self._covers:
            return self._covers[rotation]
        mask = self.serving_mask
        if exclude:
            mask = mask.copy()
            mask[:, [self._pos[s] for s in exclude if s in self._pos]] = False
        uncovered = mask.any(axis=1) if need is None else need & mask.any(axis=1)
        order = np.roll(np.arange(n), -rotation)
        chosen = []
        while uncovered.any():
            counts = mask[uncovered].sum(axis=0)
            j = int(order[np.argmax(counts[order])])
            chosen.append(self.shard_ids[j])
            uncovered &= ~mask[:, j]
        if cacheable:
            self._covers[rotation] = chosen
        return chosen

    def served_by(self, shard_id: str) -> np.ndarray:
        """shape (buckets,) bool: the buckets ``shard_id`` owns."""
        j = self._pos.get(shard_id)
        return self.serving_mask[:, j] if j is not None else np.zeros(len(self.owners), dtype=bool)


def order_by_node(shard_ids: list[str], node_of: dict[str, str]) -> list[str]:
    """Shards interleaved across nodes (a shard of node 1, of node 2, ..., then the next of node 1), so that
    consecutive shards, the replicas of a bucket in :func:`assign_buckets`, sit on different nodes."""
    by_node: dict[str, list[str]] = {}
    for s in shard_ids:
        by_node.setdefault(node_of.get(s, ""), []).append(s)
    queues = list(by_node.values())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def assign_buckets(n_buckets: int, shard_ids: list[str], replication: int) -> tuple[tuple[str, ...], ...]:
    """Initial placement: bucket b on shards b, b+1, ... (mod n), so each shard gets an even share."""
    if replication > len(shard_ids):
        raise InvalidArgument(
            f"replication {replication} needs at least {replication} shards; the cluster has {len(shard_ids)}")
    n = len(shard_ids)
    return tuple(tuple(shard_ids[(b + r) % n] for r in range(replication)) for b in range(n_buckets))
