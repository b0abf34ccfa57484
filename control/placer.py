"""What the controller needs of whatever starts shards: the :class:`ShardPlacer` interface.

Implementations: ``control.ray_placer.RayPlacer`` (a Ray actor per shard) and ``control.local.LocalPlacer`` (shards
in this process, for tests).
"""

from __future__ import annotations

from typing import Protocol

from lookalike.config import CollectionConfig


class ShardPlacer(Protocol):
    """Starts shards and forwards placement to them (Ray actors in production)."""

    def ensure_shard(self, shard_id: str) -> None: ...

    def open_collection(self, shard_id: str, cfg: CollectionConfig, buckets: list[int]) -> None: ...

    def drop_collection(self, shard_id: str, name: str) -> None: ...

    # bucket moves: these raise on failure (the controller rolls the move back)
    def join_buckets(self, shard_id: str, cfg: CollectionConfig, buckets: list[int], epoch: int) -> None: ...

    def fence(self, shard_id: str, name: str, epoch: int) -> None: ...

    def copy_in(self, shard_id: str, name: str, buckets: list[int], source: str, rate_bytes_s: float = 0) -> int: ...

    def finish_join(self, shard_id: str, name: str, buckets: list[int]) -> None: ...

    def drop_buckets(self, shard_id: str, name: str, buckets: list[int], epoch: int) -> int: ...

    def bucket_counts(self, shard_id: str, name: str) -> list[int]: ...

    def stats(self, shard_id: str) -> dict: ...

    # optional (the controller asks only placers that have it):
    # def placement_problem(self, shard_id: str) -> str
    #     why a shard that does not serve cannot start, e.g. "cannot be placed: it needs 1 CPU and 0.0 of 2.0 CPUs
    #     are free"; "" when it is starting or the placer does not know.
    #
    # and for trainings (the controller runs them only with placers that have these):
    # def train_collection(self, shard_id: str, cfg: CollectionConfig, version: int, sources: list, sample: int)
    #     -> dict: trains the next version on that shard (see control.training)
    # def use_trained(self, shard_id: str, cfg: CollectionConfig) -> bool: moves the shard into cfg's version


def process_of(shard_id: str, per_process: int, initial_shards: int) -> int:
    """The number of the process that holds a shard when processes hold ``per_process`` shards each (shard.host).

    The cluster's first shards are dealt out over the first ceil(initial_shards / per_process) processes in turn
    (shard-0 to process 0, shard-1 to process 1, ...), so that consecutive shards, which hold the replicas of a
    bucket (lookalike.shardmap.assign_buckets), sit in different processes while there are enough of them. Shards
    added later fill new processes, ``per_process`` consecutive shards each: growth adds processes, and with them
    the memory Ray reserves for them. 1 shard per process: the shard's own number.
    """
    number = int(shard_id.rpartition("-")[2])
    if per_process <= 1:
        return number
    first = max(1, -(-initial_shards // per_process))
    if number < first * per_process:
        return number % first
    return first + (number - first * per_process) // per_process
