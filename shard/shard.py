"""A shard (:class:`Shard`): all its collections, each a :class:`shard.collection.ShardCollection` of the buckets
the shard map gives it, in one FAISS index, backed by storage; their loading (a collection whose replay fails
is quarantined), training, bucket moves and memory capacity.

Plain classes, testable without Ray or gRPC; ``shard.server`` serves them over gRPC and
``control.ray_shard.ShardActor`` runs that inside a Ray actor. Uses the shard's other modules and the base
package.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import threading
from collections.abc import Callable

import psutil

from lookalike.config import CollectionConfig
from lookalike.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from lookalike.indexspec import check_spec
from shard.collection import ShardCollection
from shard.locks import NamedLocks
from shard.metrics import SHARDS
from shard.quarantine import ReplayGuard
from shard.osutil import release_memory
from shard.store import CollectionStore
from shard.training import TrainedIndexes, adopt_later, adopt_trained

log = logging.getLogger(__name__)


class Shard:
    """All collections of one shard.

    Args:
        shard_id: stable name ("shard-0"); its storage lives under ``<storage_root>/shards/<shard_id>``.
        storage_root: the storage URI (a local directory path).
        segment_bytes: WAL segment size before compaction.
        capacity_bytes: resident memory the shard may fill (0: no limit); writes that would pass it are refused.
        gpu: a GPU backend (``lookalike.gpu``) when the shard has a GPU: its collections search GPU mirrors of their
            indexes, and its capacity is the GPU's memory (or ``capacity_bytes`` when smaller); writes that would
            pass it are refused too. None: a CPU shard.
    """

    def __init__(self, shard_id: str, storage_root: str | pathlib.Path, segment_bytes: int = 64 << 20,
                 capacity_bytes: int = 0, gpu=None):
        self.shard_id = shard_id
        self.storage_root = pathlib.Path(storage_root)
        self.root = self.storage_root / "shards" / shard_id
        self.segment_bytes = segment_bytes
        self.gpu = gpu
        self.memory_capacity_bytes = int(capacity_bytes)  # resident memory
        caps = [b for b in ((gpu.total_bytes() or 0) if gpu is not None else 0, int(capacity_bytes)) if b]
        self.gpu_capacity_bytes = min(caps) if gpu is not None and caps else 0
        self.capacity_bytes = self.gpu_capacity_bytes if gpu is not None else int(capacity_bytes)  # what it reports
        self._collections: dict[str, ShardCollection] = {}
        self.list_groups = None  # its process's shared IVF lists (shard.list_groups; set by shard.host)
        self.quarantined: dict[str, str] = {}  # collection -> why it is not loaded (see open_collection)
        self._reloading: set[str] = set()
        self._name_locks = NamedLocks()  # see open_collection
        self.trained = TrainedIndexes(shard_id, self.storage_root, gpu, self.store_path)
        self._lock = threading.Lock()
        self.serving = False
        self.metrics_address = ""  # host:port of its Prometheus metrics, when it serves them (shard.proto)
        self.process_share: Callable[[], float] | None = None  # sharing a process (shard.host): its part, 0-1
        SHARDS.watch(self)

    def memory_bytes(self) -> int:
        """Resident memory of this process; in a process holding several shards, this shard's part of it."""
        return int(psutil.Process().memory_info().rss * (1.0 if self.process_share is None else self.process_share()))

    def index_bytes(self) -> int:  # its collections' indexes
        return sum(sc.index.nbytes for sc in list(self._collections.values()) if sc.index is not None)

    def gpu_memory_bytes(self) -> int:
        """GPU memory in use: what the device reports (a whole GPU), else the bytes of this shard's mirrors."""
        if (used := self.gpu.used_bytes() if self.gpu is not None else None) is not None:
            return int(used)
        return sum(sc.index.gpu_nbytes for sc in list(self._collections.values()) if sc.index is not None)

    def used_bytes(self) -> int:
        """How full the shard is, against ``capacity_bytes``: resident memory on a CPU shard; on a GPU shard its
        GPU memory, or resident memory when that is larger and a memory capacity was set."""
        if self.gpu is None:
            return self.memory_bytes()
        used = self.gpu_memory_bytes()
        return max(used, self.memory_bytes()) if self.memory_capacity_bytes else used

    def check_room(self, nbytes: int, gpu_bytes: int = 0) -> None:
        """Raises ResourceExhausted if ``nbytes`` more resident memory, or ``gpu_bytes`` more GPU memory on a GPU
        shard, would pass the capacity (each is checked when > 0)."""
        if nbytes > 0 and self.memory_capacity_bytes:
            used = self.memory_bytes()
            if used + nbytes > self.memory_capacity_bytes:
                raise ResourceExhausted(
                    f"shard {self.shard_id} is full: it uses {used / 2**20:.0f} MiB of its "
                    f"{self.memory_capacity_bytes / 2**20:.0f} MiB and the write needs about {nbytes / 2**20:.1f} MiB "
                    "more; add shards (`lookalike rebalance NAME --add-shards N`) or give shards more memory")
        if gpu_bytes > 0 and self.gpu is not None and self.gpu_capacity_bytes:
            used = self.gpu_memory_bytes()
            if used + gpu_bytes > self.gpu_capacity_bytes:
                raise ResourceExhausted(
                    f"shard {self.shard_id} is full: its GPU holds {used / 2**20:.0f} MiB of its "
                    f"{self.gpu_capacity_bytes / 2**20:.0f} MiB and the write needs about {gpu_bytes / 2**20:.1f} MiB "
                    "more; add shards (`lookalike rebalance NAME --add-shards N`), or store less per vector on the GPU "
                    "(gpu_float16, IVF-PQ)")

    def store_path(self, shard_id: str, name: str) -> pathlib.Path:
        """Where shard ``shard_id`` stores collection ``name`` (on the storage every node mounts)."""
        return self.storage_root / "shards" / shard_id / name

    def open_collection(self, coll: CollectionConfig, buckets, epoch: int = 0) -> int:
        """Takes ownership of ``buckets`` of a collection and loads them from storage; returns the items loaded.
        ``epoch``: the shard-map epoch of the assignment; requests routed with an older map are refused as stale.

        A collection already open (or quarantined) stays as it is (its buckets change through join /
        drop_buckets). A collection whose replay fails, or kept killing the process (see :class:`ReplayGuard`), is
        quarantined instead of loaded: reported in stats, refused with FAILED_PRECONDITION, while the shard serves
        its other collections. Opening and dropping a collection wait for each other (a second store on its
        directory could cut off the first one's appends: shard.store_check).
        """
        with self._name_locks.of(coll.name):
            with self._lock:
                current = self._collections.get(coll.name)
                if current is not None:
                    return len(current.table)
                if coll.name in self.quarantined:
                    return 0
            guard = ReplayGuard(self.root / coll.name)
            reason = guard.quarantine_reason()
            if reason is None:
                try:
                    check_spec(coll.index, coll.dim, coll.binary)
                except InvalidArgument as err:
                    reason = guard.quarantine(f"its index spec is not supported ({err})")
            if reason is not None:
                return self._quarantine(coll.name, reason)
            with guard.replaying():  # one at a time in a process: a death blames the one it killed
                store = None
                try:
                    template = self.trained.for_load(coll)
                    store = CollectionStore(self.root / coll.name, coll.buckets, segment_bytes=self.segment_bytes)
                    sc = ShardCollection(coll, buckets, store, self.check_room, epoch, gpu=self.gpu,
                                         on_broken=self._reload, template=template, list_groups=self.list_groups)
                    n = sc.load(f"not used: the shard process died during the last {guard.died} load(s) of the "
                                "collection, kept aside in case reading it was the cause" if guard.died else "")
                except Exception as err:  # noqa: BLE001: any failure of one collection's replay stays with it
                    log.exception("%s: replaying collection %s failed", self.shard_id, coll.name)
                    if store is not None:
                        store.close()
                    return self._quarantine(coll.name, guard.quarantine(
                        f"its replay failed: {type(err).__name__}: {err}"))
                guard.done()
            release_memory()
            with self._lock:
                self._collections[coll.name] = sc
            adopt_later(sc, coll, self.trained)  # when it loaded a checkpoint of an older trained version
            log.info("%s: collection %s loaded, %d items in %d buckets", self.shard_id, coll.name, n, len(sc.buckets))
            return n

    def train_collection(self, coll: CollectionConfig, version: int, sources: list[tuple[str, list[int]]],
                         sample: int) -> dict:
        """Trains the collection's index once for every shard (see :meth:`TrainedIndexes.train`)."""
        return self.trained.train(coll, version, sources, sample)

    def use_trained(self, coll: CollectionConfig) -> bool:
        """Moves the collection's items here into trained index ``coll.trained_version`` (shard.training's
        adopt_trained); False if already there. Raises NotFound (not open here), FailedPrecondition (unreadable)."""
        sc = self.collection(coll.name)
        if sc.index.trained_version == coll.trained_version:
            return False
        return adopt_trained(sc, coll, self.trained.read(coll))

    def _reload(self, name: str) -> None:
        """Reloads a collection from storage in the background (a write failed to apply: memory may hold part of
        it). Meanwhile the old one refuses requests with UNAVAILABLE."""
        def run():
            with self._lock:
                sc = self._collections.get(name)
            if sc is None:
                return
            with sc._write_order:
                sc.store.close()
            with self._lock:
                if self._collections.get(name) is not sc:
                    return
                del self._collections[name]
                self._reloading.add(name)
            try:
                self.open_collection(sc.coll, sc.buckets, max(sc.min_epoch, sc.min_write_epoch))
            finally:
                with self._lock:
                    self._reloading.discard(name)

        threading.Thread(target=run, name=f"reload-{name}", daemon=True).start()

    def _quarantine(self, name: str, reason: str) -> int:
        with self._lock:
            self.quarantined[name] = reason
        log.error("%s: collection %s is QUARANTINED, not served by this shard: %s", self.shard_id, name, reason)
        return 0

    def drop_collection(self, name: str) -> None:
        """Forgets a collection and deletes its storage on this shard (no error if absent)."""
        with self._name_locks.of(name):  # see open_collection
            with self._lock:
                sc = self._collections.pop(name, None)
                self.quarantined.pop(name, None)
            if sc is not None:
                with sc._write_order:
                    sc.dropped = True
                    sc.upkeep.stop()
                    sc.store.destroy()
                with sc._rw.write():  # searches in flight finish first
                    sc.index = None
                    sc.table = None
                release_memory()
            else:
                shutil.rmtree(self.root / name, ignore_errors=True)
            self.trained.forget(name)

    def collection(self, name: str) -> ShardCollection:
        sc = self._collections.get(name)
        if sc is None and name in self._reloading:
            raise Unavailable(f"collection {name!r} is reloading on shard {self.shard_id}; retry in a moment")
        if sc is None and name in self.quarantined:
            raise FailedPrecondition(
                f"collection {name!r} is quarantined on shard {self.shard_id}: {self.quarantined[name]}")
        if sc is None:
            raise NotFound(f"collection {name!r} does not exist on shard {self.shard_id}")
        return sc

    def collection_problems(self) -> dict[str, str | None]:
        """Per collection: why this shard does not serve it now (quarantined, reloading, broken), or None."""
        out = {name: sc.broken or None for name, sc in list(self._collections.items())}
        out.update({name: "it is reloading from storage" for name in list(self._reloading)})
        out.update({name: f"it is quarantined: {why}" for name, why in list(self.quarantined.items())})
        return out

    def stats_collections(self) -> list[dict]:
        out = [sc.stats() for sc in list(self._collections.values())]
        for st in out:
            if st["name"] in self.trained.problems:
                st["damaged"] = [*st["damaged"], self.trained.problems[st["name"]]]
        for name, reason in list(self.quarantined.items()):
            out.append({"name": name, "damaged": [f"QUARANTINED: {reason}"]})
        return out

    def stats(self) -> dict:
        return {"shard_id": self.shard_id, "serving": self.serving, "memory_bytes": self.used_bytes(),
                "capacity_bytes": self.capacity_bytes, "collections": self.stats_collections(),
                "metrics_address": self.metrics_address}

    # --- bucket moves (called by the controller through the placer) ----------------------------------------
    def join_buckets(self, cfg: CollectionConfig, buckets, epoch: int = 0) -> None:
        """Takes buckets of a collection on (opening the collection here first if this shard had none of it)."""
        self.open_collection(cfg, [], epoch)
        self.collection(cfg.name).join(buckets)

    def fence(self, name: str, epoch: int) -> None:
        self.collection(name).fence(epoch)

    def copy_in(self, name: str, buckets, source_shard: str, rate_bytes_s: float = 0) -> int:
        return self.collection(name).copy_in(buckets, self.store_path(source_shard, name), rate_bytes_s=rate_bytes_s)

    def finish_join(self, name: str, buckets) -> None:
        self.collection(name).finish_join(buckets)

    def drop_buckets(self, name: str, buckets, epoch: int) -> int:
        sc = self._collections.get(name)
        return sc.drop_buckets(buckets, epoch) if sc is not None else 0

    def bucket_counts(self, name: str) -> list[int]:
        sc = self._collections.get(name)
        return sc.bucket_counts().tolist() if sc is not None else []

    def close(self) -> None:
        """Checkpoints and closes every collection (see ShardCollection.close)."""
        SHARDS.unwatch(self)
        for sc in list(self._collections.values()):
            sc.close()

