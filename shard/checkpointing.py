"""Index checkpoints of a collection on a shard: loading it from its newest checkpoint plus the log written after
(else from its whole storage) (:class:`Loader`), and writing checkpoints, on a graceful close and in the background
as writes come (:class:`Checkpointer`). The file format is shard.checkpoint's.

Works on a :class:`shard.collection.ShardCollection`'s state under its locks; uses shard.checkpoint, shard.cpu_index,
shard.idtable, the storage modules and the base package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import threading
import time

import numpy as np

from lookalike.ids import bucket_of_labels, buckets_and_labels
from shard import checkpoint
from shard.checkpoint import CheckpointDamaged
from shard.idtable import IdTable
from shard.cpu_index import VectorIndex
from shard.list_groups import CHECKPOINT_TURN
from shard.manifest import LogPosition
from shard.osutil import release_memory
from shard.records import RESET, UPSERT

log = logging.getLogger(__name__)

# A checkpoint is written (in the background) once this many vector bytes were written since the last one, or half
# the index's bytes when that is more: compaction keeps the log segments the newest checkpoint does not cover, so
# this bounds both the log a restart replays and the disk it keeps, while a large index is not rewritten for every
# segment of writes.
CHECKPOINT_EVERY_BYTES = 64 << 20


class Loader:
    """Loads a collection from its storage into memory.

    Args:
        sc: the :class:`shard.collection.ShardCollection` to load.
    """

    def __init__(self, sc):
        self.sc = sc

    def load(self, distrust_checkpoint: str = "") -> int:
        """Loads storage into memory: the newest index checkpoint plus the log records written after it when it
        checks out (see :meth:`_resume`), else every snapshot and the whole log. Returns the live item count.

        Args:
            distrust_checkpoint: why the checkpoint must not be used (the process died during an earlier load,
                maybe reading it): it is kept aside as damage and the storage replayed in full.
        """
        sc = self.sc
        t0 = time.monotonic()
        after = self._resume(distrust_checkpoint)
        replayed_before = sc.store.replayed_records
        for batch in sc.store.load(set(sc.buckets), after=after):
            if batch.op == RESET:
                with sc._rw.write():
                    sc._remove_buckets(batch.buckets)
                continue
            _, home = buckets_and_labels(batch.ids, sc.coll.buckets)
            if batch.op == UPSERT:
                sc._apply_upsert(batch.ids, home, batch.vectors, batch.payloads)
            else:
                with sc._rw.write():
                    sc._apply_delete(batch.ids, home)
        sc.replayed_records = sc.store.replayed_records - replayed_before
        if after is not None:
            # The checkpoint holds the buckets owned when it was written; the controller may have moved some since.
            held = np.unique(bucket_of_labels(sc.table.labels)) if len(sc.table) else np.empty(0, np.int64)
            gone = held[~sc._owned[held]].tolist()
            if gone:
                with sc._rw.write():
                    sc._remove_buckets(gone)
        sc.upkeep.refresh_gpu()
        sc.upkeep.share_lists()  # its process's shards' IVF lists, shared (shard.list_groups)
        took = time.monotonic() - t0
        if after is not None:
            log.info("%s: loaded checkpoint %s (%d items) + %d records in %.2fs", sc.coll.name,
                     sc.loaded_from_checkpoint, len(sc.table), sc.replayed_records, took)
        else:
            log.info("%s: replayed the whole storage (%d log records) in %.2fs", sc.coll.name,
                     sc.replayed_records, took)
        return len(sc.table)

    def _resume(self, distrust: str = "") -> LogPosition | None:
        """Installs the newest index checkpoint if it may be used and checks out; returns the log position it covers
        (what follows is to be replayed), or None (replay everything).

        A checkpoint written for something else than the collection as it is now (another spec, dimension, metric,
        bucket count, a later trained version, index layout, or fewer buckets than this shard owns now) is deleted
        with an INFO line. One of an older trained version (the collection was trained again, or for the first
        time, and the shard stopped before it moved into that version) is loaded as that version: the shard
        answers from it at once and moves into the collection's version after (shard.shard ``open_collection``),
        as a running shard does, instead of replaying its whole storage into the new version first. One that does
        not check out (its JSON unreadable, a file missing, cut short or with another CRC-32, a file FAISS or numpy
        refuses or that does not fit the collection, its log position gone from the log) is damage: its files are
        moved to ``damaged/`` and reported like damaged storage files.
        """
        sc = self.sc
        path = sc.store.path
        try:
            found = checkpoint.find(path)
        except CheckpointDamaged as err:
            others = tuple(p for p in path.glob(err.file.name.rsplit(".", 1)[0] + ".*") if p != err.file)
            return self._damaged(err.file, err.reason, err.offset, others)
        if found is None:
            return None
        name, meta = found
        files = checkpoint.files_of(path, name)

        def damaged(err: CheckpointDamaged) -> None:
            return self._damaged(err.file, err.reason, err.offset, tuple(p for p in files if p != err.file))

        if distrust:
            return damaged(CheckpointDamaged(files[2], distrust))
        try:
            mismatch = self._mismatch(meta)
        except (KeyError, TypeError, ValueError) as err:
            return damaged(CheckpointDamaged(files[2], f"unreadable ({type(err).__name__}: {err})"))
        if mismatch:
            log.info("%s: not using index checkpoint %s: %s; replaying the storage", sc.coll.name, name, mismatch)
            checkpoint.discard(path)
            return None
        position = checkpoint.position_of(meta)
        gone = sc.store.check_position(position)
        if gone:
            return damaged(CheckpointDamaged(files[2], f"its log position is no longer in the log: {gone}"))
        coll = dataclasses.replace(sc.coll, trained_version=int(meta["trained_version"]))  # maybe an older one
        try:
            checkpoint.verify(path, name, meta)
            index, arrays = checkpoint.read(path, name, sc.coll.binary)
            try:
                vindex = VectorIndex.from_state(coll, index, {k[len("index_"):]: v for k, v in arrays.items()
                                                              if k.startswith("index_")},
                                                bool(meta["trained"]), sc._gpu)
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
        sc.index, sc.table, sc.coll = vindex, table, coll
        sc.payloads.rebuild(*table.payload_items())  # derived from the table's payloads (shard.payload_index)
        sc.store.checkpointed(position)  # compaction keeps the log from its position on
        sc._checkpoint_at = position
        sc.loaded_from_checkpoint = name
        return position

    def _damaged(self, file: pathlib.Path, reason: str, offset: int, others: tuple) -> None:
        sc = self.sc
        sc.store.report_damage(file, "checkpoint", offset, f"index checkpoint {reason}; the collection was "
                               "replayed from the snapshots and the whole log instead", companions=others)
        return None

    def _mismatch(self, meta: dict) -> str:
        """Why a checkpoint (its JSON) was written for something else than the collection as it is now; "". One of
        an older trained version (or of the untrained buffer) is used (see :meth:`_resume`)."""
        sc = self.sc
        for key, want in sc.checkpointer.meta().items():
            if key == "trained_version" and 0 <= int(meta.get(key, -1)) < want:
                continue
            if key != "collection" and meta.get(key) != want:
                return f"it was written for {key} {meta.get(key)!r}, the collection's is {want!r}"
        layout = sc.index.layout(bool(meta["trained"]))
        if meta["index_type"] != layout:
            return f"it holds a {meta['index_type']}, this code builds a {layout} (written by another version)"
        owned = np.zeros(sc.coll.buckets, dtype=bool)
        owned[[int(b) for b in meta["owned"] if 0 <= int(b) < sc.coll.buckets]] = True
        extra = np.flatnonzero(sc._owned & ~owned)
        if len(extra):
            return (f"this shard owns {len(extra)} bucket(s) it did not own then (bucket {int(extra[0])} ...), whose "
                    "items only the snapshots and log hold")
        return ""


class Checkpointer:
    """Writes a collection's index checkpoints (see shard.checkpoint): on request, and in the background once
    enough was written since the last one.

    Args:
        sc: the :class:`shard.collection.ShardCollection` whose checkpoints it writes.
    """

    def __init__(self, sc):
        self.sc = sc
        self._written_since = 0
        self._pending = False

    def write(self) -> str | None:
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
        sc = self.sc
        if sc.dropped or sc.broken or sc.index is None:
            return None
        position = sc.store.pin_position()
        if position is None:
            return None
        if position == sc._checkpoint_at:
            sc.store.checkpointed(position)
            return None
        t0 = time.monotonic()
        try:
            index, extra = sc.index.state()  # in shared lists: a copy of its entries (shard.list_groups)
            arrays = {f"index_{k}": v for k, v in extra.items()} | sc.table.to_arrays()
            meta = dict(self.meta(), trained=sc.index.trained,
                        index_type=type(index).__name__, items=len(sc.table),
                        owned=np.flatnonzero(sc._owned).tolist())
            name = checkpoint.write(sc.store.path, index, sc.coll.binary, arrays, meta, position)
            del index
        except Exception:  # noqa: BLE001: a checkpoint is an optimisation; the log holds everything
            sc.store.unpin()
            log.exception("%s: writing an index checkpoint failed; the next start loads the previous one or replays "
                          "the whole storage", sc.coll.name)
            return None
        sc.store.checkpointed(position)
        sc._checkpoint_at = position
        self._written_since = 0
        log.info("%s: index checkpoint %s written (%d items, %s) in %.2fs", sc.coll.name, name, len(sc.table),
                 sc.coll.index, time.monotonic() - t0)
        return name

    def when_due(self, nbytes: int) -> None:
        """Called under the write order after each write of ``nbytes`` vector bytes: starts a background
        checkpoint once enough was written since the last one (see CHECKPOINT_EVERY_BYTES)."""
        sc = self.sc
        self._written_since += nbytes
        due = sc.checkpoint_every_bytes or max(CHECKPOINT_EVERY_BYTES, sc.index.nbytes // 2)
        if self._written_since >= due:
            self.soon()

    def soon(self) -> None:
        """Starts a background checkpoint unless one is pending (it runs once the caller lets go of the write
        order)."""
        sc = self.sc
        if not self._pending:
            self._pending = True
            threading.Thread(target=self._in_background, name=f"checkpoint-{sc.coll.name}",
                             daemon=True).start()

    def turn(self):
        """What a checkpoint of this collection waits for before it holds the write order: in shared lists
        (shard.list_groups), its process's other checkpoints of such indexes, each a copy of a shard's entries
        (:data:`shard.list_groups.CHECKPOINT_TURN`): at most one copy at once. Taken first, so that the writes of
        a shard whose checkpoint waits go on meanwhile."""
        return CHECKPOINT_TURN if getattr(self.sc.index, "_member", None) is not None else contextlib.nullcontext()

    def _in_background(self) -> None:
        sc = self.sc
        try:
            with self.turn(), sc._write_order:
                name = self.write()
            if name is not None:
                sc.store.trim_log()  # the log segments it covers, kept since compaction folded them
                if not sc.joining:  # no trim while buckets are copied in (it stalls searches: see shard.moves)
                    release_memory()  # what writing it allocated and freed (about a tenth of the index's bytes)
        except Exception:  # noqa: BLE001: background work: logged, the next one tries again
            log.exception("%s: background checkpoint failed", sc.coll.name)
        finally:
            self._pending = False

    def meta(self) -> dict:
        """What a checkpoint must have been written for, to be used for this collection as it is now."""
        sc = self.sc
        return {"collection": sc.coll.name, "spec": sc.coll.index, "dim": sc.coll.dim,
                "metric": sc.coll.metric, "buckets": sc.coll.buckets,
                "trained_version": int(getattr(sc.coll, "trained_version", 0))}
