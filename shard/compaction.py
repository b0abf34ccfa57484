"""Compaction of a store: sealed log segments folded into the bucket snapshots, then deleted, except those the
newest index checkpoint does not cover yet (shard.checkpoint), which are kept until one does.

Compaction is idempotent: re-applying a sealed segment to a snapshot that already holds it changes nothing (last
write wins per id), so a crash half way through only costs the work. A RESET record empties buckets.

Uses numpy, the base package (lookalike.ids) and the shard storage modules (damage, frames, manifest, osutil,
records, snapshots, store_reader, wal).
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading

import numpy as np

from lookalike.ids import buckets_of
from shard.damage import DamageLog
from shard.frames import Tally
from shard.manifest import LogPosition, ManifestFile, seal_of, seq_of
from lookalike.files import fsync_dir
from shard.osutil import release_memory
from shard.records import DELETE, RESET, Batch
from shard.snapshots import reject_snapshot, snapshot_gone, snapshot_path, write_snapshot
from shard.store_reader import StoreReader
from shard.wal import WalWriter

log = logging.getLogger(__name__)

COMPACT_NICE = 10


class Compactor:
    """Folds a store's sealed segments into its snapshots, one compaction at a time.

    Args:
        path: the store directory.
        n_buckets: the collection's bucket count (to find the bucket of a logged id).
        wal, manifest, damage, reader: the store's log writer, manifest, damage log and reader.

    Attributes:
        lock: held by a compaction, and by whoever must not see one (reads of the whole store, closing).
        pass_bytes: a compaction folds in passes over groups of buckets holding about this many bytes of rows.
    """

    def __init__(self, path: pathlib.Path, n_buckets: int, wal: WalWriter, manifest: ManifestFile,
                 damage: DamageLog, reader: StoreReader):
        self.path = path
        self.n_buckets = n_buckets
        self.wal = wal
        self.manifest = manifest
        self.damage = damage
        self.reader = reader
        self.pass_bytes = 16 << 20
        self.lock = threading.Lock()
        # Index checkpoints (shard.checkpoint): compaction deletes only segments before ``_keep_from``, the segment
        # of the newest checkpoint's position (None: no checkpoint, delete every segment it folded), or before
        # ``_pinned``, that of a checkpoint being written. Both under manifest.lock.
        self._keep_from: int | None = None
        self._pinned: int | None = None

    # --- in the background ------------------------------------------------------------------------------------
    def _compact_quietly(self) -> None:
        try:
            # Background work: at a lower OS priority than the threads that serve (Linux schedules threads apart).
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPACT_NICE)
        except (OSError, AttributeError):
            pass
        try:
            self.compact()
        except Exception:
            log.exception("compaction of %s failed; the log is kept and replayed instead", self.path)

    def compact_soon(self) -> None:
        """Starts a compaction in the background."""
        threading.Thread(target=self._compact_quietly, name=f"compact-{self.path.name}", daemon=True).start()

    # --- compaction -------------------------------------------------------------------------------------------
    def compact(self) -> int:
        """Folds every sealed segment into bucket snapshots and deletes the segments (see
        :meth:`shard.store.CollectionStore.compact` for the steps). Returns segments folded."""
        with self.lock:
            with self.wal.lock:
                if self.wal.closed:
                    return 0
                if self.wal.tally.bytes > 0:
                    self.wal.rotate_locked()
            with self.manifest.lock:
                recorded = dict(self.manifest.m.segments)
                folded = set(self.manifest.m.folded)
            if not recorded:
                return 0
            sealed = []
            for name, tally in sorted(recorded.items()):
                if not (self.path / name).exists():
                    self.damage.set_aside(self.path / name, "wal", 0,
                                          f"log segment missing: {tally.lost(Tally())}", "gone")
                elif name not in folded:
                    sealed.append((self.path / name, tally))
            # Fold in passes over groups of buckets so that one pass holds about pass_bytes of rows.
            sealed_bytes = sum(seg.stat().st_size for seg, _ in sealed)
            passes = max(1, min(self.n_buckets, -(-sealed_bytes // self.pass_bytes)))
            touched = 0
            for group in range(passes):
                touched += self._compact_pass(sealed, passes, group)
            with self.manifest.lock:
                m = self.manifest.m
                horizon = self._horizon()
                for name in recorded:
                    if horizon is None or seq_of(name) < horizon or not (self.path / name).exists():
                        m.segments.pop(name, None)
                        m.folded.discard(name)
                    else:
                        m.folded.add(name)
                self.manifest.save()
            deleted = [name for name in recorded if name not in self.manifest.m.segments]
            for name in deleted:
                (self.path / name).unlink(missing_ok=True)
            fsync_dir(self.path)
            log.info("compacted %d segment(s) of %s into %d bucket snapshot(s) in %d pass(es); %d segment(s) deleted",
                     len(sealed), self.path, touched, passes, len(deleted))
            release_memory()
            return len(sealed)

    def _compact_pass(self, sealed: list[tuple[pathlib.Path, Tally]], passes: int, group: int) -> int:
        """Folds the writes of buckets ``b % passes == group``; returns the snapshots rewritten."""
        # bucket -> {id: (row, payload)} or None for a delete, in log order
        changes: dict[int, dict[str, tuple[np.ndarray, bytes | None] | None]] = {}
        resets: set[int] = set()  # buckets whose snapshot is replaced rather than updated
        for seg, tally in sealed:
            for batch in self.reader.read_segment(seg, expected=tally):
                if batch.op == RESET:
                    for b in batch.buckets:
                        if b % passes == group:
                            changes[b] = {}
                            resets.add(b)
                    continue
                buckets = buckets_of(batch.ids, self.n_buckets)
                for i in np.flatnonzero(buckets % passes == group).tolist():
                    ch = changes.setdefault(int(buckets[i]), {})
                    uid = batch.ids[i]
                    ch.pop(uid, None)  # re-insert so the order is that of the last write
                    ch[uid] = None if batch.op == DELETE else (batch.vectors[i].copy(), batch.payloads[i])
        if not changes:
            return 0
        new = {}  # snapshot name -> (its temporary file, what it holds); (None, None): to delete
        for bucket, ch in changes.items():
            new[snapshot_path(self.path, bucket).name] = self._fold(bucket, ch, bucket in resets)
        with self.manifest.lock:
            self.manifest.m.replacing = {name: seal for name, (_, seal) in new.items()}
            self.manifest.save()
        for name, (tmp, _) in new.items():
            if tmp is None:
                (self.path / name).unlink(missing_ok=True)
            else:
                os.replace(tmp, self.path / name)
        fsync_dir(self.path)
        with self.manifest.lock:
            for name, (_, seal) in new.items():
                if seal is None:
                    self.manifest.m.snapshots.pop(name, None)
                else:
                    self.manifest.m.snapshots[name] = seal
            self.manifest.m.replacing = {}
            self.manifest.save()
        return len(new)

    def _fold(self, bucket: int, changes: dict, reset: bool = False):
        """Writes a bucket's snapshot with ``changes`` applied (to an empty one if ``reset``) to a temporary file:
        (that file, what it holds), or (None, None) if the bucket is left empty (its snapshot is to be deleted)."""
        items: dict[str, tuple[np.ndarray, bytes | None]] = {}
        old = None if reset else self._current_snapshot(snapshot_path(self.path, bucket))
        if old is not None:
            for i, uid in enumerate(old.ids):
                items[uid] = (old.vectors[i], old.payloads[i])
        for uid, change in changes.items():
            items.pop(uid, None)
            if change is not None:
                items[uid] = change
        if not items:
            return None, None
        return write_snapshot(self.path, bucket, items)

    def _current_snapshot(self, path: pathlib.Path) -> Batch | None:
        """The items of the snapshot compaction folds changes into; None if there is none, or if it is not what the
        manifest records (reported: missing, or set aside)."""
        with self.manifest.lock:
            written = self.manifest.m.snapshots.get(path.name)
        if not path.exists():
            if written is not None:
                snapshot_gone(self.damage, path, written)
                with self.manifest.lock:
                    self.manifest.m.snapshots.pop(path.name, None)
            return None
        found = seal_of(path)
        if written is not None and not written.same_file(found):
            reject_snapshot(self.damage, path, written, found)
            with self.manifest.lock:
                self.manifest.m.snapshots.pop(path.name, None)
            return None
        return self.reader.load_snapshot(path)

    # --- what index checkpoints need kept (see shard.checkpoint) ----------------------------------------------
    def _horizon(self) -> int | None:
        """The first segment compaction must keep (None: none). The caller holds manifest.lock."""
        marks = [s for s in (self._keep_from, self._pinned) if s is not None]
        return min(marks) if marks else None

    def pin(self, seq: int) -> None:
        """Keeps segment ``seq`` and those after it until :meth:`checkpointed` or :meth:`unpin`."""
        with self.manifest.lock:
            self._pinned = seq if self._pinned is None else min(self._pinned, seq)

    def unpin(self) -> None:
        """The checkpoint being written failed: compaction keeps only what the newest complete one needs."""
        with self.manifest.lock:
            self._pinned = None

    def checkpointed(self, position: LogPosition | None) -> None:
        """A checkpoint covering everything before ``position`` is complete (None: there is none)."""
        with self.manifest.lock:
            self._keep_from = position.seq if position is not None else None
            self._pinned = None

    def trim_log(self) -> int:
        """Deletes the segments that compaction folded and kept until a checkpoint covered them, now that one does.
        Returns how many. Waits for a compaction in progress."""
        with self.lock:
            with self.manifest.lock:
                m = self.manifest.m
                horizon = self._horizon()
                gone = sorted(n for n in m.folded & set(m.segments) if horizon is None or seq_of(n) < horizon)
                if not gone or self.wal.closed:
                    return 0
                for name in gone:
                    m.segments.pop(name)
                    m.folded.discard(name)
                self.manifest.save()
            for name in gone:
                (self.path / name).unlink(missing_ok=True)
            fsync_dir(self.path)
            log.info("storage %s: deleted %d compacted log segment(s) a checkpoint now covers", self.path, len(gone))
            return len(gone)
