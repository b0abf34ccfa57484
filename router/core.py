"""The router's logic, independent of gRPC serving and of Ray: the :class:`Router` facade over its parts.

Each part has one job and its own module: router.shards (the cached shard maps, one client per shard, fan-out),
router.search (k-NN over a cover of the shards, merge, coverage), router.writes (upsert, delete and cluster labels
to every holder), router.reads (get, scan and sample from one owner per bucket), router.status (Stats and item
counts). The Router builds them and adds the collections' administration (through the control plane) and encoding.

It depends on two interfaces: a control plane (collections and the shard map; the Ray controller in production,
an in-process Controller in tests) and a shard-client factory (gRPC or in-process). It may use the base package
(lookalike), the encoders (through router.encoding) and the router's other modules.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from lookalike.config import CollectionConfig
from lookalike.errors import FailedPrecondition
from lookalike.shardmap import ShardInfo, ShardMap
from router.coarse import CoarseQuantizers
from router.encoding import LocalEncoderPool
from router.reads import Reads
from router.search import Search, SearchResult
from router.shard_client import GrpcShardClient, ShardClient
from router.shards import Shards
from router.status import Census, Status
from router.writes import Writes


class ControlPlane(Protocol):
    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig: ...

    def drop_collection(self, name: str) -> None: ...

    def list_collections(self) -> list[CollectionConfig]: ...

    def shard_map(self, name: str) -> ShardMap: ...

    # Every collection's map at one epoch, in one call (status and listings).
    def shard_maps(self) -> dict[str, ShardMap]: ...

    def epoch(self) -> int: ...

    def shards(self) -> list[ShardInfo]: ...

    def rebalance(self, name: str | None, add_shards: int) -> int: ...

    def moves(self) -> list: ...

    def move_counts(self) -> tuple[int, int]: ...

    # Moves queued, done, failed and their durations (control.controller.Controller.move_metrics).
    def move_metrics(self) -> dict: ...

    # Where the collection's training stands (control.controller.Controller.training_status).
    def training_status(self, name: str) -> dict: ...

    # training_status of every collection, in one call.
    def training_statuses(self) -> dict[str, dict]: ...

    # Asks for a new trained version of the collection's index; returns its number.
    def train(self, name: str) -> int: ...


class Router:
    """Routes writes to every holder of a bucket and fans searches out to one owner of every bucket.

    Args:
        control: the control plane.
        connect: address -> ShardClient (default: gRPC).
        refresh_interval: seconds between checks of the control plane's epoch.
        write_retry_s: how long a write waits for its owners when the caller set no deadline: a restarting shard,
            or a collection reloading on one.
        encoders: where images are encoded (router.encoding.EncoderPool; default: in this process).
    """

    def __init__(self, control: ControlPlane, connect: Callable[[str], ShardClient] = GrpcShardClient,
                 refresh_interval: float = 0.5, write_retry_s: float = 300.0, encoders=None):
        self.control = control
        self.encoders = encoders if encoders is not None else LocalEncoderPool()
        self.shards = Shards(control, connect, refresh_interval)
        self._coarse = CoarseQuantizers(self.shards.fetch_quantizer)
        self._search = Search(self.shards, self._coarse)
        self._writes = Writes(self.shards, write_retry_s)
        self._status = Status(self.shards)
        self._reads = Reads(self.shards, self._status.bucket_counts, write_retry_s)

    # --- shard maps -----------------------------------------------------------------------------------------
    def shard_map(self, name: str, refresh: bool = False) -> ShardMap:
        """The cached shard map of a collection. Raises NotFound for an unknown collection."""
        return self.shards.shard_map(name, refresh)

    def invalidate(self, name: str | None = None) -> None:
        """Forgets the cached map of a collection (None: of all)."""
        self.shards.invalidate(name)

    # --- collections ----------------------------------------------------------------------------------------
    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig:
        out = self.control.create_collection(cfg)
        self.invalidate(cfg.name)
        return out

    def drop_collection(self, name: str) -> None:
        self.control.drop_collection(name)
        self.invalidate(name)

    def list_collections(self) -> list[CollectionConfig]:
        return self.control.list_collections()

    def training_status(self, name: str) -> dict:
        """Where the collection's index training stands (state, version, vectors needed, a sentence)."""
        return self.control.training_status(name)

    def train(self, name: str) -> int:
        """Asks for a new trained version of the collection's index; returns its number."""
        return self.control.train(name)

    def encode(self, name: str, images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Images through the collection's encoder: (vectors of those that decode, reason or None per image).

        Raises:
            FailedPrecondition: the collection has no encoder.
        """
        coll = self.shard_map(name).collection
        if not coll.encoder:
            raise FailedPrecondition(
                f"collection {name!r} has no encoder: send vectors, or create a collection with an encoder "
                "(for example --encoder phash)")
        try:
            return self.encoders.encode_many(coll.encoder, images)
        except ValueError as err:  # the encoder cannot be loaded here (missing extra or model file)
            raise FailedPrecondition(f"encoder {coll.encoder!r} of collection {name!r} is not usable: {err}") from None

    # --- search (router.search) -----------------------------------------------------------------------------
    def search(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
               min_coverage: float = 1.0, include_payloads: bool = False,
               timeout: float | None = None, filt=None) -> SearchResult:
        """k-NN over all buckets, blocking this thread (see :meth:`router.search.Search.search`)."""
        return self._search.search(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout, filt)

    async def search_async(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
                           min_coverage: float = 1.0, include_payloads: bool = False, timeout: float | None = None,
                           executor=None, filt=None) -> SearchResult:
        """:meth:`search` as a coroutine on the running loop (see :meth:`router.search.Search.search_async`)."""
        return await self._search.search_async(name, xq, k, nprobe, ef_search, min_coverage, include_payloads,
                                               timeout, executor, filt)

    # --- writes (router.writes) -----------------------------------------------------------------------------
    def upsert(self, name: str, ids: list[str], x: np.ndarray, payloads=None, timeout: float | None = None) -> int:
        """Writes items to every owner; returns once all are durable (:meth:`router.writes.Writes.upsert`)."""
        return self._writes.upsert(name, ids, x, payloads, timeout)

    def delete(self, name: str, ids: list[str], timeout: float | None = None) -> tuple[int, int]:
        """Removes items from every owner; (removed, missing) (:meth:`router.writes.Writes.delete`)."""
        return self._writes.delete(name, ids, timeout)

    def assign_clusters(self, name: str, centroids: np.ndarray, field: str, buckets,
                        timeout: float | None = None) -> np.ndarray:
        """Labels the items of some buckets with their nearest centroid; items per centroid
        (:meth:`router.writes.Writes.assign_clusters`)."""
        return self._writes.assign_clusters(name, centroids, field, buckets, timeout)

    # --- reads (router.reads) -------------------------------------------------------------------------------
    def get(self, name: str, ids: list[str], include_vectors: bool = False, timeout: float | None = None):
        """(found ids in request order, vectors or None, payloads) (:meth:`router.reads.Reads.get`)."""
        return self._reads.get(name, ids, include_vectors, timeout)

    def scan(self, name: str, buckets, include_vectors: bool = False, include_payloads: bool = False,
             timeout: float | None = None, filt=None):
        """The items of some buckets: (ids, vectors or None, payloads or None) (:meth:`router.reads.Reads.scan`)."""
        return self._reads.scan(name, buckets, include_vectors, include_payloads, timeout, filt)

    def export(self, name: str, buckets, page: int, timeout: float | None = None):
        """Yields (ids, vectors, payloads) pages of ``buckets`` in order (:meth:`router.reads.Reads.export`)."""
        return self._reads.export(name, buckets, page, timeout)

    def sample(self, name: str, size: int, seed: int = 0, include_vectors: bool = False,
               timeout: float | None = None, filt=None):
        """About ``size`` items drawn uniformly, by whole buckets (:meth:`router.reads.Reads.sample`)."""
        return self._reads.sample(name, size, seed, include_vectors, timeout, filt)

    # --- status (router.status) -----------------------------------------------------------------------------
    def count(self, name: str, timeout: float | None = 5.0) -> int:
        """Items stored in a collection (:meth:`router.status.Status.count`)."""
        return self._status.count(name, timeout)

    def bucket_counts(self, name: str, timeout: float | None = 5.0) -> np.ndarray:
        """Items per bucket of a collection, shape (buckets,) int64."""
        return self._status.bucket_counts(name, timeout)

    def census(self, timeout: float | None = 5.0) -> Census:
        """Every shard's Stats and every collection's item count (:meth:`router.status.Status.census`)."""
        return self._status.census(timeout)

    def shard_stats(self, timeout: float | None = 2.0,
                    infos: list[ShardInfo] | None = None) -> list[tuple[ShardInfo, object | None]]:
        """(info, ShardStatsResponse or None if unreachable) for every shard (or of ``infos``)."""
        return self._status.shard_stats(timeout, infos)

    def close(self) -> None:
        self.shards.close()
