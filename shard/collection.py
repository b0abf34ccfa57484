"""One collection's buckets on one shard (:class:`ShardCollection`): its state, the checks every request makes,
and its writes; loading, checkpoints, upkeep, reads and bucket moves are parts it owns, in modules of their own.

Plain classes, testable without Ray or gRPC. Uses the shard's other modules (index, id table, storage and the
parts) and the base package.
"""

from __future__ import annotations

import logging
import pathlib
import threading
from typing import Callable

import numpy as np

from lookalike.config import CollectionConfig
from lookalike.errors import FailedPrecondition, NotFound, StaleShardMap, Unavailable
from lookalike.ids import bucket_of_labels, buckets_and_labels
from shard.checkpointing import Checkpointer, Loader
from shard.clusters import assign_clusters
from shard.idtable import IdTable
from shard.cpu_index import VectorIndex
from shard.locks import RWLock
from shard.moves import COPY_NICE, BucketMoves
from shard.payload_index import PayloadIndex
from shard.reads import Reads
from shard.manifest import LogPosition
from shard.records import DELETE, UPSERT
from shard.store import CollectionStore
from shard.upkeep import Upkeep

log = logging.getLogger(__name__)


class ShardCollection:
    """One collection's buckets on one shard: index, id table and storage.

    It holds the state (owned buckets, fences, index, id table, store, locks), checks requests against it and
    applies writes; its parts do the rest: :class:`shard.checkpointing.Loader` loads it,
    :class:`shard.checkpointing.Checkpointer` writes its checkpoints, :class:`shard.upkeep.Upkeep` follows its
    writes, :class:`shard.reads.Reads` answers reads and :class:`shard.moves.BucketMoves` moves its buckets.
    Its methods named after theirs pass the call on.

    The buckets change while it serves (see control.controller for the whole protocol of a move):
    :meth:`join` takes buckets on (they accept writes at once), :meth:`copy_in` loads what their previous owner
    stored while writes keep arriving, :meth:`finish_join` ends that, and :meth:`drop_buckets` gives buckets away.
    Two fences refuse requests routed with an older shard map than a change of buckets: ``min_epoch`` (every
    request: the shard gave buckets away, or (re)loaded) and ``min_write_epoch`` (writes only: a move's source,
    whose log must hold every write accepted under the old map before the target copies it).

    Args:
        coll: the collection.
        buckets: the buckets this shard owns.
        store: its durable storage.
        check_room: called with the bytes a write would add (and the GPU bytes, on a GPU shard); raises
            ResourceExhausted if they do not fit.
        min_epoch: requests routed with an older shard-map epoch are refused as stale (0: none are).
        gpu: the shard's GPU backend (``lookalike.gpu``): searches then run on a GPU mirror of the index. None: CPU.
        on_broken: called with the collection's name when a logged write failed to apply: the owner reloads it.
    """

    def __init__(self, coll: CollectionConfig, buckets, store: CollectionStore,
                 check_room: Callable[..., None] = lambda n, gpu_bytes=0: None, min_epoch: int = 0, gpu=None,
                 on_broken: Callable[[str], None] | None = None, template=None, list_groups=None):
        self.coll = coll
        self.list_groups = list_groups  # its process's shared IVF lists (shard.list_groups), if it shares them
        self._owned = np.zeros(coll.buckets, dtype=bool)
        self._owned[[int(b) for b in buckets]] = True
        self.joining: dict[int, set[str]] = {}  # bucket being copied in -> ids written to it since it was joined
        self.min_epoch = min_epoch
        self.min_write_epoch = min_epoch
        self.store = store
        self._gpu = gpu
        self.index = VectorIndex(coll, gpu, template)
        self.table = IdTable()
        self.payloads = PayloadIndex(coll.schema)  # follows the table: see shard.payload_index
        # Index checkpoints (see shard.checkpointing).
        self.loaded_from_checkpoint = ""  # the checkpoint the last load started from ("": a full replay)
        self.replayed_records = 0         # log records the last load replayed (on top of it)
        self.checkpoint_every_bytes: int | None = None  # None: see shard.checkpointing.CHECKPOINT_EVERY_BYTES
        self._checkpoint_at: LogPosition | None = None  # what the newest checkpoint covers, if it matches memory
        self._check_room = check_room
        self._rw = RWLock()
        self._write_order = threading.Lock()  # log order == apply order
        self.adopting = None  # a trained index filled while writes go on: each write goes to it too (shard.training)
        self.dropped = False
        self.broken = ""  # why requests are refused until the shard reloads the collection (see _apply_failed)
        self._on_broken = on_broken
        # Its parts, each with one job (their modules say which).
        self.loader = Loader(self)
        self.checkpointer = Checkpointer(self)
        self.upkeep = Upkeep(self)
        self.moves = BucketMoves(self)
        self.reads = Reads(self)

    @property
    def buckets(self) -> frozenset[int]:
        """Buckets this shard owns (serving or joining)."""
        return frozenset(np.flatnonzero(self._owned).tolist())

    # --- checks and writes ----------------------------------------------------------------------------------
    def _check_owned(self, buckets: np.ndarray) -> None:
        if not self._owned[buckets].all():
            bad = int(buckets[~self._owned[buckets]][0])
            raise StaleShardMap(
                f"shard does not own bucket {bad} of collection {self.coll.name!r}: the shard map changed, retry")

    def _check_live(self) -> None:
        if self.dropped:
            raise NotFound(f"collection {self.coll.name!r} was dropped")
        if self.broken:
            raise Unavailable(f"collection {self.coll.name!r}: {self.broken}; retry in a moment")

    def _check_epoch(self, epoch: int, write: bool = False) -> None:
        fence = max(self.min_epoch, self.min_write_epoch) if write else self.min_epoch
        if epoch and epoch < fence:
            raise StaleShardMap(
                f"request routed with shard map epoch {epoch}, but the buckets of {self.coll.name!r} on this shard "
                f"changed at epoch {fence}: retry with a fresh map")

    def _bytes_for(self, x: np.ndarray, ids: list[str], payloads) -> int:
        """A generous estimate of the memory n new items take: index bytes per vector, id, payload, table row."""
        raw = x.nbytes / max(len(x), 1)
        per_vector = self.index.nbytes / self.index.ntotal if self.index.trained and self.index.ntotal else raw
        return int(len(x) * (per_vector + 48) + sum(len(u) for u in ids)
                   + sum(len(p) for p in payloads if p is not None))

    def _note_joining(self, ids: list[str], buckets: np.ndarray) -> None:
        if self.joining:
            for uid, b in zip(ids, buckets.tolist()):
                touched = self.joining.get(b)
                if touched is not None:
                    touched.add(uid)

    def upsert(self, ids: list[str], x: np.ndarray, payloads: list[bytes | None], epoch: int = 0) -> int:
        """Inserts or replaces items; durable and searchable when it returns. x: shape (n, d) float32 / uint8.

        Raises:
            StaleShardMap: a bucket is not this shard's, or ``epoch`` is older than its last change of buckets.
            ResourceExhausted: the items would not fit in the shard's capacity.
        """
        buckets, home = buckets_and_labels(ids, self.coll.buckets)
        self._check_owned(buckets)
        self._check_room(self._bytes_for(x, ids, payloads), self.index.gpu_bytes_for(len(x)))
        with self._write_order:
            self._check_live()
            self._check_epoch(epoch, write=True)
            self._check_owned(buckets)
            self.payloads.check(ids, payloads)  # a value of another type than its field's is refused
            self.store.append(UPSERT, ids, x, payloads)
            try:
                self._apply_upsert(ids, home, x, payloads)
            except Exception as err:  # noqa: BLE001: see _apply_failed
                self._apply_failed("upsert", err)
            self._note_joining(ids, buckets)
            self.upkeep.after_write(x.nbytes)
        return len(ids)

    def _apply_failed(self, what: str, err: Exception):
        """A logged write failed to apply to memory (FAISS refused it): it is taken back out of the log, so it is
        never replayed, and the collection is reloaded from storage (memory may hold part of the write). Raises
        FailedPrecondition for the caller: the write was not stored."""
        retracted = self.store.retract()
        self.broken = f"a failed {what} is being undone: the collection reloads from storage"
        log.error("%s: %s could not be applied (%s: %s); %s; reloading it", self.coll.name, what,
                  type(err).__name__, err, "taken back out of the log" if retracted
                  else "it is in a sealed log segment: the reload will fail on it and quarantine the collection")
        if self._on_broken is not None:
            self._on_broken(self.coll.name)
        raise FailedPrecondition(
            f"the {what} could not be applied to collection {self.coll.name!r} ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}); nothing of it was stored") from None

    def _apply_upsert(self, ids, home, x, payloads) -> None:
        """Applies an upsert (caller holds the write order): tables built while searches go on, then swapped in."""
        labels, existing = self.table.assign(home, ids)
        table = self.table.with_put(labels, ids, payloads, existing)
        fields = self.payloads.decode(payloads)  # outside the lock, as the table
        if self.adopting is not None:  # first: if it fails, nothing of the write was applied
            self.adopting.upsert(labels, existing, x)
        with self._rw.write():
            if existing.any():
                self.index.remove(labels[existing])
            self.index.add(labels, x)
            self.payloads.put_fields(labels, fields)
            table, self.table = self.table, table  # the old table is freed after the lock

    def delete(self, ids: list[str], epoch: int = 0) -> tuple[int, int]:
        """Removes items; returns (removed, missing)."""
        buckets, home = buckets_and_labels(ids, self.coll.buckets)
        self._check_owned(buckets)
        with self._write_order:
            self._check_live()
            self._check_epoch(epoch, write=True)
            self._check_owned(buckets)
            self.store.append(DELETE, ids)
            try:
                with self._rw.write():
                    removed = self._apply_delete(ids, home)
            except Exception as err:  # noqa: BLE001: see _apply_failed
                self._apply_failed("delete", err)
            self._note_joining(ids, buckets)
            self.upkeep.refresh_gpu()
        return removed, len(ids) - removed

    def _apply_delete(self, ids, home) -> int:
        labels = self.table.find(home, ids)
        labels = labels[labels >= 0]
        if self.adopting is not None:
            self.adopting.remove(labels)
        self.index.remove(labels)
        self.table.remove(np.sort(labels))
        self.payloads.remove(labels)
        return len(labels)

    def _labels_of(self, buckets) -> np.ndarray:
        if not len(self.table) or not len(buckets):
            return np.empty(0, dtype=np.int64)
        return self.table.labels[np.isin(bucket_of_labels(self.table.labels), np.asarray(list(buckets)))]

    def _remove_buckets(self, buckets) -> int:
        """Removes every item of some buckets from memory (caller holds the write lock)."""
        labels = self._labels_of(buckets)
        if len(labels):
            if self.adopting is not None:
                self.adopting.remove(labels)
            self.index.remove(labels)
            self.table.remove(labels)
            self.payloads.remove(labels)
        return len(labels)

    def bucket_counts(self) -> np.ndarray:
        """Items per bucket, shape (buckets,) int64."""
        with self._rw.read():
            return np.bincount(bucket_of_labels(self.table.labels), minlength=self.coll.buckets)

    def close(self) -> None:
        """A graceful stop: writes a checkpoint (so that the next start loads it), then closes the storage. Its
        upkeep ends: a closed collection's lists are not packed, nor its memory trimmed, any more."""
        with self.checkpointer.turn(), self._write_order:
            self.checkpointer.write()
            self.store.close()
            self.upkeep.stop()

    # --- its parts' calls -----------------------------------------------------------------------------------
    def load(self, distrust_checkpoint: str = "") -> int:
        return self.loader.load(distrust_checkpoint)

    def checkpoint(self) -> str | None:
        return self.checkpointer.write()

    def stats(self) -> dict:
        return self.reads.stats()

    def get(self, ids: list[str], include_vectors: bool, epoch: int = 0):
        return self.reads.get(ids, include_vectors, epoch)

    def search(self, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0, include_payloads: bool = False,
               epoch: int = 0, coarse=None, packed: bool = False):
        return self.reads.search(xq, k, nprobe, ef_search, include_payloads, epoch, coarse, packed)

    def scan(self, buckets, include_vectors: bool = False, include_payloads: bool = False, epoch: int = 0,
             filt=None):
        return self.reads.scan(buckets, include_vectors, include_payloads, epoch, filt)

    def assign_clusters(self, centroids: np.ndarray, field: str, buckets, count_buckets=(), epoch: int = 0,
                        group: int = 32) -> tuple[np.ndarray, int]:
        return assign_clusters(self, centroids, field, buckets, count_buckets, epoch, group)

    def join(self, buckets) -> None:
        self.moves.join(buckets)

    def fence(self, epoch: int) -> None:
        self.moves.fence(epoch)

    def copy_in(self, buckets, source: str | pathlib.Path, nice: int = COPY_NICE, rate_bytes_s: float = 0) -> int:
        return self.moves.copy_in(buckets, source, nice, rate_bytes_s)

    def finish_join(self, buckets) -> None:
        self.moves.finish_join(buckets)

    def drop_buckets(self, buckets, epoch: int) -> int:
        return self.moves.drop_buckets(buckets, epoch)
