"""Durable storage of a shard: per collection, a write-ahead log in segments plus per-bucket snapshots.

Layout under the storage root (a local directory, or a volume every node mounts at the same path)::

    shards/<shard_id>/<collection>/wal-<seq>.log      append-only frames of WalRecord (protos/storage.proto)
    shards/<shard_id>/<collection>/b<bucket>.snap     one BucketSnapshot frame: the bucket's live items

A write is appended as one frame and fsynced before it is acknowledged, so an acknowledged write survives
``kill -9`` of the process or a power cut. One fsync covers a whole batch (every bucket in it), which is why the
log is per shard rather than per bucket. When the active segment passes ``segment_bytes`` it is sealed and a
background compaction folds sealed segments into the bucket snapshots, then deletes them. Compaction is
idempotent: re-applying a sealed segment to a snapshot that already holds it changes nothing (last write wins
per id), so a crash half way through only costs the work. A RESET record empties buckets (the shard gave them
away, or takes them on afresh), for replay and compaction alike.

Another shard reads buckets from here with :func:`read_buckets` while this one keeps writing and compacting: that
is how a bucket moves (see lookalike.controller).
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
RESET = storage_pb2.WalRecord.RESET


@dataclass
class Batch:
    """One replayed write: ``vectors`` shape (n, cols) and ``payloads`` (serialized Payload or None) for upserts;
    ``buckets`` for a RESET (which has no ids)."""

    op: int
    ids: list[str]
    vectors: np.ndarray | None = None
    payloads: list[bytes | None] | None = None
    buckets: list[int] | None = None


_LOAD_BATCH = 16384
COMPACT_NICE = 10


def _concat(batches: list[Batch]) -> Batch:
    """One UPSERT batch of several (of disjoint ids)."""
    if len(batches) == 1:
        return batches[0]
    return Batch(UPSERT, [u for b in batches for u in b.ids], np.concatenate([b.vectors for b in batches]),
                 [p for b in batches for p in b.payloads])


def _coalesce(batches, limit: int) -> Iterator[Batch]:
    """UPSERT batches of disjoint ids joined into batches of about ``limit`` items (fewer, cheaper applies)."""
    pending: list[Batch] = []
    items = 0
    for batch in batches:
        pending.append(batch)
        items += len(batch.ids)
        if items >= limit:
            yield _concat(pending)
            pending, items = [], 0
    if pending:
        yield _concat(pending)


def _frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data), zlib.crc32(data)) + data


def _iter_frames(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    """Yields (offset where the frame ends, frame body) for the valid frames of a file, one at a time; a torn or
    corrupt tail ends it."""
    with open(path, "rb") as f:
        yield from _iter_open_frames(f, path)


def _iter_open_frames(f, path) -> Iterator[tuple[int, bytes]]:
    pos = 0
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


def _record_to_batch(body: bytes) -> Batch:
    rec = storage_pb2.WalRecord.FromString(body)
    ids = list(rec.ids)
    if rec.op == UPSERT:
        return Batch(UPSERT, ids, vectors_from_proto_raw(rec.vectors), _payloads_from_proto(rec.payloads, len(ids)))
    if rec.op == RESET:
        return Batch(RESET, [], buckets=list(rec.buckets))
    return Batch(DELETE, ids)


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
        self._append_record(rec)

    def reset(self, buckets) -> None:
        """Durably empties buckets: replay and compaction forget what was logged for them before."""
        self._append_record(storage_pb2.WalRecord(op=RESET, buckets=sorted(int(b) for b in buckets)))

    def _append_record(self, rec) -> None:
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
            yield _record_to_batch(body)

    def load(self, buckets: set[int] | None = None) -> Iterator[Batch]:
        """Everything stored, in order, as batches to apply: snapshots first, then the log.

        Args:
            buckets: keep only items of these buckets (None: all).
        """
        # Compaction rewrites snapshots and deletes segments: hold it off while reading.
        with self._compact_lock:
            # Snapshots hold disjoint ids: coalesce them into large batches.
            snapshots = (_read_snapshot(path) for path in sorted(self.path.glob("b*.snap"))
                         if buckets is None or int(path.stem[1:]) in buckets)
            yield from _coalesce((b for b in snapshots if b is not None and b.ids), _LOAD_BATCH)
            for seg in self._segments():
                for batch in self._read_segment(seg):
                    if buckets is not None:
                        batch = _filter(batch, buckets, self.n_buckets)
                    if batch.ids or batch.buckets:
                        yield batch

    # --- compaction -----------------------------------------------------------------------------------------
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
        resets: set[int] = set()  # buckets whose snapshot is replaced rather than updated
        for seg in sealed:
            for batch in self._read_segment(seg):
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
        for bucket, ch in changes.items():
            self._rewrite_snapshot(bucket, ch, bucket in resets)
        return len(changes)

    def _rewrite_snapshot(self, bucket: int, changes: dict, reset: bool = False) -> None:
        path = _snapshot_path(self.path, bucket)
        items: dict[str, tuple[np.ndarray, bytes | None]] = {}
        old = _read_snapshot(path) if path.exists() and not reset else None
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


# --- reading a store from outside its shard ---------------------------------------------------------------------
def _snapshot_path(path: pathlib.Path, bucket: int) -> pathlib.Path:
    return path / f"b{bucket:05d}.snap"


def _read_snapshot(path: pathlib.Path) -> Batch | None:
    first = next(_iter_frames(path), None)
    if first is None:
        log.error("%s: snapshot is damaged; ignoring it", path)
        return None
    snap = storage_pb2.BucketSnapshot.FromString(first[1])
    ids = list(snap.ids)
    return Batch(UPSERT, ids, vectors_from_proto_raw(snap.vectors), _payloads_from_proto(snap.payloads, len(ids)))


def _filter(batch: Batch, buckets: set[int], n_buckets: int) -> Batch:
    """The part of a batch that concerns ``buckets`` (a RESET keeps the buckets it names among them)."""
    if batch.op == RESET:
        return Batch(RESET, [], buckets=[b for b in batch.buckets if b in buckets])
    keep = np.isin(buckets_of(batch.ids, n_buckets), np.fromiter(buckets, dtype=np.int64))
    if keep.all():
        return batch
    idx = np.flatnonzero(keep)
    return Batch(batch.op, [batch.ids[i] for i in idx],
                 batch.vectors[idx] if batch.vectors is not None else None,
                 [batch.payloads[i] for i in idx] if batch.payloads is not None else None)


class StoreChanged(Exception):
    """The store was compacted while being read; read again."""


def read_buckets(path: str | pathlib.Path, n_buckets: int, buckets, batch_items: int = _LOAD_BATCH,
                 attempts: int = 50) -> Iterator[Batch]:
    """The live items of some buckets of another shard's store, as UPSERT batches: what its owner holds.

    The owner keeps appending and compacting meanwhile. Every write the owner finished before this call is
    included; writes it makes during the call may or may not be. A compaction that deletes segments during the
    read is detected (a segment listed before the snapshots were read is gone, or cannot be opened) and the read
    starts over.

    Raises:
        StoreChanged: the store kept changing under ``attempts`` reads.
    """
    path = pathlib.Path(path)
    wanted = {int(b) for b in buckets}
    for _ in range(attempts):
        try:
            state = _read_state(path, n_buckets, wanted)
        except StoreChanged:
            continue
        yield from _coalesce(_live_batches(state), batch_items)
        return
    raise StoreChanged(f"{path} kept being compacted while it was read ({attempts} attempts)")


def _live_batches(state: dict[int, tuple]) -> Iterator[Batch]:
    """Per bucket: its snapshot with the logged changes applied (the snapshot as it is when none touch it)."""
    for base, changes, reset in state.values():
        if base is not None and not reset:
            if changes:
                keep = [i for i, u in enumerate(base.ids) if u not in changes]
                if keep:
                    yield Batch(UPSERT, [base.ids[i] for i in keep], base.vectors[keep],
                                [base.payloads[i] for i in keep])
            elif base.ids:
                yield base
        live = [(u, c) for u, c in changes.items() if c is not None]
        if live:
            yield Batch(UPSERT, [u for u, _ in live], np.stack([c[0] for _, c in live]), [c[1] for _, c in live])


def _read_state(path: pathlib.Path, n_buckets: int, wanted: set[int]) -> dict[int, tuple]:
    """bucket -> (snapshot Batch or None, {id: (row, payload) or None for a delete} logged after it, reset)."""
    before = {p.name for p in path.glob("wal-*.log")}
    state: dict[int, tuple] = {}
    for b in wanted:
        snap = _snapshot_path(path, b)
        try:
            base = _read_snapshot(snap) if snap.exists() else None
        except FileNotFoundError:
            raise StoreChanged() from None
        state[b] = (base, {}, False)
    segs = sorted(path.glob("wal-*.log"))
    if not before <= {p.name for p in segs}:
        raise StoreChanged()
    files = []
    try:
        for seg in segs:
            files.append(open(seg, "rb"))  # once open, a later unlink by compaction does not matter
    except FileNotFoundError:
        for f in files:
            f.close()
        raise StoreChanged() from None
    try:
        for seg, f in zip(segs, files):
            for _, body in _iter_open_frames(f, seg):
                batch = _record_to_batch(body)
                if batch.op == RESET:
                    for b in batch.buckets:
                        if b in wanted:
                            state[b] = (None, {}, True)
                    continue
                for i, (uid, b) in enumerate(zip(batch.ids, buckets_of(batch.ids, n_buckets).tolist())):
                    if b not in wanted:
                        continue
                    changes = state[b][1]
                    changes.pop(uid, None)
                    changes[uid] = None if batch.op == DELETE else (batch.vectors[i], batch.payloads[i])
    finally:
        for f in files:
            f.close()
    return state
