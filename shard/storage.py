"""Durable storage of a shard: per collection, a write-ahead log in segments plus per-bucket snapshots.

Layout under the storage root (a local directory, or a volume every node mounts at the same path)::

    shards/<shard_id>/<collection>/wal-<seq>.log      append-only frames of WalRecord (protos/storage.proto)
    shards/<shard_id>/<collection>/b<bucket>.snap     one BucketSnapshot frame: the bucket's live items

A write is appended as one frame and fsynced before it is acknowledged, so an acknowledged write survives
``kill -9`` of the process or a power cut. One fsync covers a whole batch (every bucket in it), which is why the
log is per shard rather than per bucket. When the active segment passes ``segment_bytes`` it is sealed and a
background compaction folds sealed segments into the bucket snapshots, then deletes them. Compaction is
idempotent: re-applying a sealed segment to a snapshot that already holds it changes nothing (last write wins
per id), so a crash half way through only costs the work. Another shard can read a bucket from here
(:meth:`CollectionStore.read_bucket`): that is how a bucket moves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pathlib
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lookalike.ids import buckets_of
from lookalike.wire import vectors_from_proto_raw, vectors_to_proto
from protos import storage_pb2

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
UPSERT = storage_pb2.WalRecord.UPSERT
DELETE = storage_pb2.WalRecord.DELETE


@dataclass
class Batch:
    """One replayed write: ``vectors`` shape (n, cols) and ``payloads`` (serialized Payload or None) for upserts."""

    op: int
    ids: list[str]
    vectors: np.ndarray | None = None
    payloads: list[bytes | None] | None = None


_LOAD_BATCH = 16384


def _concat(batches: list[Batch]) -> Batch:
    """One UPSERT batch of several (of disjoint ids)."""
    if len(batches) == 1:
        return batches[0]
    return Batch(UPSERT, [u for b in batches for u in b.ids], np.concatenate([b.vectors for b in batches]),
                 [p for b in batches for p in b.payloads])


def _frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data), zlib.crc32(data)) + data


def _iter_frames(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    """Yields (offset where the frame ends, frame body) for the valid frames of a file, one at a time; a torn or
    corrupt tail ends it."""
    pos = 0
    with open(path, "rb") as f:
        while True:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            length, crc = _HEADER.unpack(header)
            body = f.read(length)
            if len(body) < length or zlib.crc32(body) != crc:
                log.warning("%s: torn or corrupt frame at byte %d; the log ends there", path, pos)
                break
            pos += _HEADER.size + length
            yield pos, body


def _valid_end(path: pathlib.Path) -> int:
    """Byte offset where a file's valid frames end."""
    end = 0
    for end, _ in _iter_frames(path):
        pass
    return end


