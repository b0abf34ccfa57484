"""The shard map: which shards own each bucket of a collection, at which epoch, and where the shards listen."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lookalike.config import CollectionConfig


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    shard_id: str
    address: str = ""      # host:port of its gRPC server; "" while (re)starting
    node: str = ""         # Ray node id or host
    serving: bool = False


@dataclasses.dataclass(frozen=True)
class ShardMap:
    """One collection's placement at one epoch.

    Attributes:
        epoch: increases with every change of placement, collections or shard addresses.
        collection: the collection's config.
        owners: per bucket, the shard ids holding it (replica 0 first); length ``collection.buckets``.
        shards: shard id -> ShardInfo, for every shard named in ``owners``.
    """

    epoch: int
    collection: CollectionConfig
    owners: tuple[tuple[str, ...], ...]
    shards: dict[str, ShardInfo]

    @functools.cached_property
    def shard_ids(self) -> list[str]:
        """Every shard named in owners, in first-seen order."""
        return list(dict.fromkeys(s for own in self.owners for s in own))

    @functools.cached_property
    def owner_matrix(self) -> np.ndarray:
        """shape (buckets, replicas) int: index into ``shard_ids`` of each owner."""
        pos = {s: i for i, s in enumerate(self.shard_ids)}
        return np.array([[pos[s] for s in own] for own in self.owners], dtype=np.int64).reshape(len(self.owners), -1)

    @functools.cached_property
    def primary_buckets(self) -> dict[str, int]:
        """shard id -> number of buckets for which it is the first owner (the one searched)."""
        out: dict[str, int] = {}
        for own in self.owners:
            out[own[0]] = out.get(own[0], 0) + 1
        return out


def assign_buckets(n_buckets: int, shard_ids: list[str], replication: int) -> tuple[tuple[str, ...], ...]:
    """Initial placement: bucket b on shards b, b+1, ... (mod n), so each shard gets an even share."""
    if replication > len(shard_ids):
        from lookalike.errors import InvalidArgument
        raise InvalidArgument(
            f"replication {replication} needs at least {replication} shards; the cluster has {len(shard_ids)}")
    n = len(shard_ids)
    return tuple(tuple(shard_ids[(b + r) % n] for r in range(replication)) for b in range(n_buckets))
