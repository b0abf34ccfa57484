"""Durable storage of a shard: per collection, a write-ahead log in segments plus per-bucket snapshots.

Layout under the storage root (a local directory, or a volume every node mounts at the same path)::

    shards/<shard_id>/<collection>/wal-<seq>.log      append-only frames of WalRecord (protos/storage.proto)
    shards/<shard_id>/<collection>/b<bucket>.snap     one BucketSnapshot frame: the bucket's live items
    shards/<shard_id>/<collection>/manifest.json      what every sealed segment and snapshot holds (see below)
    shards/<shard_id>/<collection>/active.mark        what the active segment holds, as acknowledged so far
    shards/<shard_id>/<collection>/ckpt-<n>.*         the newest index checkpoint (shard.checkpoint; not the
                                                      store's files: it only keeps the log they need)

A write is appended as one frame and fsynced before it is acknowledged, so an acknowledged write survives
``kill -9`` of the process or a power cut. One fsync covers a whole batch (every bucket in it), which is why the
log is per shard rather than per bucket. When the active segment passes ``segment_bytes`` it is sealed and a
background compaction folds sealed segments into the bucket snapshots, then deletes them (those the newest index
checkpoint does not cover yet are kept, marked folded, until one does: see :meth:`CollectionStore.compact`).
Compaction is idempotent: re-applying a sealed segment to a snapshot that already holds it changes nothing (last
write wins per id), so a crash half way through only costs the work. A RESET record empties buckets (the shard gave
them away, or takes them on afresh), for replay and compaction alike.

Another shard reads buckets from here with :func:`shard.bucket_reader.read_buckets` while this one keeps writing
and compacting: that is how a bucket moves (see control.controller).

Every frame carries a CRC-32 and every record is parsed and checked when it is read. Anything that does not
check out is damage: the file (a copy of it, for a log segment) is kept aside in
``<collection>/damaged/<name>.<UTC time>`` with a ``.json`` note, never deleted or loaded as it is, and
:attr:`CollectionStore.damage` reports it. A damaged snapshot is moved aside, so its bucket is served from what the
log still holds. A damaged log segment keeps its valid frames: those before the damage and those after it, found
again by scanning for the next frame whose length, checksum and record all check out; the segment is rewritten
with them.

Every file is accounted for, so that one that goes missing or loses its end is damage too, reported with what it
held. ``manifest.json`` (replaced atomically: temporary file, fsync, rename, fsync of the directory) records for
each sealed segment its records, ids, bytes and a CRC-32 chained over its frames' headers (a
:class:`shard.frames.Tally`), and for each snapshot its items, bytes and frame CRC; it is rewritten when a segment is
sealed and by compaction, never per write. The active segment's tally is in ``active.mark``: 36 bytes and their
CRC, overwritten in place after each append's fsync, without an fsync of its own (a second fsync per write would
halve the write rate). It never counts a write the log does not hold durably: it is written after the log's fsync.
A crash of the process keeps it (the page cache survives); a power cut may lose its last updates, which only makes
it count fewer writes. So on open, the active segment must hold at least the frames the mark counts: a frame cut
short at its very end, past what the mark counts, is a write a crash interrupted, never acknowledged, and is
dropped silently; anything shorter is damage. Sealed segments and snapshots must match the manifest exactly.
Crashes between the steps of sealing and compaction leave states the manifest allows (see
:meth:`CollectionStore.compact`); a store written before manifests existed is adopted as it is found.

The parts, each in its module: records and their framing (shard.records, shard.frames), what was written
(shard.manifest), damage (shard.damage), the checks on open (shard.store_check), the log writer (shard.wal), reading
back (shard.store_reader, shard.snapshots), compaction (shard.compaction); :class:`CollectionStore` puts them
together.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator

import numpy as np

from shard.compaction import Compactor
from shard.damage import Damage, DamageLog
from shard.manifest import MANIFEST, LogPosition, ManifestFile, segment_files, seq_of
from shard.records import LOAD_BATCH, Batch, coalesce, keep_buckets, log_record, reset_record
from shard.store_check import OpenCheck, read_manifest
from shard.store_reader import StoreReader
from shard.wal import WalWriter


class CollectionStore:
    """The durable log and snapshots of one collection on one shard.

    Args:
        path: its directory (created if missing).
        n_buckets: the collection's bucket count (to find the bucket of a logged id).
        segment_bytes: size at which the active WAL segment is sealed and compacted.

    Attributes:
        wal: the log writer (:class:`shard.wal.WalWriter`).
        replayed_records: log records :meth:`load` yielded, in all.
    """

    def __init__(self, path: pathlib.Path, n_buckets: int, segment_bytes: int = 64 << 20):
        self.path = pathlib.Path(path)
        self.n_buckets = n_buckets
        self.path.mkdir(parents=True, exist_ok=True)
        self.replayed_records = 0
        self._damage = DamageLog(self.path)
        manifest = read_manifest(self.path, self._damage)
        self._manifest = ManifestFile(self.path, manifest)
        seq, tally = OpenCheck(self.path, self._manifest, self._damage, known=manifest is not None).run()
        self.wal = WalWriter(self.path, self._manifest, segment_bytes)
        self.wal.open_active(seq, tally)
        self._reader = StoreReader(self._manifest, self._damage)
        self._compactor = Compactor(self.path, n_buckets, self.wal, self._manifest, self._damage, self._reader)

    @property
    def segment_bytes(self) -> int:
        """Size at which the active WAL segment is sealed and compacted."""
        return self.wal.segment_bytes

    @segment_bytes.setter
    def segment_bytes(self, value: int) -> None:
        self.wal.segment_bytes = value

    @property
    def compact_pass_bytes(self) -> int:
        """Bytes of rows one compaction pass holds, about (see :class:`shard.compaction.Compactor`)."""
        return self._compactor.pass_bytes

    @compact_pass_bytes.setter
    def compact_pass_bytes(self, value: int) -> None:
        self._compactor.pass_bytes = value

    # --- damage -----------------------------------------------------------------------------------------------
    @property
    def damage(self) -> list[Damage]:
        """The damaged files found in this directory (see the module's docstring), those set aside by earlier runs
        included (their notes in ``damaged/``), oldest first."""
        return self._damage.damage

    def damaged(self) -> list[str]:
        """The damaged files, one line each, for stats."""
        return [str(d) for d in list(self.damage)]

    def report_damage(self, path: pathlib.Path, kind: str, offset: int, message: str,
                      companions: tuple[pathlib.Path, ...] = ()) -> None:
        """Reports a damaged file of this directory and moves it aside to ``damaged/`` like a damaged snapshot (see
        the module's docstring); ``companions``, files that belong with it (the other files of a checkpoint), are
        moved there too, beside it."""
        self._damage.move_aside(path, kind, offset, message, companions)

    # --- writing ----------------------------------------------------------------------------------------------
    def append(self, op: int, ids: list[str], vectors: np.ndarray | None = None,
               payloads: list[bytes | None] | None = None) -> None:
        """Appends one batch and fsyncs it. Returns only once it is durable."""
        if self.wal.append(log_record(op, ids, vectors, payloads)):
            self.compact_soon()

    def reset(self, buckets) -> None:
        """Durably empties buckets: replay and compaction forget what was logged for them before."""
        if self.wal.append(reset_record(buckets)):
            self.compact_soon()

    def retract(self) -> bool:
        """Takes the last appended record back out of the log: its write could not be applied, so it must never be
        replayed. The caller holds the write order (no append since). Returns False when that is no longer
        possible (the record's segment was sealed since; replaying it then fails again, and the shard quarantines
        the collection)."""
        return self.wal.retract()

    # --- reading ----------------------------------------------------------------------------------------------
    def load(self, buckets: set[int] | None = None, after: LogPosition | None = None) -> Iterator[Batch]:
        """Everything stored, in order, as batches to apply: snapshots first, then the log.

        Args:
            buckets: keep only items of these buckets (None: all).
            after: only the records logged after this position (an index checkpoint holds the rest; the caller
                checked it with :meth:`check_position`): no snapshots, no earlier segment.
        """
        # Compaction rewrites snapshots and deletes segments: hold it off while reading.
        with self._compactor.lock:
            if after is None:
                # Snapshots hold disjoint ids: coalesce them into large batches.
                snapshots = (self._reader.load_snapshot(path) for path in sorted(self.path.glob("b*.snap"))
                             if buckets is None or int(path.stem[1:]) in buckets)
                yield from coalesce((b for b in snapshots if b is not None and b.ids), LOAD_BATCH)
            segs = segment_files(self.path)
            if after is not None:
                segs = [seg for seg in segs if seq_of(seg.name) >= after.seq]
            for i, seg in enumerate(segs):
                start = after.bytes if after is not None and seq_of(seg.name) == after.seq else 0
                for batch in self._reader.read_segment(seg, active=i == len(segs) - 1, start=start):
                    self.replayed_records += 1
                    if buckets is not None:
                        batch = keep_buckets(batch, buckets, self.n_buckets)
                    if batch.ids or batch.buckets:
                        yield batch
            with self._manifest.lock:
                if self._manifest.dirty:
                    self._manifest.save()
                    self._manifest.dirty = False

    # --- compaction -------------------------------------------------------------------------------------------
    def compact_soon(self) -> None:
        """Starts a compaction in the background (e.g. after a RESET, so that the snapshots of buckets given away
        are deleted now rather than once the log fills a segment)."""
        self._compactor.compact_soon()

    def compact(self) -> int:
        """Folds every sealed segment into bucket snapshots and deletes the segments. Returns segments folded.

        The steps, each one durable before the next starts; a crash after any of them leaves a state the next open
        accepts without reporting damage:

        1. seal the active segment (:meth:`shard.wal.WalWriter.rotate_locked`);
        2. per pass over a group of buckets: write the group's new snapshots to temporary files (ignored on
           open); record in the manifest that they replace the current ones (either is then accepted); rename them
           over the current ones (or delete those left empty); fsync the directory; record them as the current ones;
        3. drop the segments from the manifest, then delete them (segments the manifest does not know are adopted;
           folding them again changes nothing).

        Segments that the newest index checkpoint does not cover (at or after its position's segment, see
        :meth:`pin_position`) are folded but kept, marked ``folded`` in the manifest so that no later compaction
        folds them again; :meth:`trim_log` deletes them once a newer checkpoint covers them. A restart that cannot
        use the checkpoint replays them over the snapshots, which changes nothing (last write wins per id).

        A sealed segment or snapshot that is missing, or that does not hold what the manifest records, is reported
        as damage on the way.
        """
        return self._compactor.compact()

    # --- index checkpoints (see shard.checkpoint) -------------------------------------------------------------
    def pin_position(self) -> LogPosition | None:
        """The current end of the log, for a checkpoint of what memory holds: the caller holds the collection's
        write order, so every record logged so far is applied and none is appended meanwhile. Until
        :meth:`checkpointed` or :meth:`unpin`, compaction keeps the position's segment and those after it (a
        compaction that sealed it after this call decides what to delete after it too). None once closed."""
        with self.wal.lock:
            if self.wal.closed:
                return None
            self._compactor.pin(self.wal.seq)
            return self.wal.position()

    def unpin(self) -> None:
        """The checkpoint being written failed: compaction keeps only what the newest complete one needs."""
        self._compactor.unpin()

    def checkpointed(self, position: LogPosition | None) -> None:
        """A checkpoint covering everything before ``position`` is complete (or, at load, is the one in use; None:
        there is none): compaction may delete the segments before the position's one from now on."""
        self._compactor.checkpointed(position)

    def trim_log(self) -> int:
        """Deletes the segments that compaction folded and kept until a checkpoint covered them, now that one does.
        Returns how many. Waits for a compaction in progress."""
        return self._compactor.trim_log()

    def check_position(self, position: LogPosition) -> str | None:
        """Why the log no longer holds ``position`` as it was when a checkpoint recorded it (its segment is gone,
        holds fewer records, or other frames: rewritten after damage), or None if it does. Reads only the headers
        of the records before the position (the store checked every frame when it opened)."""
        with self._compactor.lock:
            return self._reader.check_position(self.path, position)

    # --- lifecycle --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the log; waits for a compaction in progress, so the files are quiet afterwards."""
        self.wal.close()
        with self._compactor.lock:
            pass

    def destroy(self) -> None:
        """Closes and deletes everything stored for the collection on this shard."""
        self.close()
        with self._compactor.lock:
            # The manifest first: a crash half way through leaves files to adopt, not missing ones to report.
            (self.path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)