def release_memory() -> None:
    """Hands freed heap pages back to the OS. glibc keeps them after large transient work (loading, compaction,
    dropping a collection), which would otherwise show as resident memory the shard does not use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _payloads_to_proto(payloads: list[bytes | None] | None) -> list[bytes]:
    if not payloads or all(p is None for p in payloads):
        return []
    return [p or b"" for p in payloads]


def _payloads_from_proto(msgs, n: int) -> list[bytes | None]:
    if len(msgs) == 0:
        return [None] * n
    return [m or None for m in msgs]


class CollectionStore:
    """The durable log and snapshots of one collection on one shard.

    Args:
        path: its directory (created if missing).
        n_buckets: the collection's bucket count (to find the bucket of a logged id).
        segment_bytes: size at which the active WAL segment is sealed and compacted.
    """

    def __init__(self, path: pathlib.Path, n_buckets: int, segment_bytes: int = 64 << 20):
        self.path = pathlib.Path(path)
        self.n_buckets = n_buckets
        self.segment_bytes = segment_bytes
        self.compact_pass_bytes = 16 << 20
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()          # appends and segment rotation
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._fd: int | None = None
        self._seq = 0
        self._size = 0
        self._closed = False
        self._open_active()

    # --- segments -------------------------------------------------------------------------------------------
    def _segments(self) -> list[pathlib.Path]:
        return sorted(self.path.glob("wal-*.log"))

    def _open_active(self) -> None:
        segs = self._segments()
        if segs:
            last = segs[-1]
            end = _valid_end(last)
            if end != last.stat().st_size:  # drop a torn tail so new frames follow valid ones
                with open(last, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            self._seq = int(last.stem.split("-")[1])
        else:
            self._seq = 1
        active = self.path / f"wal-{self._seq:010d}.log"
        self._fd = os.open(active, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        _fsync_dir(self.path)

    def append(self, op: int, ids: list[str], vectors: np.ndarray | None = None,
               payloads: list[bytes | None] | None = None) -> None:
        """Appends one batch and fsyncs it. Returns only once it is durable."""
        rec = storage_pb2.WalRecord(op=op, ids=ids)
        if op == UPSERT:
            rec.vectors.CopyFrom(vectors_to_proto(vectors))
            rec.payloads.extend(_payloads_to_proto(payloads))
        frame = _frame(rec.SerializeToString())
        rotate = False
        with self._lock:
            if self._closed:
                raise RuntimeError(f"storage {self.path} is closed")
            os.write(self._fd, frame)
            os.fsync(self._fd)
            self._size += len(frame)
            if self._size >= self.segment_bytes:
                self._rotate_locked()
                rotate = True
        if rotate:
            threading.Thread(target=self._compact_quietly, name=f"compact-{self.path.name}", daemon=True).start()

    def _rotate_locked(self) -> None:
        os.close(self._fd)
        self._seq += 1
        self._fd = os.open(self.path / f"wal-{self._seq:010d}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = 0
        _fsync_dir(self.path)

    # --- reading --------------------------------------------------------------------------------------------
    def _read_segment(self, path: pathlib.Path) -> Iterator[Batch]:
        for _, body in _iter_frames(path):
            rec = storage_pb2.WalRecord.FromString(body)
            ids = list(rec.ids)
            if rec.op == UPSERT:
                yield Batch(UPSERT, ids, vectors_from_proto_raw(rec.vectors), _payloads_from_proto(rec.payloads, len(ids)))
            else:
                yield Batch(DELETE, ids)

    def _snapshot_path(self, bucket: int) -> pathlib.Path:
        return self.path / f"b{bucket:05d}.snap"

    def _read_snapshot(self, path: pathlib.Path) -> Batch | None:
        first = next(_iter_frames(path), None)
        if first is None:
            log.error("%s: snapshot is damaged; ignoring it", path)
            return None
        body = first[1]
        snap = storage_pb2.BucketSnapshot.FromString(body)
        ids = list(snap.ids)
        return Batch(UPSERT, ids, vectors_from_proto_raw(snap.vectors), _payloads_from_proto(snap.payloads, len(ids)))

    def load(self, buckets: set[int] | None = None) -> Iterator[Batch]:
        """Everything stored, in order, as batches to apply: snapshots first, then the log.

        Args:
            buckets: keep only items of these buckets (None: all).
        """
        # Compaction rewrites snapshots and deletes segments: hold it off while reading.
        with self._compact_lock:
            # Snapshots hold disjoint ids: coalesce them into large batches (fewer, cheaper applies).
            pending: list[Batch] = []
            pending_items = 0
            for path in sorted(self.path.glob("b*.snap")):
                if buckets is not None and int(path.stem[1:]) not in buckets:
                    continue
                batch = self._read_snapshot(path)
                if batch is not None and batch.ids:
                    pending.append(batch)
                    pending_items += len(batch.ids)
                    if pending_items >= _LOAD_BATCH:
                        yield _concat(pending)
                        pending, pending_items = [], 0
            if pending:
                yield _concat(pending)
            for seg in self._segments():
                for batch in self._read_segment(seg):
                    if buckets is not None:
                        batch = self._filter(batch, buckets)
                    if batch.ids:
                        yield batch

    def _filter(self, batch: Batch, buckets: set[int]) -> Batch:
        keep = np.isin(buckets_of(batch.ids, self.n_buckets), np.fromiter(buckets, dtype=np.int64))
        if keep.all():
            return batch
        idx = np.flatnonzero(keep)
        return Batch(batch.op, [batch.ids[i] for i in idx],
                     batch.vectors[idx] if batch.vectors is not None else None,
                     [batch.payloads[i] for i in idx] if batch.payloads is not None else None)

    def read_bucket(self, bucket: int) -> Iterator[Batch]:
        """One bucket's stored writes, in order (for moving it to another shard)."""
        return self.load({bucket})

    # --- compaction -----------------------------------------------------------------------------------------
    def _compact_quietly(self) -> None:
        try:
            self.compact()
        except Exception:
            log.exception("compaction of %s failed; the log is kept and replayed instead", self.path)

    def compact(self) -> int:
        """Folds every sealed segment into bucket snapshots and deletes the segments. Returns segments folded."""
        with self._compact_lock:
            with self._lock:
                if self._closed:
                    return 0
                if self._size > 0:
                    self._rotate_locked()
                sealed = self._segments()[:-1]
            if not sealed:
                return 0
            # Fold in passes over groups of buckets so that one pass holds about compact_pass_bytes of rows.
            sealed_bytes = sum(seg.stat().st_size for seg in sealed)
            passes = max(1, min(self.n_buckets, -(-sealed_bytes // self.compact_pass_bytes)))
            touched = 0
            for group in range(passes):
                touched += self._compact_pass(sealed, passes, group)
            _fsync_dir(self.path)
            for seg in sealed:
                seg.unlink()
            _fsync_dir(self.path)
            log.info("compacted %d segment(s) of %s into %d bucket snapshot(s) in %d pass(es)", len(sealed), self.path,
                     touched, passes)
            release_memory()
            return len(sealed)

    def _compact_pass(self, sealed: list[pathlib.Path], passes: int, group: int) -> int:
        """Folds the writes of buckets ``b % passes == group``; returns the snapshots rewritten."""
        # bucket -> {id: (row, payload)} or None for a delete, in log order
        changes: dict[int, dict[str, tuple[np.ndarray, bytes | None] | None]] = {}
        for seg in sealed:
            for batch in self._read_segment(seg):
                buckets = buckets_of(batch.ids, self.n_buckets)
                for i in np.flatnonzero(buckets % passes == group).tolist():
                    ch = changes.setdefault(int(buckets[i]), {})
                    uid = batch.ids[i]
                    ch.pop(uid, None)  # re-insert so the order is that of the last write
                    ch[uid] = None if batch.op == DELETE else (batch.vectors[i].copy(), batch.payloads[i])
        for bucket, ch in changes.items():
            self._rewrite_snapshot(bucket, ch)
        return len(changes)

    def _rewrite_snapshot(self, bucket: int, changes: dict) -> None:
        path = self._snapshot_path(bucket)
        items: dict[str, tuple[np.ndarray, bytes | None]] = {}
        old = self._read_snapshot(path) if path.exists() else None
        if old is not None:
            for i, uid in enumerate(old.ids):
                items[uid] = (old.vectors[i], old.payloads[i])
        for uid, change in changes.items():
            items.pop(uid, None)
            if change is not None:
                items[uid] = change
        if not items:
            path.unlink(missing_ok=True)
            return
        rows = np.stack([v[0] for v in items.values()])
        snap = storage_pb2.BucketSnapshot(bucket=bucket, ids=list(items))
        snap.vectors.CopyFrom(vectors_to_proto(rows))
        snap.payloads.extend(_payloads_to_proto([v[1] for v in items.values()]))
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_frame(snap.SerializeToString()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # --- lifecycle ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the log; waits for a compaction in progress, so the files are quiet afterwards."""
        with self._lock:
            if not self._closed and self._fd is not None:
                os.close(self._fd)
            self._closed = True
        with self._compact_lock:
            pass

    def destroy(self) -> None:
        """Closes and deletes everything stored for the collection on this shard."""
        self.close()
        with self._compact_lock:
            shutil.rmtree(self.path, ignore_errors=True)
