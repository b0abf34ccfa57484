"""A shard: for each collection, the buckets the shard map gives it, in one FAISS index, backed by storage.

Plain classes, testable without Ray or gRPC; ``shard.server`` serves them over gRPC and
``control.ray_cluster.ShardActor`` runs that inside a Ray actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shutil
import threading
import time
from typing import Callable

import faiss
import numpy as np
import psutil

from lookalike.config import LIMITS, CollectionConfig
from lookalike.errors import (FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, StaleShardMap,
                              Unavailable)
from lookalike.ids import LABEL_MASK, bucket_of_labels, buckets_and_labels
from lookalike.indexspec import check_spec, training_points
from shard import checkpoint
from shard.checkpoint import CheckpointDamaged
from shard.index import VectorIndex
from shard.storage import (DELETE, RESET, UPSERT, CollectionStore, LogPosition, _fsync_dir, _snapshot_path,
                           read_buckets, release_memory)
from shard.trained import TemplateDamaged, read_template, remove_templates, write_template

log = logging.getLogger(__name__)

_TRIM_EVERY_BYTES = 32 << 20
_TRIM_IDLE_S = 1.0  # seconds without writes after which a shard hands back what its last writes freed
_COPY_BATCH = 4096  # items per apply while copying a bucket in (each holds the write lock briefly)
_ENCODE_BATCH = 65536  # vectors per add while moving a shard's items into a trained index
_REPACK_MIN = 10_000  # vectors below which compressed IVF lists are not worth packing (see _repack_if_due)
# Growth since the last pack that makes lists worth packing again: every list that grows after a pack is copied
# into a buffer twice its size, so even a little growth costs much (10M x 128 IVF4096,Flat on 4 shards: the last 18%
# of a load, left unpacked under a threshold of 20%, cost 220 bytes a vector of resident memory).
_REPACK_GROWTH = 0.05
_REPACK_IDLE_S = 5.0  # seconds without writes before lists are packed (see _trim_when_idle)
COPY_NICE = 10      # OS priority of the copy thread: searches come first
# A checkpoint is written (in the background) once this many vector bytes were written since the last one, or half
# the index's bytes when that is more: compaction keeps the log segments the newest checkpoint does not cover, so
# this bounds both the log a restart replays and the disk it keeps, while a large index is not rewritten for every
# segment of writes.
CHECKPOINT_EVERY_BYTES = 64 << 20

class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    class _Ctx:
        def __init__(self, acquire, release):
            self._acquire, self._release = acquire, release

        def __enter__(self):
            self._acquire()

        def __exit__(self, *exc):
            self._release()

    def read(self):
        return self._Ctx(self.acquire_read, self.release_read)

    def write(self):
        return self._Ctx(self.acquire_write, self.release_write)


def _spread(values, mask: np.ndarray, empty) -> list:
    """``values`` at the True places of ``mask``, ``empty`` elsewhere."""
    out = np.full(len(mask), empty, dtype=object)
    out[np.flatnonzero(mask)] = values
    return out.tolist()


class IdTable:
    """User ids <-> internal labels, plus payloads, in flat numpy arrays: about 24 bytes an item plus the id's
    UTF-8 bytes (a Python str per item would cost about 50 more).

    Rows are sorted by label. The ids live in one byte arena (``blob``) cut by ``offsets``. An id's label is its
    home label (from its hash, see lookalike.ids) or, in the astronomically rare case that another id of the same
    bucket already holds that label, one of the next ``PROBES - 1`` labels.
    """

    PROBES = 4

    def __init__(self):
        self.labels = np.empty(0, dtype=np.int64)        # sorted
        self.offsets = np.zeros(1, dtype=np.int64)       # row i's id is blob[offsets[i]:offsets[i + 1]]
        self.blob = np.empty(0, dtype=np.uint8)
        self.payloads = np.empty(0, dtype=object)        # aligned; serialized Payload or None

    def __len__(self) -> int:
        return len(self.labels)

    # --- ids as fixed-width byte strings (ids hold no NUL, so numpy's "S" type round-trips them) ----------------
    def _gather(self, pos: np.ndarray) -> np.ndarray:
        """Ids at row positions (any shape) as a numpy "S" array of the same shape."""
        flat = pos.ravel()
        starts = self.offsets[flat]
        lengths = self.offsets[flat + 1] - starts
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        idx = starts[:, None] + np.arange(width)
        chars = np.where(np.arange(width) < lengths[:, None], self.blob[np.minimum(idx, max(len(self.blob) - 1, 0))]
                         if len(self.blob) else 0, 0).astype(np.uint8)
        return np.ascontiguousarray(chars).view(f"S{width}").reshape(pos.shape)

    # Rows per _gather call: its scratch arrays are (rows x longest id) cells of 8 bytes, at most 32 MiB here, not
    # (nq x k x 256) of them for a search of 10,000 queries at k=1024 (a 20 GB allocation the fuzz test found).
    _GATHER_ROWS = (1 << 22) // LIMITS.max_id_bytes

    def uids_at(self, pos: np.ndarray) -> list[str]:
        flat = np.asarray(pos).ravel()
        step = self._GATHER_ROWS
        return [b.decode("utf-8") for s in range(0, len(flat), step) for b in self._gather(flat[s:s + step]).tolist()]

    @staticmethod
    def _encode(uids: list[str]) -> np.ndarray:
        return np.array([u.encode("utf-8") for u in uids], dtype=bytes)

    # --- lookups --------------------------------------------------------------------------------------------
    def _candidates(self, home: np.ndarray) -> np.ndarray:
        high = home & ~np.int64(LABEL_MASK)
        return high[:, None] | ((home[:, None] + np.arange(self.PROBES, dtype=np.int64)) & LABEL_MASK)

    def _probe(self, home: np.ndarray, uids: list[str]):
        cand = self._candidates(home)
        if not len(self.labels):
            none = np.zeros(cand.shape, dtype=bool)
            return cand, none, none
        posc = np.minimum(np.searchsorted(self.labels, cand), len(self.labels) - 1)
        present = self.labels[posc] == cand
        match = present.copy()
        if present.any():
            rows = present.any(axis=1)
            match[rows] &= self._gather(posc[rows]) == self._encode([u for u, r in zip(uids, rows) if r])[:, None]
        return cand, present, match

    def find(self, home: np.ndarray, uids: list[str]) -> np.ndarray:
        """Labels of ids (shape (n,) int64), -1 for ids not stored."""
        cand, _, match = self._probe(home, uids)
        found = match.any(axis=1)
        return np.where(found, cand[np.arange(len(cand)), match.argmax(axis=1)], -1)

    def assign(self, home: np.ndarray, uids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Labels for a batch of distinct ids to upsert: (labels, existing), existing marking ids already stored."""
        cand, present, match = self._probe(home, uids)
        existing = match.any(axis=1)
        rows = np.arange(len(cand))
        labels = np.where(existing, cand[rows, match.argmax(axis=1)], cand[rows, (~present).argmax(axis=1)])
        new = ~existing
        if (new & present.all(axis=1)).any():
            raise RuntimeError("label space of a bucket exhausted by hash collisions")
        if len(np.unique(labels)) != len(labels):  # two new ids of one batch collide: settle them in order
            used = set(labels[existing].tolist())
            for i in np.flatnonzero(new):
                for j, c in enumerate(cand[i].tolist()):
                    if not present[i, j] and c not in used:
                        labels[i] = c
                        used.add(c)
                        break
                else:
                    raise RuntimeError("label space of a bucket exhausted by hash collisions")
        return labels, existing

    def positions(self, labels: np.ndarray) -> np.ndarray:
        """Row positions of present labels (any shape); -1 labels give position 0, mask them yourself."""
        return np.searchsorted(self.labels, np.maximum(labels, 0))

    # --- changes --------------------------------------------------------------------------------------------
    def put(self, labels: np.ndarray, uids: list[str], payloads: list[bytes | None], existing: np.ndarray) -> None:
        if existing.any():
            pay = np.empty(int(existing.sum()), dtype=object)
            pay[:] = [payloads[i] for i in np.flatnonzero(existing)]
            self.payloads[self.positions(labels[existing])] = pay
        new = np.flatnonzero(~existing)
        if not len(new):
            return
        order = new[np.argsort(labels[new], kind="stable")]
        new_labels = labels[order]
        encoded = [uids[i].encode("utf-8") for i in order]
        new_lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        at = np.searchsorted(self.labels, new_labels)
        self.blob = np.insert(self.blob, np.repeat(self.offsets[at], new_lengths),
                              np.frombuffer(b"".join(encoded), dtype=np.uint8))
        lengths = np.insert(np.diff(self.offsets), at, new_lengths)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.labels = np.insert(self.labels, at, new_labels)
        pay = np.empty(len(order), dtype=object)
        pay[:] = [payloads[i] for i in order]
        self.payloads = np.insert(self.payloads, at, pay)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as plain arrays, for a checkpoint: payloads as their lengths (-1 for None) and one blob."""
        lengths = np.fromiter((-1 if p is None else len(p) for p in self.payloads.tolist()), dtype=np.int64,
                              count=len(self.payloads))
        blob = np.frombuffer(b"".join(p for p in self.payloads.tolist() if p), dtype=np.uint8)
        return {"labels": self.labels, "offsets": self.offsets, "blob": self.blob, "payload_lengths": lengths,
                "payload_blob": blob}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "IdTable":
        """A table from :meth:`to_arrays`. Raises ValueError (or KeyError) if they do not hold together."""
        t = cls()
        t.labels = np.ascontiguousarray(arrays["labels"], dtype=np.int64)
        t.offsets = np.ascontiguousarray(arrays["offsets"], dtype=np.int64)
        t.blob = np.ascontiguousarray(arrays["blob"], dtype=np.uint8)
        lengths = np.asarray(arrays["payload_lengths"], dtype=np.int64)
        blob = np.asarray(arrays["payload_blob"], dtype=np.uint8).tobytes()
        n = len(t.labels)
        if (len(t.offsets) != n + 1 or t.offsets[0] != 0 or t.offsets[-1] != len(t.blob)
                or (np.diff(t.offsets) < 0).any() or (n > 1 and (np.diff(t.labels) <= 0).any())):
            raise ValueError(f"the id table's {n} labels, {len(t.offsets)} offsets and {len(t.blob)} id bytes do not "
                             "hold together")
        if len(lengths) != n or (lengths < -1).any() or int(lengths[lengths > 0].sum()) != len(blob):
            raise ValueError(f"{len(lengths)} payload lengths for {n} rows, or not those of its "
                             f"{len(blob)} payload bytes")
        ends = np.cumsum(np.maximum(lengths, 0)).tolist()
        t.payloads = np.empty(n, dtype=object)
        t.payloads[:] = [None if ln < 0 else blob[e - ln:e] for ln, e in zip(lengths.tolist(), ends)]
        return t

    def _shallow(self) -> "IdTable":
        t = IdTable()
        t.labels, t.offsets, t.blob, t.payloads = self.labels, self.offsets, self.blob, self.payloads
        return t

    def with_put(self, labels, uids, payloads, existing) -> "IdTable":
        """A new table with :meth:`put` applied; this one is left as it is (searches may be reading it)."""
        t = self._shallow()
        if existing.any():
            t.payloads = self.payloads.copy()  # put assigns into it
        t.put(labels, uids, payloads, existing)
        return t

    def without(self, labels: np.ndarray) -> "IdTable":
        """A new table with :meth:`remove` applied; this one is left as it is."""
        t = self._shallow()
        t.remove(labels)
        return t

    def remove(self, labels: np.ndarray) -> None:
        """Removes rows by label (all present). Assigns new arrays (never writes into the old ones)."""
        if len(labels) == 0:
            return
        keep = np.ones(len(self.labels), dtype=bool)
        keep[self.positions(labels)] = False
        lengths = np.diff(self.offsets)
        self.blob = self.blob[np.repeat(keep, lengths)]
        self.offsets = np.concatenate([[0], np.cumsum(lengths[keep])])
        self.labels = self.labels[keep]
        self.payloads = self.payloads[keep]


class ShardCollection:
    """One collection's buckets on one shard: index, id table and storage.

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
                 on_broken: Callable[[str], None] | None = None, template=None):
        self.coll = coll
        self._owned = np.zeros(coll.buckets, dtype=bool)
        self._owned[[int(b) for b in buckets]] = True
        self.joining: dict[int, set[str]] = {}  # bucket being copied in -> ids written to it since it was joined
        self.min_epoch = min_epoch
        self.min_write_epoch = min_epoch
        self.store = store
        self._gpu = gpu
        self.index = VectorIndex(coll, gpu, template)
        self.table = IdTable()
        # Index checkpoints (see checkpoint and load).
        self.loaded_from_checkpoint = ""  # the checkpoint the last load started from ("": a full replay)
        self.replayed_records = 0         # log records the last load replayed (on top of it)
        self.checkpoint_every_bytes: int | None = None  # None: see CHECKPOINT_EVERY_BYTES
        self._checkpoint_at: LogPosition | None = None  # what the newest checkpoint covers, if it matches memory
        self._written_since_checkpoint = 0
        self._checkpoint_pending = False
        self._check_room = check_room
        self._rw = RWLock()
        self._write_order = threading.Lock()  # log order == apply order
        self._written_since_trim = 0
        self._last_write = 0.0
        self._trim_pending = False  # a thread waits for the writes to stop, then trims
        self._packed_at = 0  # vectors the index held when its lists were last packed (see _repack_if_due)
        self.dropped = False
        self.broken = ""  # why requests are refused until the shard reloads the collection (see _apply_failed)
        self._on_broken = on_broken

    @property
    def buckets(self) -> frozenset[int]:
        """Buckets this shard owns (serving or joining)."""
        return frozenset(np.flatnonzero(self._owned).tolist())

    # --- loading --------------------------------------------------------------------------------------------
    def load(self, distrust_checkpoint: str = "") -> int:
        """Loads storage into memory: the newest index checkpoint plus the log records written after it when it
        checks out (see :meth:`_resume`), else every snapshot and the whole log. Returns the live item count.

        Args:
            distrust_checkpoint: why the checkpoint must not be used (the process died during an earlier load,
                maybe reading it): it is kept aside as damage and the storage replayed in full.
        """
        t0 = time.monotonic()
        after = self._resume(distrust_checkpoint)
        replayed_before = self.store.replayed_records
        for batch in self.store.load(set(self.buckets), after=after):
            if batch.op == RESET:
                with self._rw.write():
                    self._remove_buckets(batch.buckets)
                continue
            _, home = buckets_and_labels(batch.ids, self.coll.buckets)
            if batch.op == UPSERT:
                self._apply_upsert(batch.ids, home, batch.vectors, batch.payloads)
            else:
                with self._rw.write():
                    self._apply_delete(batch.ids, home)
        self.replayed_records = self.store.replayed_records - replayed_before
        if after is not None:
            # The checkpoint holds the buckets owned when it was written; the controller may have moved some since.
            held = np.unique(bucket_of_labels(self.table.labels)) if len(self.table) else np.empty(0, np.int64)
            gone = held[~self._owned[held]].tolist()
            if gone:
                with self._rw.write():
                    self._remove_buckets(gone)
        self._refresh_gpu()
        took = time.monotonic() - t0
        if after is not None:
            log.info("%s: loaded checkpoint %s (%d items) + %d records in %.2fs", self.coll.name,
                     self.loaded_from_checkpoint, len(self.table), self.replayed_records, took)
        else:
            log.info("%s: replayed the whole storage (%d log records) in %.2fs", self.coll.name,
                     self.replayed_records, took)
        return len(self.table)

    def adopt_trained(self, coll: CollectionConfig, template) -> bool:
        """Moves this shard's items into the collection's trained index ``template`` (version
        ``coll.trained_version``, read by :func:`shard.trained.read_template`). Returns False if the index already
        has that version.

        From an untrained buffer the vectors come from the buffer (exact originals); from an index trained on an
        older version, from storage (the originals, not its lossy codes). Writes wait meanwhile (the write order is
        held: nothing changes under the encoding); searches go on against the old index until the swap, which
        takes the write lock only for an instant, so there is no gap in searches.
        """
        with self._write_order:
            self._check_live()
            if self.index.trained_version == coll.trained_version:
                return False
            t0 = time.monotonic()
            new = VectorIndex(coll, self.index._gpu, template)
            if not self.index.trained:
                buf = self.index._buffer
                labels = faiss.vector_to_array(buf.id_map)
                for s in range(0, len(labels), _ENCODE_BATCH):
                    new.add(labels[s:s + _ENCODE_BATCH], buf.index.reconstruct_n(s, min(_ENCODE_BATCH, len(labels) - s)))
            else:
                for batch in read_buckets(self.store.path, self.coll.buckets, sorted(self.buckets), _ENCODE_BATCH):
                    _, home = buckets_and_labels(batch.ids, self.coll.buckets)
                    labels = self.table.find(home, batch.ids)
                    keep = labels >= 0  # all of them: storage and memory hold the same items under the write order
                    new.add(labels[keep], batch.vectors[keep])
            mirror = new.build_gpu()
            if mirror is not None:
                new.install_gpu(mirror)
            with self._rw.write():
                old, self.index = self.index, new
                self.coll = coll
            self._checkpoint_soon()  # the next start loads the new version's index, not the old one's
            log.info("%s: %d vectors moved into trained index v%d in %.1fs", coll.name, new.ntotal,
                     coll.trained_version, time.monotonic() - t0)
        del old
        release_memory()
        return True

    def _resume(self, distrust: str = "") -> LogPosition | None:
        """Installs the newest index checkpoint if it may be used and checks out; returns the log position it covers
        (what follows is to be replayed), or None (replay everything).

        A checkpoint written for something else than the collection as it is now (another spec, dimension, metric,
        bucket count, trained version, index layout, or fewer buckets than this shard owns now) is deleted with an
        INFO line. One that does not check out (its JSON unreadable, a file missing, cut short or with another
        CRC-32, a file FAISS or numpy refuses or that does not fit the collection, its log position gone from the
        log) is damage: its files are moved to ``damaged/`` and reported like damaged storage files.
        """
        path = self.store.path
        try:
            found = checkpoint.find(path)
        except CheckpointDamaged as err:
            others = tuple(p for p in path.glob(err.file.name.rsplit(".", 1)[0] + ".*") if p != err.file)
            return self._checkpoint_damaged(err.file, err.reason, err.offset, others)
        if found is None:
            return None
        name, meta = found
        files = checkpoint.files_of(path, name)

        def damaged(err: CheckpointDamaged) -> None:
            return self._checkpoint_damaged(err.file, err.reason, err.offset,
                                            tuple(p for p in files if p != err.file))

        if distrust:
            return damaged(CheckpointDamaged(files[2], distrust))
        try:
            mismatch = self._checkpoint_mismatch(meta)
        except (KeyError, TypeError, ValueError) as err:
            return damaged(CheckpointDamaged(files[2], f"unreadable ({type(err).__name__}: {err})"))
        if mismatch:
            log.info("%s: not using index checkpoint %s: %s; replaying the storage", self.coll.name, name, mismatch)
            checkpoint.discard(path)
            return None
        position = checkpoint.position_of(meta)
        gone = self.store.check_position(position)
        if gone:
            return damaged(CheckpointDamaged(files[2], f"its log position is no longer in the log: {gone}"))
        try:
            checkpoint.verify(path, name, meta)
            index, arrays = checkpoint.read(path, name, self.coll.binary)
            try:
                vindex = VectorIndex.from_state(self.coll, index, {k[len("index_"):]: v for k, v in arrays.items()
                                                                   if k.startswith("index_")},
                                                bool(meta["trained"]), self._gpu)
            except ValueError as err:
                raise CheckpointDamaged(files[0], f"not this collection's index: {err}") from None
            try:
                table = IdTable.from_arrays(arrays)
            except (KeyError, ValueError) as err:
                raise CheckpointDamaged(files[1], f"not an id table: {type(err).__name__}: {err}") from None
            if not len(table) == vindex.ntotal == int(meta["items"]):
                raise CheckpointDamaged(files[1], f"{len(table)} ids for {vindex.ntotal} vectors "
                                                  f"({meta['items']} items when written)")
        except CheckpointDamaged as err:
            return damaged(err)
        self.index, self.table = vindex, table
        self.store.checkpointed(position)  # compaction keeps the log from its position on
        self._checkpoint_at = position
        self.loaded_from_checkpoint = name
        return position

    def _checkpoint_damaged(self, file: pathlib.Path, reason: str, offset: int, others: tuple) -> None:
        self.store.report_damage(file, "checkpoint", offset, f"index checkpoint {reason}; the collection was "
                                 "replayed from the snapshots and the whole log instead", companions=others)
        return None

    def _checkpoint_meta(self) -> dict:
        """What a checkpoint must have been written for, to be used for this collection as it is now."""
        return {"collection": self.coll.name, "spec": self.coll.index, "dim": self.coll.dim,
                "metric": self.coll.metric, "buckets": self.coll.buckets,
                "trained_version": int(getattr(self.coll, "trained_version", 0))}

    def _checkpoint_mismatch(self, meta: dict) -> str:
        """Why a checkpoint (its JSON) was written for something else than the collection as it is now; ""."""
        for key, want in self._checkpoint_meta().items():
            if key != "collection" and meta.get(key) != want:
                return f"it was written for {key} {meta.get(key)!r}, the collection's is {want!r}"
        layout = self.index.layout(bool(meta["trained"]))
        if meta["index_type"] != layout:
            return f"it holds a {meta['index_type']}, this code builds a {layout} (written by another version)"
        owned = np.zeros(self.coll.buckets, dtype=bool)
        owned[[int(b) for b in meta["owned"] if 0 <= int(b) < self.coll.buckets]] = True
        extra = np.flatnonzero(self._owned & ~owned)
        if len(extra):
            return (f"this shard owns {len(extra)} bucket(s) it did not own then (bucket {int(extra[0])} ...), whose "
                    "items only the snapshots and log hold")
        return ""

    # --- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint(self) -> str | None:
        """Writes an index checkpoint (see shard.checkpoint) covering everything logged so far, then deletes the
        older one. The caller holds ``_write_order``: writes wait while it is written (no record may be logged
        that it does not hold), searches go on (it only reads the index and the id table).

        Returns its name; None if none was needed (nothing logged since the newest one), possible (the collection
        is closed, dropped, or broken: memory may not match the log) or written: a failure (a full disk) is
        logged and never fails a write or loses data, the next start loads the previous checkpoint or replays
        the whole storage.

        Cost, measured for 150k x 128 items with 20-byte payloads on one shard (2 cores shared with other work,
        local disk): Flat 0.84 s to write (82 MiB), 0.30 s to
        load vs 1.8 s to replay; HNSW32 0.51 s (121 MiB), 0.43 s to load vs 103 s to replay; IVF256,PQ16 0.15 s
        (14 MiB), 0.10 s to load vs 96 s to replay. Writing is FAISS's write_index, one fsync per file and a
        CRC-32 pass over what was written (from the page cache): about disk bandwidth.
        """
        if self.dropped or self.broken or self.index is None:
            return None
        position = self.store.pin_position()
        if position is None:
            return None
        if position == self._checkpoint_at:
            self.store.checkpointed(position)
            return None
        t0 = time.monotonic()
        try:
            index, extra = self.index.state()
            arrays = {f"index_{k}": v for k, v in extra.items()} | self.table.to_arrays()
            meta = dict(self._checkpoint_meta(), trained=self.index.trained,
                        index_type=type(index).__name__, items=len(self.table),
                        owned=np.flatnonzero(self._owned).tolist())
            name = checkpoint.write(self.store.path, index, self.coll.binary, arrays, meta, position)
        except Exception:  # noqa: BLE001: a checkpoint is an optimisation; the log holds everything
            self.store.unpin()
            log.exception("%s: writing an index checkpoint failed; the next start loads the previous one or replays "
                          "the whole storage", self.coll.name)
            return None
        self.store.checkpointed(position)
        self._checkpoint_at = position
        self._written_since_checkpoint = 0
        log.info("%s: index checkpoint %s written (%d items, %s) in %.2fs", self.coll.name, name, len(self.table),
                 self.coll.index, time.monotonic() - t0)
        return name

    def _checkpoint_when_due(self, nbytes: int) -> None:
        """Called under the write order after each write of ``nbytes`` vector bytes: starts a background
        checkpoint once enough was written since the last one (see CHECKPOINT_EVERY_BYTES)."""
        self._written_since_checkpoint += nbytes
        due = self.checkpoint_every_bytes or max(CHECKPOINT_EVERY_BYTES, self.index.nbytes // 2)
        if self._written_since_checkpoint >= due:
            self._checkpoint_soon()

    def _checkpoint_soon(self) -> None:
        """Starts a background checkpoint unless one is pending (it runs once the caller lets go of the write
        order)."""
        if not self._checkpoint_pending:
            self._checkpoint_pending = True
            threading.Thread(target=self._checkpoint_in_background, name=f"checkpoint-{self.coll.name}",
                             daemon=True).start()

    def _checkpoint_in_background(self) -> None:
        try:
            with self._write_order:
                name = self.checkpoint()
            if name is not None:
                self.store.trim_log()  # the log segments it covers, kept since compaction folded them
        except Exception:  # noqa: BLE001: background work: logged, the next one tries again
            log.exception("%s: background checkpoint failed", self.coll.name)
        finally:
            self._checkpoint_pending = False

    def close(self) -> None:
        """A graceful stop: writes a checkpoint (so that the next start loads it), then closes the storage."""
        with self._write_order:
            self.checkpoint()
            self.store.close()

    def _refresh_gpu(self) -> None:
        """On a GPU shard, (re)builds the index's GPU mirror when it has none (loaded, just trained) or too many
        tombstones. The caller holds ``_write_order`` (or is loading): the CPU index cannot change meanwhile, and
        searches go on, on the old mirror when the GPU has room for both, else on the CPU index."""
        index = self.index
        if index is None or not index.gpu_needs_build:
            return
        if index.on_gpu:
            try:
                self._check_room(0, index.gpu_bytes_of())
            except ResourceExhausted:
                with self._rw.write():
                    old = index.install_gpu(None)  # make room: the CPU index answers during the build
                del old
        mirror = index.build_gpu()
        if mirror is not None:
            with self._rw.write():
                old = index.install_gpu(mirror)
            del old  # freed after the lock

    # --- writes ---------------------------------------------------------------------------------------------
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
            self.store.append(UPSERT, ids, x, payloads)
            try:
                self._apply_upsert(ids, home, x, payloads)
            except Exception as err:  # noqa: BLE001: see _apply_failed
                self._apply_failed("upsert", err)
            self._note_joining(ids, buckets)
            self._after_write(x.nbytes)
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

    def _after_write(self, nbytes: int, trim: bool = True) -> None:
        """Called under the write order after each applied write."""
        self._refresh_gpu()
        self._written_since_trim += nbytes
        self._last_write = time.monotonic()
        self._checkpoint_when_due(nbytes)
        if trim and self._written_since_trim > _TRIM_EVERY_BYTES:
            self._written_since_trim = 0
            release_memory()  # request buffers and old id-table arrays leave freed pages behind
        if trim and not self._trim_pending:
            # What the last writes of a burst freed (up to _TRIM_EVERY_BYTES of request buffers: a quarter of a
            # 250k x 128 shard's vectors) is handed back once the writes stop, and grown IVF lists are packed.
            self._trim_pending = True
            threading.Thread(target=self._trim_when_idle, name=f"trim-{self.coll.name}", daemon=True).start()

    def _trim_when_idle(self) -> None:
        """Waits until no write has come for _TRIM_IDLE_S, then releases freed memory once; IVF lists grown since
        they were last packed are packed once no write has come for _REPACK_IDLE_S (a bulk load pauses for shorter
        than that, and every pack copies the whole index). Not while buckets are copied in: a move must not stall
        searches, and a trim holds the allocator's locks (copy_in never trims)."""
        wait = _TRIM_IDLE_S
        while True:
            time.sleep(max(0.05, wait))
            with self._write_order:
                if self.dropped:
                    self._trim_pending = False
                    return
                idle = time.monotonic() - self._last_write
                if self.joining or idle < _TRIM_IDLE_S:
                    wait = _TRIM_IDLE_S if self.joining else _TRIM_IDLE_S - idle
                    continue
                pack_later = self._repack_due() and idle < _REPACK_IDLE_S
                packed = False if pack_later else self._repack_if_due()
                release = bool(self._written_since_trim) or packed  # what was trimmed on the way stays trimmed
                self._written_since_trim = 0
                if not pack_later:
                    self._trim_pending = False
            if release:
                release_memory()
            if not pack_later:
                return
            wait = _REPACK_IDLE_S - idle

    def _repack_due(self) -> bool:
        """Whether the IVF lists grew enough since they were last packed to be packed again (see
        :meth:`_repack_if_due`)."""
        n = self.index.ntotal
        return self.index.repackable and n >= _REPACK_MIN and n >= (1 + _REPACK_GROWTH) * self._packed_at

    def _repack_if_due(self) -> bool:
        """IVF lists grow by doubling as items arrive, and the buffers they outgrow stay behind in the heap between
        longer-lived allocations: 50-150 bytes a vector on a shard (bench/memory_bench.py), more than a PQ16 code
        and its id. Once the writes stop, an index that grew by _REPACK_GROWTH since it was last packed is copied into
        lists of exactly their size (VectorIndex.repacked) and swapped in; the old one is freed. Measured on a shard
        (bench/memory_bench.py, 300k x 128, batches of 10k): IVF1024,Flat 710 -> 597 bytes a vector resident
        (FAISS: 522), IVF1024,PQ16 packed to 38 a vector beside its fixed tables (FAISS: 26). The copy needs the
        index's bytes once more for a moment: it is skipped when that would pass the shard's capacity or the
        machine's available memory. The caller holds the write order (writes wait, searches go on against the old
        index until the swap)."""
        index = self.index
        n = index.ntotal
        if not self._repack_due():
            return False
        try:
            self._check_room(index.nbytes)  # the copy, for a moment
        except ResourceExhausted:
            return False
        if psutil.virtual_memory().available < 2 * index.nbytes:
            return False
        t0 = time.monotonic()
        new = index.repacked()
        with self._rw.write():
            old = index.install_repacked(new)
        self._packed_at = n
        del old
        log.info("%s: IVF lists packed to their size (%d vectors) in %.2fs", self.coll.name, n, time.monotonic() - t0)
        return True

    def _apply_upsert(self, ids, home, x, payloads) -> None:
        """Applies an upsert (caller holds the write order, not the lock). The new id table is built first, while
        searches go on; the write lock covers only the index update and the swap."""
        labels, existing = self.table.assign(home, ids)
        table = self.table.with_put(labels, ids, payloads, existing)
        with self._rw.write():
            if existing.any():
                self.index.remove(labels[existing])
            self.index.add(labels, x)
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
            self._refresh_gpu()
        return removed, len(ids) - removed

    def _apply_delete(self, ids, home) -> int:
        labels = self.table.find(home, ids)
        labels = labels[labels >= 0]
        self.index.remove(labels)
        self.table.remove(np.sort(labels))
        return len(labels)

    def _labels_of(self, buckets) -> np.ndarray:
        if not len(self.table) or not len(buckets):
            return np.empty(0, dtype=np.int64)
        return self.table.labels[np.isin(bucket_of_labels(self.table.labels), np.asarray(list(buckets)))]

    def _remove_buckets(self, buckets) -> int:
        """Removes every item of some buckets from memory (caller holds the write lock)."""
        labels = self._labels_of(buckets)
        if len(labels):
            self.index.remove(labels)
            self.table.remove(labels)
        return len(labels)

    # --- bucket moves ---------------------------------------------------------------------------------------
    def join(self, buckets) -> None:
        """Takes buckets on, empty: from now on their writes are accepted here (and logged, after a RESET that
        forgets anything this shard stored for them before). Their previous owner's data comes with copy_in."""
        buckets = sorted(int(b) for b in buckets)
        with self._write_order:
            self._check_live()
            self.store.reset(buckets)
            with self._rw.write():
                self._remove_buckets(buckets)
                self._owned[buckets] = True
                for b in buckets:
                    self.joining[b] = set()
            self._refresh_gpu()

    def fence(self, epoch: int) -> None:
        """Refuses writes routed with a map older than ``epoch`` (searches go on). Once this returns, every write
        accepted with an older map is in the log (the fence waits for writes in progress)."""
        with self._write_order:
            self.min_write_epoch = max(self.min_write_epoch, int(epoch))

    def copy_in(self, buckets, source: str | pathlib.Path, nice: int = COPY_NICE, rate_bytes_s: float = 0) -> int:
        """Loads joining buckets from their previous owner's store (its directory for this collection), skipping
        ids written here since the join (they are newer). Returns the items copied.

        The copy runs in a thread of its own at OS priority ``nice`` (Linux schedules threads separately), in
        small batches: it takes the CPU that searches leave idle, and holds the write lock only briefly.
        ``rate_bytes_s`` (> 0) caps the vector bytes copied per second.

        Raises:
            FailedPrecondition: a bucket is not joining here (this shard restarted, or the move was rolled back).
        """
        result: dict = {}

        def run():
            try:
                if nice:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
                result["copied"] = self._copy_in(buckets, source, rate_bytes_s)
            except BaseException as err:  # re-raised in the caller's thread
                result["error"] = err

        t = threading.Thread(target=run, name=f"copy-{self.coll.name}", daemon=True)
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["copied"]

    def _copy_in(self, buckets, source, rate_bytes_s: float = 0) -> int:
        wanted = sorted(int(b) for b in buckets)
        copied = copied_bytes = 0
        t0 = time.monotonic()
        for batch in read_buckets(source, self.coll.buckets, wanted, batch_items=_COPY_BATCH):
            with self._write_order:
                self._check_live()
                if any(b not in self.joining for b in wanted):
                    raise FailedPrecondition(f"buckets {wanted} of {self.coll.name!r} are not being joined here")
                touched = set().union(*(self.joining[b] for b in wanted))
                keep = [i for i, uid in enumerate(batch.ids) if uid not in touched]
                if not keep:
                    continue
                ids = [batch.ids[i] for i in keep]
                x, payloads = batch.vectors[keep], [batch.payloads[i] for i in keep]
                self._check_room(self._bytes_for(x, ids, payloads), self.index.gpu_bytes_for(len(x)))
                self.store.append(UPSERT, ids, x, payloads)
                _, home = buckets_and_labels(ids, self.coll.buckets)
                self._apply_upsert(ids, home, x, payloads)
                # No malloc_trim while copying: it holds the allocator's locks, stalling the threads that search.
                self._after_write(x.nbytes, trim=False)
            copied += len(ids)
            copied_bytes += x.nbytes
            if rate_bytes_s > 0:
                time.sleep(max(0.0, t0 + copied_bytes / rate_bytes_s - time.monotonic()))
        return copied

    def finish_join(self, buckets) -> None:
        """The copy is complete: the buckets are like any other owned bucket from now on."""
        with self._write_order:
            missing = [int(b) for b in buckets if int(b) not in self.joining]
            if missing:
                raise FailedPrecondition(f"buckets {missing} of {self.coll.name!r} are not being joined here")
            for b in buckets:
                del self.joining[int(b)]

    def drop_buckets(self, buckets, epoch: int) -> int:
        """Gives buckets away: logs a RESET, forgets their items and refuses requests routed with a map older
        than ``epoch``. Returns the items dropped. Buckets not owned here are ignored."""
        buckets = sorted(int(b) for b in buckets)
        with self._write_order:
            self._check_live()
            self.store.reset(buckets)
            labels = self._labels_of(buckets)  # no write can change them: we hold the write order
            # Build the index and id table without them while searches go on, when there is room for the copy
            # (and its GPU mirror, on a GPU shard); the write lock then only swaps them in.
            main = table = mirror = None
            if len(labels):
                try:
                    self._check_room(self.index.nbytes)
                    main = self.index.without(labels)
                except ResourceExhausted:
                    main = None
                if main is not None and self.index.on_gpu:
                    try:
                        self._check_room(0, self.index.gpu_bytes_of(main))
                        mirror = self.index.build_gpu(main)
                    except ResourceExhausted:
                        mirror = None  # rebuilt after the swap, once the old mirror is gone
                table = self.table.without(labels)
            with self._rw.write():
                self.min_epoch = max(self.min_epoch, int(epoch))
                if main is not None:
                    main = self.index.install(main, labels, mirror)  # the old ones are freed below, after the lock
                elif len(labels):
                    self.index.remove(labels)
                if table is not None:
                    table, self.table = self.table, table
                n = len(labels)
                self._owned[buckets] = False
                for b in buckets:
                    self.joining.pop(b, None)
            del main, table, mirror
            self._refresh_gpu()
        if n or any(_snapshot_path(self.store.path, b).exists() for b in buckets):
            self.store.compact_soon()  # folds the RESET in: their snapshots are deleted, not kept forever
        return n

    def bucket_counts(self) -> np.ndarray:
        """Items per bucket, shape (buckets,) int64."""
        with self._rw.read():
            return np.bincount(bucket_of_labels(self.table.labels), minlength=self.coll.buckets)

    # --- reads ----------------------------------------------------------------------------------------------
    def get(self, ids: list[str], include_vectors: bool, epoch: int = 0):
        """(found ids, vectors or None, payloads) for the ids stored here, in request order.

        Vectors are the ones upserted (normalized for cosine), exact whatever the index: from the index where it
        holds them exactly, else from storage (see :meth:`_stored_vectors`)."""
        _, home = buckets_and_labels(ids, self.coll.buckets)
        with self._vector_source(include_vectors), self._rw.read():
            self._check_live()
            self._check_epoch(epoch)
            labels = self.table.find(home, ids)
            hit = np.flatnonzero(labels >= 0)
            pos = self.table.positions(labels[hit])
            found = [ids[i] for i in hit]
            payloads = list(self.table.payloads[pos])
            vectors = self._vectors(labels[hit], found) if include_vectors else None
        return found, vectors, payloads

    def _vector_source(self, include_vectors: bool):
        """What a read of vectors holds: the write order where they come from storage, so that storage holds
        exactly what memory does (no write is between its log append and its apply); nothing otherwise. (An
        index is only ever trained from exact to approximate, under the write order: a read that saw it exact
        and finds it trained reads storage without the order, at worst seeing a write that is being applied.)"""
        if include_vectors and not self.index.exact_vectors:
            return self._write_order
        return contextlib.nullcontext()

    def _vectors(self, labels: np.ndarray, uids: list[str]) -> np.ndarray:
        """Vectors of items held here (labels and their ids, in the same order): shape (n, d) float32, or
        (n, d/8) uint8 for hamming."""
        if self.index.exact_vectors:
            return self.index.reconstruct(labels)
        return self._stored_vectors(labels, uids)

    def _stored_vectors(self, labels: np.ndarray, uids: list[str]) -> np.ndarray:
        """The original vectors of items held here, read from this shard's storage: the snapshots of their buckets
        and the whole log (read_buckets), so a Get of a few ids costs a read of their buckets (docs/BENCHMARKS.md,
        "Shard memory per vector"). Normalized for cosine, as the index holds them and as Get returned them when
        they were reconstructed from the index.

        Raises:
            Unavailable: storage lacks some of them (a file damaged since the collection loaded).
        """
        binary = self.coll.binary
        uniq = list(dict.fromkeys(uids))
        row_of = {u: i for i, u in enumerate(uniq)}
        out = np.empty((len(uniq), self.coll.dim // 8 if binary else self.coll.dim),
                       dtype=np.uint8 if binary else np.float32)
        filled = np.zeros(len(uniq), dtype=bool)
        buckets = np.unique(bucket_of_labels(labels)).tolist() if len(labels) else []
        for batch in read_buckets(self.store.path, self.coll.buckets, buckets):
            rows = np.fromiter((row_of.get(u, -1) for u in batch.ids), dtype=np.int64, count=len(batch.ids))
            ok = rows >= 0
            out[rows[ok]] = batch.vectors[ok]
            filled[rows[ok]] = True
        if not filled.all():
            raise Unavailable(f"the vectors of {int((~filled).sum())} item(s) of {self.coll.name!r} could not be "
                              "read from the shard's storage (a damaged file: see the shard's stats)")
        if self.coll.metric == "cosine":
            faiss.normalize_L2(out)
        return out if len(uniq) == len(uids) else out[[row_of[u] for u in uids]]

    def search(self, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0, include_payloads: bool = False,
               epoch: int = 0, coarse=None):
        """Top-k over every item this shard holds (all its buckets, joining ones included: what they hold is
        current, the router just does not count them as answered).

        Returns:
            (D, L, ids, payloads): D shape (nq, k) float32; L shape (nq, k) int64 labels (-1: none);
            ids, a flat list of nq*k strings ("" for none); payloads, flat list (None where empty) or None.
        """
        with self._rw.read():
            self._check_live()
            self._check_epoch(epoch)
            if coarse is not None:  # (version, nprobe, lists, distances): the IVF lists the router chose
                coarse = self.index.check_coarse(coarse[0], len(xq), coarse[1], coarse[2], coarse[3])
            D, L = self.index.search(xq, k, nprobe, ef_search, coarse)
            valid = L.ravel() >= 0
            if not len(self.table) or not valid.any():
                return D, L, [""] * L.size, [None] * L.size if include_payloads else None
            # Ids of the results only: k past the collection's size leaves most slots empty (-1).
            full = bool(valid.all())
            pos = np.minimum(self.table.positions(L.ravel() if full else L.ravel()[valid]), len(self.table) - 1)
            ids = self.table.uids_at(pos)
            payloads = self.table.payloads[pos].tolist() if include_payloads else None
            if not full:
                ids = _spread(ids, valid, "")
                payloads = _spread(payloads, valid, None) if include_payloads else None
        return D, L, ids, payloads

    def coarse_quantizer(self) -> tuple[int, np.ndarray] | None:
        """(trained version, coarse centroids) for a router that chooses the IVF lists to probe once per query
        (see VectorIndex.coarse_quantizer); None when it may not."""
        with self._rw.read():
            self._check_live()
            return self.index.coarse_quantizer()

    # --- catalog jobs ---------------------------------------------------------------------------------------
    def scan(self, buckets, include_vectors: bool = False, include_payloads: bool = False, epoch: int = 0):
        """The items of some held buckets: (ids, vectors (n, d) or None, payloads or None), in label order."""
        buckets = np.asarray(sorted({int(b) for b in buckets}), dtype=np.int64)
        if len(buckets) and (buckets.min() < 0 or buckets.max() >= self.coll.buckets):
            raise InvalidArgument(f"bucket numbers of {self.coll.name!r} run from 0 to {self.coll.buckets - 1}")
        with self._vector_source(include_vectors), self._rw.read():
            self._check_live()
            self._check_epoch(epoch)
            self._check_owned(buckets)
            labels = self._labels_of(buckets.tolist())
            pos = self.table.positions(labels)
            ids = self.table.uids_at(pos) if len(pos) else []
            vectors = self._vectors(labels, ids) if include_vectors else None
            payloads = list(self.table.payloads[pos]) if include_payloads else None
        return ids, vectors, payloads

    def assign_clusters(self, centroids: np.ndarray, field: str, buckets, count_buckets=(), epoch: int = 0,
                        group: int = 32) -> tuple[np.ndarray, int]:
        """Stores the nearest centroid (its number, as a string) of each item of ``buckets`` in payload field
        ``field``.

        The vectors come from storage (the originals: an IVF-PQ index only holds approximations), a group of
        buckets at a time under the write order, so a write that lands meanwhile is either before (and labelled)
        or after (and keeps its own payload). Only payloads change in memory; the log records the items as
        upserts of the same vectors, so a replay or a bucket move carries the labels.

        Returns:
            (items per centroid among ``count_buckets``, items labelled).
        """
        from jobs import cluster_space, set_payload_field

        quantizer = faiss.IndexFlatL2(centroids.shape[1])
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        counted = np.zeros(self.coll.buckets, dtype=bool)
        counted[[int(b) for b in count_buckets]] = True
        sizes = np.zeros(len(centroids), dtype=np.int64)
        labelled = 0
        held = sorted({int(b) for b in buckets})
        if held and (held[0] < 0 or held[-1] >= self.coll.buckets):
            raise InvalidArgument(f"bucket numbers of {self.coll.name!r} run from 0 to {self.coll.buckets - 1}")
        for start in range(0, len(held), group):
            with self._write_order:
                self._check_live()
                self._check_epoch(epoch, write=True)
                chunk = held[start:start + group]
                self._check_owned(np.asarray(chunk, dtype=np.int64))
                for batch in read_buckets(self.store.path, self.coll.buckets, chunk):
                    ids, x = batch.ids, batch.vectors
                    _, assign = quantizer.search(cluster_space(x, self.coll.metric), 1)
                    assign = assign[:, 0]
                    payloads = [set_payload_field(p, field, str(a)) for p, a in zip(batch.payloads, assign.tolist())]
                    buckets, home = buckets_and_labels(ids, self.coll.buckets)
                    self.store.append(UPSERT, ids, x, payloads)
                    labels = self.table.find(home, ids)
                    ok = labels >= 0  # all of them: memory and storage hold the same items under the write order
                    with self._rw.write():
                        # the vectors are those already indexed: only the payloads change
                        pay = np.empty(int(ok.sum()), dtype=object)
                        pay[:] = [p for p, o in zip(payloads, ok.tolist()) if o]
                        self.table.payloads[self.table.positions(labels[ok])] = pay
                    self._note_joining(ids, buckets)
                    sizes += np.bincount(assign[counted[buckets]], minlength=len(centroids))
                    labelled += len(ids)
        return sizes, labelled

    def stats(self) -> dict:
        counts = self.bucket_counts().astype("<u4")
        damaged = self.store.damaged()  # files of its storage found damaged and kept aside (shard.proto)
        with self._rw.read():
            return {"name": self.coll.name, "buckets": int(self._owned.sum()), "vectors": self.index.ntotal,
                    "index_bytes": self.index.nbytes, "trained": self.index.trained,
                    "trained_version": self.index.trained_version,
                    "bucket_counts": counts.tobytes(), "joining": len(self.joining), "damaged": damaged,
                    "loaded_from_checkpoint": bool(self.loaded_from_checkpoint),
                    "replayed_records": self.replayed_records}


class ReplayGuard:
    """Keeps a collection whose replay kills the process (a FAISS abort, a segfault, memory) from taking its shard
    down again and again, and with it every other collection of the shard.

    Before a replay, ``<collection dir>/REPLAYING`` is written with the number of replays started; a finished
    replay removes it. Finding it at the next start means the process died during the replay. After
    ``max_attempts`` such deaths in a row the collection is quarantined: ``QUARANTINED`` (a JSON note: why and
    when) is written and the collection is not loaded again until an operator drops it or removes the note.
    """

    REPLAYING = "REPLAYING"
    QUARANTINED = "QUARANTINED"

    def __init__(self, path: pathlib.Path, max_attempts: int = 2):
        self.path = pathlib.Path(path)
        self.max_attempts = max_attempts
        self._attempts = 0

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as present

    def _write(self, name: str, note: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(note) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)

    def quarantine_reason(self) -> str | None:
        """Why the collection must not be loaded (a note of an earlier quarantine, or too many replays that did not
        finish), or None."""
        note = self._read(self.QUARANTINED)
        if note is not None:
            return f"{note.get('reason', 'quarantined')} (since {note.get('since', '?')}; {self._how_to()})"
        replaying = self._read(self.REPLAYING)
        self._attempts = int((replaying or {}).get("attempts", 1 if replaying is not None else 0))
        if self._attempts >= self.max_attempts:
            return self.quarantine(f"the shard process died {self._attempts} times in a row while replaying it "
                                   "(a crash in FAISS, or memory)")
        return None

    def quarantine(self, reason: str) -> str:
        """Records the quarantine; returns the sentence that reports it."""
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._write(self.QUARANTINED, {"reason": reason, "since": since})
        (self.path / self.REPLAYING).unlink(missing_ok=True)
        return f"{reason} (since {since}; {self._how_to()})"

    def _how_to(self) -> str:
        return (f"drop the collection, or remove {self.path / self.QUARANTINED} and restart the shard to try "
                "again")

    @property
    def died(self) -> int:
        """Loads of the collection that the process died in, in a row (known after :meth:`quarantine_reason`)."""
        return self._attempts

    def start(self) -> None:
        self._write(self.REPLAYING, {"attempts": self._attempts + 1})

    def done(self) -> None:
        (self.path / self.REPLAYING).unlink(missing_ok=True)
        _fsync_dir(self.path)


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
        # What the shard reports as its capacity (and the controller grows against).
        self.capacity_bytes = self.gpu_capacity_bytes if gpu is not None else int(capacity_bytes)
        self._collections: dict[str, ShardCollection] = {}
        self.quarantined: dict[str, str] = {}  # collection -> why it is not loaded (see open_collection)
        self._reloading: set[str] = set()
        self.template_problems: dict[str, str] = {}  # collection -> why its trained index could not be used
        self._lock = threading.Lock()
        self.serving = False

    def memory_bytes(self) -> int:
        """Resident memory of this process."""
        return psutil.Process().memory_info().rss

    def gpu_memory_bytes(self) -> int:
        """GPU memory in use: what the device reports (a whole GPU), else the bytes of this shard's mirrors."""
        used = self.gpu.used_bytes() if self.gpu is not None else None
        if used is not None:
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
        its other collections.
        """
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
        guard.start()  # a process killed during the replay leaves this behind for the next start to count
        store = None
        try:
            coll, template = self._template(coll)
            store = CollectionStore(self.root / coll.name, coll.buckets, segment_bytes=self.segment_bytes)
            sc = ShardCollection(coll, buckets, store, self.check_room, epoch, gpu=self.gpu, on_broken=self._reload,
                                 template=template)
            # A load that killed the process may have been reading the checkpoint (FAISS aborts on some files).
            n = sc.load(f"not used: the shard process died during the last {guard.died} load(s) of the collection, "
                        "kept aside in case reading it was the cause" if guard.died else "")
        except Exception as err:  # noqa: BLE001: any failure of one collection's replay stays with it
            log.exception("%s: replaying collection %s failed", self.shard_id, coll.name)
            if store is not None:
                store.close()
            return self._quarantine(coll.name, guard.quarantine(f"its replay failed: {type(err).__name__}: {err}"))
        guard.done()
        release_memory()
        with self._lock:
            if coll.name in self._collections:  # opened concurrently: keep that one
                store.close()
                return len(self._collections[coll.name].table)
            self._collections[coll.name] = sc
        log.info("%s: collection %s loaded, %d items in %d buckets", self.shard_id, coll.name, n, len(sc.buckets))
        return n

    def _template(self, coll: CollectionConfig):
        """(coll, the collection's trained index to start from, or None). A trained index that cannot be read is
        reported (stats' damaged list); the collection then loads its index checkpoint of that version if it has
        one (it holds the trained index too), else serves exactly from its untrained buffer until the controller
        hands it a good version (:meth:`use_trained`, after ``lookalike train``)."""
        if not coll.trained_version or not training_points(coll.index)[0]:
            self.template_problems.pop(coll.name, None)
            return coll, None
        try:
            template = read_template(self.storage_root, coll, coll.trained_version)
        except TemplateDamaged as err:
            self.template_problems[coll.name] = f"{err}: searching exactly until it is trained again"
            log.error("%s: %s", self.shard_id, self.template_problems[coll.name])
            return coll, None
        self.template_problems.pop(coll.name, None)
        return coll, template

    def train_collection(self, coll: CollectionConfig, version: int, sources: list[tuple[str, list[int]]],
                         sample: int) -> dict:
        """Trains the collection's index once for every shard: reads about ``sample`` vectors of the buckets in
        ``sources`` ((shard id, buckets) whose store holds them, in the order to read them: the controller draws
        buckets at random, and an id's bucket is a hash of it, so this is a uniform sample of the items) from
        storage, trains the spec's quantizer and codebooks on them (the coarse k-means on this shard's GPU, when it
        has one), and writes the empty trained index as ``version`` (:func:`shard.trained.write_template`).
        Returns its note (version, vectors trained on, seconds, ...).

        Raises:
            FailedPrecondition: the buckets hold fewer vectors than the spec needs; or FAISS refused the data.
        """
        t0 = time.monotonic()
        needed = training_points(coll.index)[0]
        parts, got = [], 0
        for sid, buckets in sources:
            if got >= sample:
                break
            for batch in read_buckets(self.store_path(sid, coll.name), coll.buckets, buckets, _ENCODE_BATCH):
                parts.append(batch.vectors[: sample - got])
                got += len(parts[-1])
                if got >= sample:
                    break
        if got < needed:
            raise FailedPrecondition(f"training {coll.name!r} ({coll.index}) needs {needed} vectors; the buckets "
                                     f"read hold {got}")
        x = np.concatenate(parts)
        index = VectorIndex(dataclasses.replace(coll, trained_version=0), gpu=None)
        try:
            template = index.train_template(x, self.gpu)
        except Exception as err:  # noqa: BLE001: FAISS refusing the training data fails the training only
            raise FailedPrecondition(f"training {coll.name!r} ({coll.index}) on {len(x)} vectors failed: "
                                     f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")
        seconds = time.monotonic() - t0
        note = write_template(self.storage_root, coll, version, template, len(x), seconds)
        remove_templates(self.storage_root, coll.name, keep=(coll.trained_version, version))  # current and new
        log.info("%s: trained %s (%s) v%d on %d vectors in %.1fs", self.shard_id, coll.name, coll.index, version,
                 len(x), seconds)
        return note

    def use_trained(self, coll: CollectionConfig) -> bool:
        """Moves the collection's items on this shard into trained index ``coll.trained_version`` (see
        :meth:`ShardCollection.adopt_trained`). Returns False if it was already there; raises NotFound if the
        collection is not open here, FailedPrecondition if the trained index cannot be read."""
        sc = self.collection(coll.name)
        if sc.index.trained_version == coll.trained_version:
            return False
        try:
            template = read_template(self.storage_root, coll, coll.trained_version)
        except TemplateDamaged as err:
            self.template_problems[coll.name] = f"{err}: searching exactly until it is trained again"
            raise FailedPrecondition(str(err)) from None
        self.template_problems.pop(coll.name, None)
        return sc.adopt_trained(coll, template)

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
        with self._lock:
            sc = self._collections.pop(name, None)
            self.quarantined.pop(name, None)
        if sc is not None:
            with sc._write_order:
                sc.dropped = True
                sc.store.destroy()
            with sc._rw.write():  # searches in flight finish first
                sc.index = None
                sc.table = None
            release_memory()
        else:
            shutil.rmtree(self.root / name, ignore_errors=True)
        self.template_problems.pop(name, None)
        remove_templates(self.storage_root, name)

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

    def stats_collections(self) -> list[dict]:
        out = [sc.stats() for sc in list(self._collections.values())]
        for st in out:
            if st["name"] in self.template_problems:
                st["damaged"] = [*st["damaged"], self.template_problems[st["name"]]]
        for name, reason in list(self.quarantined.items()):
            out.append({"name": name, "damaged": [f"QUARANTINED: {reason}"]})
        return out

    def stats(self) -> dict:
        return {"shard_id": self.shard_id, "serving": self.serving, "memory_bytes": self.used_bytes(),
                "capacity_bytes": self.capacity_bytes, "collections": self.stats_collections()}

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
        for sc in list(self._collections.values()):
            sc.close()

