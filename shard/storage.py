"""Durable storage of a shard: per collection, a write-ahead log in segments plus per-bucket snapshots.

Layout under the storage root (a local directory, or a volume every node mounts at the same path)::

    shards/<shard_id>/<collection>/wal-<seq>.log      append-only frames of WalRecord (protos/storage.proto)
    shards/<shard_id>/<collection>/b<bucket>.snap     one BucketSnapshot frame: the bucket's live items
    shards/<shard_id>/<collection>/manifest.json      what every sealed segment and snapshot holds (see below)
    shards/<shard_id>/<collection>/active.mark        what the active segment holds, as acknowledged so far
    shards/<shard_id>/<collection>/ckpt-<n>.*         the newest index checkpoint (shard.checkpoint; not this
                                                      module's files: it only keeps the log they need)

A write is appended as one frame and fsynced before it is acknowledged, so an acknowledged write survives
``kill -9`` of the process or a power cut. One fsync covers a whole batch (every bucket in it), which is why the
log is per shard rather than per bucket. When the active segment passes ``segment_bytes`` it is sealed and a
background compaction folds sealed segments into the bucket snapshots, then deletes them (those the newest index
checkpoint does not cover yet are kept, marked folded, until one does: see :meth:`CollectionStore.compact`).
Compaction is idempotent: re-applying a sealed segment to a snapshot that already holds it changes nothing (last
write wins per id), so a crash half way through only costs the work. A RESET record empties buckets (the shard gave
them away, or takes them on afresh), for replay and compaction alike.

Another shard reads buckets from here with :func:`read_buckets` while this one keeps writing and compacting: that
is how a bucket moves (see control.controller).

Every frame carries a CRC-32 and every record is parsed and checked when it is read. Anything that does not
check out is damage: the file (a copy of it, for a log segment) is kept aside in
``<collection>/damaged/<name>.<UTC time>`` with a ``.json`` note, never deleted or loaded as it is, and
:attr:`CollectionStore.damage` reports it. A damaged snapshot is moved aside, so its bucket is served from what the
log still holds. A damaged log segment keeps its valid frames: those before the damage and those after it, found
again by scanning for the next frame whose length, checksum and record all check out; the segment is rewritten
with them.

Every file is accounted for, so that one that goes missing or loses its end is damage too, reported with what it
held. ``manifest.json`` (replaced atomically: temporary file, fsync, rename, fsync of the directory) records for
each sealed segment its records, ids, bytes and a CRC-32 chained over its frames' headers (a :class:`_Tally`), and
for each snapshot its items, bytes and frame CRC; it is rewritten when a segment is sealed and by compaction, never
per write. The active segment's tally is in ``active.mark``: 36 bytes and their CRC, overwritten in place after
each append's fsync, without an fsync of its own (a second fsync per write would halve the write rate). It never
counts a write the log does not hold durably: it is written after the log's fsync. A crash of the process keeps it
(the page cache survives); a power cut may lose its last updates, which only makes it count fewer writes. So on
open, the active segment must hold at least the frames the mark counts: a frame cut short at its very end, past
what the mark counts, is a write a crash interrupted, never acknowledged, and is dropped silently; anything
shorter is damage. Sealed segments and snapshots must match the manifest exactly. Crashes between the steps of
sealing and compaction leave states the manifest allows (see :meth:`CollectionStore.compact`); a store written
before manifests existed is adopted as it is found.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import logging
import os
import pathlib
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from google.protobuf.message import DecodeError

from lookalike.errors import InvalidArgument, ResourceExhausted
from lookalike.ids import buckets_of
from lookalike.wire import vectors_from_proto_raw, vectors_to_proto
from protos import storage_pb2

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
UPSERT = storage_pb2.WalRecord.UPSERT
DELETE = storage_pb2.WalRecord.DELETE
RESET = storage_pb2.WalRecord.RESET
MANIFEST = "manifest.json"
MARK = "active.mark"
_MARK = struct.Struct("<QQQQI")  # active segment's number, then its _Tally: records, ids, bytes, crc
_CRC = struct.Struct("<I")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a write refused for want of space: ResourceExhausted, not INTERNAL


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


# --- checking what is read ------------------------------------------------------------------------------------
DAMAGED_DIR = "damaged"
# The first byte of a serialized WalRecord or BucketSnapshot: the tag of one of their fields 1-5 (a frame is never
# empty). Lets the scan for the next frame after damage skip almost every offset without computing a checksum.
_FIELD_TAGS = np.zeros(256, dtype=bool)
_FIELD_TAGS[[0x08, 0x12, 0x1A, 0x22, 0x2A]] = True
_SCAN_CHUNK = 1 << 20


class _Corrupt(Exception):
    """The bytes at an offset are not a whole frame with a matching checksum."""


class _Invalid(Exception):
    """A frame whose checksum matches but whose record does not parse or is inconsistent. ``end``: where the
    frame ends (its length is trustworthy, so reading goes on there)."""

    end = 0


@dataclass
class _Gap:
    """Bytes of a file that hold no valid frame: from ``start`` to ``end`` (None: to the end of the file)."""

    start: int
    end: int | None
    reason: str
    torn: bool = False  # the end of the active segment, cut by a crash mid-append: not damage


@dataclass(frozen=True)
class Damage:
    """A storage file found damaged.

    Attributes:
        file: its name in the collection's directory.
        kind: "snapshot", "wal", "manifest" or "checkpoint" (see shard.checkpoint).
        offset: byte offset where the damage starts (0 for a missing file).
        message: what is wrong, what was lost as far as known (records, ids, items, bytes) and what was done about
            the data (says the offset).
        kept: where the damaged file (a copy of it, for a log segment) was kept aside; "" if the file is missing
            (its note in ``damaged/`` is all there is).
        detected: when (UTC, ISO 8601).
    """

    file: str
    kind: str
    offset: int
    message: str
    kept: str
    detected: str = ""

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" + (f"; kept in {self.kept}" if self.kept else "")


@dataclass
class _Tally:
    """What a log segment holds: its records (frames), the ids they upsert or delete, its bytes, and a CRC-32
    chained over its frames' headers (each holds its record's length and CRC-32, so the chain covers every byte).
    Counted as frames are appended, and again as they are read back."""

    records: int = 0
    items: int = 0
    bytes: int = 0
    crc: int = 0

    def add(self, header: bytes, items: int) -> None:
        self.records += 1
        self.items += items
        self.bytes += _HEADER.size + _HEADER.unpack(header)[0]
        self.crc = zlib.crc32(header, self.crc)

    def lost(self, found: _Tally) -> str:
        """What of this (what was written) is not in ``found`` (the part of it read back), in words."""
        return (f"{self.records - found.records} of the {self.records} records written to it lost "
                f"({self.items - found.items} upserted or deleted ids in {self.bytes - found.bytes} bytes)")


@dataclass
class _Seal:
    """What a snapshot file holds: ``items`` (None: not known, a snapshot adopted from before manifests), its
    ``bytes`` and the CRC-32 in its frame header."""

    items: int | None
    bytes: int
    crc: int

    def same_file(self, other: _Seal) -> bool:
        return (self.bytes, self.crc) == (other.bytes, other.crc)

    def held(self) -> str:
        return "an unknown number of items" if self.items is None else f"{self.items} items"


def _seal_of(path: pathlib.Path) -> _Seal:
    """The size and frame CRC of a snapshot file (its items are not read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = f.read(_HEADER.size)
    return _Seal(None, size, _HEADER.unpack(header)[1] if len(header) == _HEADER.size else 0)


@dataclass
class _Manifest:
    """The contents of ``manifest.json``.

    Attributes:
        active: the segment appended to (its tally is in ``active.mark``).
        segments: sealed segment name -> what it holds.
        snapshots: snapshot name -> what it holds.
        replacing: snapshot name -> what a compaction in progress replaces it with (None: deletes it); until the
            compaction records the result, the file may be either.
        folded: sealed segments already folded into the snapshots, kept because the newest index checkpoint does
            not cover them yet (see :meth:`CollectionStore.compact`); replaying them again changes nothing.
    """

    active: str = ""
    segments: dict[str, _Tally] = field(default_factory=dict)
    snapshots: dict[str, _Seal] = field(default_factory=dict)
    replacing: dict[str, _Seal | None] = field(default_factory=dict)
    folded: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({"format": 1, "active": self.active,
                           "segments": {n: asdict(t) for n, t in sorted(self.segments.items())},
                           "snapshots": {n: asdict(s) for n, s in sorted(self.snapshots.items())},
                           "replacing": {n: s and asdict(s) for n, s in sorted(self.replacing.items())},
                           "folded": sorted(self.folded & set(self.segments))})

    @classmethod
    def from_json(cls, text: str) -> _Manifest:
        """Raises ValueError (or KeyError, TypeError) if ``text`` is no manifest."""
        m = json.loads(text)
        if m.get("format") != 1:
            raise ValueError(f"unknown format {m.get('format')!r}")
        return cls(str(m["active"]), {n: _Tally(**t) for n, t in m["segments"].items()},
                   {n: _Seal(**t) for n, t in m["snapshots"].items()},
                   {n: t and _Seal(**t) for n, t in m["replacing"].items()}, set(m.get("folded", [])))


@dataclass(frozen=True)
class LogPosition:
    """A point in a collection's log: the first ``records`` records of segment ``seq``, which take ``bytes`` bytes
    and whose frame headers chain to CRC-32 ``crc`` (with ``items`` ids upserted or deleted): what an index
    checkpoint covers (everything logged before it), so that a restart replays only what follows. The tally lets
    :meth:`CollectionStore.check_position` tell the same frames from others (a segment rewritten after damage)."""

    seq: int
    records: int
    items: int
    bytes: int
    crc: int

    @property
    def segment(self) -> str:
        return _segment_name(self.seq)

    def same_frames(self, tally: _Tally) -> bool:
        """Whether ``tally`` (of a segment's first frames, read back) counts the frames this position counts."""
        return (tally.records, tally.bytes, tally.crc) == (self.records, self.bytes, self.crc)


def _seq_of(segment: str) -> int:
    return int(segment[len("wal-"):-len(".log")])


def _segment_name(seq: int) -> str:
    return f"wal-{seq:010d}.log"


def _vectors(msg, n: int) -> np.ndarray:
    try:
        x = vectors_from_proto_raw(msg)
    except InvalidArgument as err:
        raise _Invalid(f"bad vectors ({err})") from None
    if len(x) != n:
        raise _Invalid(f"{n} ids but {len(x)} vectors")
    return x


def _payloads(msgs, n: int) -> list[bytes | None]:
    if len(msgs) not in (0, n):
        raise _Invalid(f"{n} ids but {len(msgs)} payloads")
    return _payloads_from_proto(msgs, n)


def _parse_record(body: bytes) -> Batch:
    """A WAL frame's body as a Batch; raises _Invalid if it does not parse or does not hold together."""
    try:
        rec = storage_pb2.WalRecord.FromString(body)
    except DecodeError as err:
        raise _Invalid(f"record does not parse ({err})") from None
    ids = list(rec.ids)
    if rec.op == UPSERT:
        return Batch(UPSERT, ids, _vectors(rec.vectors, len(ids)), _payloads(rec.payloads, len(ids)))
    if rec.op == RESET:
        return Batch(RESET, [], buckets=list(rec.buckets))
    if rec.op == DELETE:
        return Batch(DELETE, ids)
    raise _Invalid(f"unknown operation {rec.op}")


def _parse_snapshot(body: bytes) -> tuple[int, Batch]:
    """(bucket, items) of a snapshot frame's body; raises _Invalid if it does not parse or hold together."""
    try:
        snap = storage_pb2.BucketSnapshot.FromString(body)
    except DecodeError as err:
        raise _Invalid(f"snapshot does not parse ({err})") from None
    ids = list(snap.ids)
    return snap.bucket, Batch(UPSERT, ids, _vectors(snap.vectors, len(ids)), _payloads(snap.payloads, len(ids)))


def _frame_at(f, pos: int, size: int, parse: Callable[[bytes], object]) -> tuple[int, object, bytes]:
    """(offset where it ends, parsed body, header) of the frame at ``pos`` of a file of ``size`` bytes.

    Raises:
        _Corrupt: no whole frame with a matching checksum there.
        _Invalid: the checksum matches but the body is not a valid record.
    """
    f.seek(pos)
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise _Corrupt("incomplete frame header")
    length, crc = _HEADER.unpack(header)
    if length == 0:  # never written (every record has a field): zeros where a frame should be
        raise _Corrupt("empty frame")
    end = pos + _HEADER.size + length
    if end > size:
        raise _Corrupt(f"frame of {length} bytes runs past the end of the file")
    body = f.read(length)
    if len(body) < length:
        raise _Corrupt("frame cut short")
    if zlib.crc32(body) != crc:
        raise _Corrupt("checksum mismatch")
    try:
        return end, parse(body), header
    except _Invalid as err:
        err.end = end
        raise


def _scan_frames(f, size: int, parse: Callable[[bytes], object], gaps: list[_Gap],
                 active: bool = False, start: int = 0) -> Iterator[tuple[int, int, object, bytes]]:
    """Yields (start, end, parsed body, header) for the valid frames of a file of ``size`` bytes, in order, and
    appends what lies between them to ``gaps``. After a bad frame it goes on at the next offset where a valid frame
    starts (:func:`_resync`). ``active``: the file is the segment being appended to, whose tail a crash may have cut
    (whether it did is for :func:`_assess` to say). ``start``: where a frame starts (0: the first)."""
    pos = start
    while pos < size:
        try:
            end, value, header = _frame_at(f, pos, size, parse)
        except _Invalid as bad:  # the checksum holds, so the frame's length does: the next frame follows it
            gaps.append(_Gap(pos, bad.end, str(bad)))
            pos = bad.end
            continue
        except _Corrupt as bad:
            nxt = _resync(f, pos + 1, size, parse)
            gaps.append(_Gap(pos, nxt, str(bad), torn=nxt is None and active and _torn_tail(f, pos, size)))
            if nxt is None:
                return
            pos = nxt
            continue
        yield pos, end, value, header
        pos = end


def _torn_tail(f, pos: int, size: int) -> bool:
    """Whether what follows ``pos`` (where no valid frame follows) can be one append a crash cut: a frame that
    reaches the end of the file, then at most zeros (a filesystem may extend a file before writing its data)."""
    f.seek(pos)
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return True
    length, crc = _HEADER.unpack(header)
    if length != size - pos - _HEADER.size and zlib.crc32(f.read()) == crc:
        return False  # the whole frame is there, its length field is what is damaged
    end = pos + _HEADER.size + length
    if end >= size:
        return True
    f.seek(end)
    while chunk := f.read(_SCAN_CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _resync(f, start: int, size: int, parse: Callable[[bytes], object]) -> int | None:
    """The first offset at or after ``start`` where a valid frame starts that is followed by the end of the file
    or by what looks like another frame's header; None if there is none.

    A frame hidden in the middle of another one's data (an upsert's vectors or payloads) would need its length,
    its CRC-32, a record that parses and checks, and the header after it to line up by chance."""
    f.seek(start)
    buf = f.read(size - start)
    n = len(buf)
    a = np.frombuffer(buf, dtype=np.uint8)
    view = memoryview(buf)
    zeros_from = None  # where the zeros that end the buffer start
    for q in _candidates(a):
        length, crc = _HEADER.unpack_from(buf, q)
        end = q + _HEADER.size + length
        if end < n and not _looks_like_header(a, end):
            if zeros_from is None:
                zeros_from = len(buf.rstrip(b"\0"))
            if end < zeros_from:
                continue
        if zlib.crc32(view[q + _HEADER.size:end]) != crc:
            continue
        try:
            parse(bytes(view[q + _HEADER.size:end]))
        except _Invalid:
            continue
        return start + q
    return None


def _candidates(a: np.ndarray) -> Iterator[int]:
    """Offsets in ``a`` where a frame could start: a length that is not zero and fits, then a field tag."""
    n = len(a)
    hdr = _HEADER.size
    for lo in range(0, max(0, n - hdr), _SCAN_CHUNK):
        hi = min(n - hdr, lo + _SCAN_CHUNK)  # offsets lo..hi-1: their body's first byte is in the buffer
        w = a[lo:hi + 3].astype(np.int64)
        m = hi - lo
        length = w[:m] | (w[1:m + 1] << 8) | (w[2:m + 2] << 16) | (w[3:m + 3] << 24)
        ok = (length > 0) & (length <= n - hdr - np.arange(lo, hi)) & _FIELD_TAGS[a[lo + hdr:hi + hdr]]
        yield from (lo + np.flatnonzero(ok)).tolist()


def _looks_like_header(a: np.ndarray, pos: int) -> bool:
    """Whether the bytes at ``pos`` could start a frame, possibly one a crash cut (the end of the file). (Zeros to
    the end of the file, a filesystem's fill after a crash, are checked by the caller.)"""
    n = len(a)
    if n - pos < _HEADER.size:
        return True
    length = int(a[pos]) | int(a[pos + 1]) << 8 | int(a[pos + 2]) << 16 | int(a[pos + 3]) << 24
    return length > 0 and (n - pos == _HEADER.size or bool(_FIELD_TAGS[a[pos + _HEADER.size]]))


def _damage_summary(gaps: list[_Gap], size: int) -> tuple[int, str]:
    """(offset, message) describing the damaged ranges of a log segment."""
    first = gaps[0]
    lost = sum((g.end if g.end is not None else size) - g.start for g in gaps)
    msg = f"{first.reason} at byte {first.start}"
    if len(gaps) > 1:
        msg += f" and {len(gaps) - 1} more damaged range(s)"
    if gaps[-1].end is None:
        msg += f"; {lost} bytes lost; the frames before it were loaded, nothing after it could be read"
    else:
        msg += f"; {lost} bytes lost; the frames before and after were loaded"
    return first.start, msg


def _assess(gaps: list[_Gap], size: int, expected: _Tally | None, ack: _Tally) -> tuple[int, str] | None:
    """(offset, message) describing the damage of a log segment of ``size`` bytes; None if it has none.

    Args:
        gaps: its ranges that hold no valid frame. A torn tail among them (see :func:`_scan_frames`) is damage after
            all if it starts within ``expected``: a crash cannot cut a write that was acknowledged.
        expected: what was written to it and acknowledged; None if not known (a segment adopted from a store
            written before manifests, or an active segment whose mark is gone).
        ack: what its valid frames within the first ``expected.bytes`` bytes hold.
    """
    cut = False  # a torn-looking tail that cuts acknowledged writes
    if expected is not None:
        for g in gaps:
            if g.torn and g.start < expected.bytes:
                g.torn, cut = False, True
    damaged = [g for g in gaps if not g.torn]
    short = expected is not None and ack.records < expected.records
    if damaged:
        offset, message = _damage_summary(damaged, size)
        if short:
            message += f"; {expected.lost(ack)}"
        if cut:
            message += f"; not a write cut short by a crash: {expected.bytes} bytes had been acknowledged"
        return offset, message
    if short:
        return ack.bytes, (f"cut short at byte {ack.bytes}, where {expected.bytes} bytes had been written; "
                           f"{expected.lost(ack)}")
    if expected is not None and (ack.bytes, ack.crc) != (expected.bytes, expected.crc):
        return 0, (f"its {ack.records} records are not those written to it (CRC-32 of their headers {ack.crc:08x}, "
                   f"{expected.crc:08x} when written); they were loaded as they are")
    return None


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

    Attributes:
        damage: the damaged files found in this directory (see the module's docstring), those set aside by earlier
            runs included (their notes in ``damaged/``), oldest first.
    """

    def __init__(self, path: pathlib.Path, n_buckets: int, segment_bytes: int = 64 << 20):
        self.path = pathlib.Path(path)
        self.n_buckets = n_buckets
        self.segment_bytes = segment_bytes
        self.compact_pass_bytes = 16 << 20
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()           # appends and segment rotation
        self._compact_lock = threading.Lock()   # one compaction at a time
        self._manifest_lock = threading.Lock()  # self._manifest and its file; taken last, held briefly
        self._fd: int | None = None
        self._mark_fd: int | None = None
        self._seq = 0
        self._tally = _Tally()  # what the active segment holds
        self._closed = False
        self._undo: tuple | None = None  # (segment, tally before the last record): what retract restores
        # Index checkpoints (shard.checkpoint): compaction deletes only segments before ``_keep_from``, the segment
        # of the newest checkpoint's position (None: no checkpoint, delete every segment it folded), or before
        # ``_pinned``, that of a checkpoint being written. Both under _manifest_lock.
        self._keep_from: int | None = None
        self._pinned: int | None = None
        self.replayed_records = 0  # log records :meth:`load` yielded, in all
        self.damage: list[Damage] = self._earlier_damage()
        if self.damage:
            log.warning("storage %s: %d damaged file(s) set aside earlier, in %s: %s", self.path, len(self.damage),
                        self.path / DAMAGED_DIR, "; ".join(map(str, self.damage)))
        self._reported: set[tuple[str, int, str]] = set()  # (file, offset, how) already reported by this run
        manifest = self._read_manifest()
        self._manifest = manifest or _Manifest()
        self._manifest_dirty = False  # learnt the items of snapshots adopted from before manifests
        self._check_snapshots(known=manifest is not None)
        self._check_segments(known=manifest is not None)

    # --- accounting -----------------------------------------------------------------------------------------
    def _read_manifest(self) -> _Manifest | None:
        """The manifest; None if there is none (a new store, or one written before manifests) or it is damaged (set
        aside and reported). Without one, the files found are adopted as they are."""
        path = self.path / MANIFEST
        try:
            return _Manifest.from_json(path.read_text())
        except FileNotFoundError:
            if any(self.path.glob("wal-*.log")) or any(self.path.glob("b*.snap")):
                log.info("storage %s: no %s (written before manifests): adopting its files as they are", self.path,
                         MANIFEST)
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._set_aside(path, "manifest", 0, f"unreadable ({err}); the log segments and snapshots found were "
                            "adopted as they are: whether any went missing or lost their end cannot be told", "move")
            return None

    def _save_manifest(self) -> None:
        """Replaces manifest.json with ``self._manifest``, atomically and durably. The caller holds _manifest_lock."""
        tmp = self.path / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(self._manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        _fsync_dir(self.path)

    def _read_mark(self, active: str) -> _Tally | None:
        """The tally of segment ``active`` from the mark; None if the mark is missing, unreadable (both warned
        about: the end of the active segment cannot be checked) or of another segment (a crash between sealing a
        segment and moving the mark to the next one)."""
        try:
            data = (self.path / MARK).read_bytes()
        except FileNotFoundError:
            data = b""
        if len(data) != _MARK.size + _CRC.size or _CRC.unpack_from(data, _MARK.size)[0] != zlib.crc32(
                data[:_MARK.size]):
            log.warning("storage %s: %s is missing or unreadable: whether the end of the active log segment holds "
                        "every acknowledged write cannot be checked this time", self.path, MARK)
            return None
        seq, *tally = _MARK.unpack_from(data)
        return _Tally(*tally) if active and seq == _seq_of(active) else None

    def _write_mark(self, sync: bool = False) -> None:
        t = self._tally
        data = _MARK.pack(self._seq, t.records, t.items, t.bytes, t.crc)
        os.pwrite(self._mark_fd, data + _CRC.pack(zlib.crc32(data)), 0)
        if sync:
            os.fsync(self._mark_fd)

    # --- checking what is there on open ---------------------------------------------------------------------
    def _check_snapshots(self, known: bool) -> None:
        """Checks the snapshots against the manifest (``known``: there is one): one missing, or not the one written
        last (its size or checksum differ), is damage; the latter is set aside. Only their headers are read here;
        loading them checks the rest. Snapshots the manifest does not know are adopted."""
        m = self._manifest
        if known:
            for name in sorted(set(m.snapshots) | set(m.replacing)):
                written = m.snapshots.pop(name, None)
                allowed = [written] + ([m.replacing[name]] if name in m.replacing else [])  # None: no file
                path = self.path / name
                if not path.exists():
                    if None not in allowed:
                        self._snapshot_gone(path, written)
                    continue
                found = _seal_of(path)
                match = next((s for s in allowed if s is not None and s.same_file(found)), None)
                if match is not None:
                    m.snapshots[name] = match
                elif any(s is not None for s in allowed):
                    self._reject_snapshot(path, next(s for s in allowed if s is not None), found)
            m.replacing = {}
        for path in sorted(self.path.glob("b*.snap")):
            if path.name not in m.snapshots:
                if known:
                    log.info("storage %s: adopting %s, which the manifest does not know", self.path, path.name)
                m.snapshots[path.name] = _seal_of(path)

    def _snapshot_gone(self, path: pathlib.Path, written: _Seal) -> None:
        self._set_aside(path, "snapshot", 0, "snapshot missing; its bucket is served from what the log holds, the "
                        f"items only in this snapshot are missing (it held {written.held()}, {written.bytes} bytes)",
                        "gone")

    def _reject_snapshot(self, path: pathlib.Path, written: _Seal, found: _Seal) -> None:
        """Sets aside a snapshot that is not the one written (reported as damaged if it is, as a stranger if not)."""
        try:
            _read_snapshot(path, int(path.stem[1:]))
            offset, reason = 0, (f"not the snapshot written last ({found.bytes} bytes, CRC-32 {found.crc:08x}; "
                                 f"written: {written.bytes} bytes, {written.crc:08x})")
        except _Damaged as err:
            offset, reason = err.offset, f"{err.reason} at byte {err.offset}"
        self._set_aside(path, "snapshot", offset, f"{reason}; its bucket is served from what the log holds, the "
                        f"items only in this snapshot are missing (it held {written.held()})", "move")

    def _segments(self) -> list[pathlib.Path]:
        return sorted(self.path.glob("wal-*.log"))

    def _check_segments(self, known: bool) -> None:
        """Reads the whole log before it is used, checks every segment against what was written to it (the
        manifest's tally for a sealed segment, the mark's for the active one; ``known``: there is a manifest) and
        opens the active segment. A missing segment is reported with what it held. A torn tail of the active
        segment, past what the mark counts, is cut off so that new frames follow valid ones; a damaged segment is
        copied aside, then rewritten with its valid frames, so that replay, compaction and other shards reading it
        all see the same frames."""
        m = self._manifest
        on_disk = [p.name for p in self._segments()]
        mark = self._read_mark(m.active) if known else None
        active = max([_seq_of(n) for n in on_disk] + ([_seq_of(m.active)] if m.active else []), default=1)
        if known:
            for name in sorted(set(m.segments) - set(on_disk)):
                lost = m.segments.pop(name).lost(_Tally())
                self._set_aside(self.path / name, "wal", 0, f"log segment missing: {lost}", "gone")
            if m.active and m.active not in on_disk:  # created before the manifest named it: never a crash's doing
                if mark is None:
                    self._set_aside(self.path / m.active, "wal", 0, "the active log segment is missing; what it held "
                                    f"is not known ({MARK} is gone or of another segment)", "gone")
                elif mark.records:
                    self._set_aside(self.path / m.active, "wal", 0,
                                    f"the active log segment is missing: {mark.lost(_Tally())}", "gone")
        tally = _Tally()
        for name in on_disk:
            if known and name in m.segments:
                expected = m.segments[name]
            elif known and name == m.active:
                expected = mark
            else:  # written before manifests, or left by a crash between two steps (see _rotate_locked, compact)
                expected = None
            tally = self._check_segment(self.path / name, expected, active=_seq_of(name) == active)
            if _seq_of(name) != active:
                m.segments[name] = tally
        m.segments.pop(_segment_name(active), None)
        self._open_active(active, tally if _segment_name(active) in on_disk else _Tally())

    def _check_segment(self, seg: pathlib.Path, expected: _Tally | None, active: bool) -> _Tally:
        """Checks a segment against what was written to it (see :func:`_assess`); reports damage (keeping a copy),
        then rewrites the segment with its valid frames if some are damaged, or cuts off its torn tail. Returns what
        it holds afterwards."""
        gaps: list[_Gap] = []
        kept: list[tuple[int, int]] = []
        found, ack = _Tally(), _Tally()
        with open(seg, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for start, end, batch, header in _scan_frames(f, size, _parse_record, gaps, active=active):
                kept.append((start, end))
                found.add(header, len(batch.ids))
                if expected is not None and end <= expected.bytes:
                    ack.add(header, len(batch.ids))
        problem = _assess(gaps, size, expected, ack)
        if problem is not None:
            self._set_aside(seg, "wal", *problem, "copy")
        if any(not g.torn for g in gaps):
            self._rewrite_segment(seg, kept)
        elif gaps:  # a write a crash cut short: it was never acknowledged
            log.warning("%s: torn frame at byte %d (a write cut short by a crash, never acknowledged); "
                        "cutting it off", seg, gaps[0].start)
            with open(seg, "r+b") as f:
                f.truncate(gaps[0].start)
                os.fsync(f.fileno())
        return found

    def _rewrite_segment(self, seg: pathlib.Path, kept: list[tuple[int, int]]) -> None:
        """Replaces a segment with the byte ranges ``kept`` of it (its valid frames), atomically."""
        tmp = seg.with_suffix(".tmp")
        with open(seg, "rb") as src, open(tmp, "wb") as dst:
            for start, end in kept:
                src.seek(start)
                dst.write(src.read(end - start))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, seg)
        _fsync_dir(self.path)

    def _open_active(self, seq: int, tally: _Tally) -> None:
        """Opens (creates) active segment ``seq`` holding ``tally``, then its mark, then names them in the manifest:
        in that order, so that the manifest never names a segment that was not created (a crash in between leaves
        one it does not know, adopted on the next open)."""
        self._seq = seq
        name = _segment_name(seq)
        self._fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        assert os.fstat(self._fd).st_size == tally.bytes, f"{name} changed while it was checked"
        self._tally = tally
        self._mark_fd = os.open(self.path / MARK, os.O_RDWR | os.O_CREAT, 0o644)
        self._write_mark(sync=True)
        _fsync_dir(self.path)
        with self._manifest_lock:
            self._manifest.active = name
            self._save_manifest()

    # --- writing --------------------------------------------------------------------------------------------
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
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except BaseException as err:
                # Cut off what was written (a full disk, a failed fsync): it is not acknowledged, and frames
                # acknowledged later must not follow a torn one (nor lie past what the mark counts).
                try:
                    os.ftruncate(self._fd, self._tally.bytes)
                except OSError:
                    pass
                if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
                    raise ResourceExhausted(
                        f"the shard's storage at {self.path} is full ({os.strerror(err.errno)}): free space or give "
                        "it a larger volume; the write was not stored") from err
                raise
            self._undo = (self._seq, replace(self._tally))  # see retract
            self._tally.add(frame[:_HEADER.size], len(rec.ids))
            # After the fsync: the mark never counts a write the log does not hold durably. No fsync of its own
            # (see the module's docstring).
            self._move_mark()
            if self._tally.bytes >= self.segment_bytes:
                try:
                    self._rotate_locked()
                    rotate = True
                except OSError:  # the write is durable all the same: keep appending here, seal at the next one
                    log.exception("storage %s: sealing segment %d failed", self.path, self._seq)
        if rotate:
            self.compact_soon()

    def _rotate_locked(self) -> None:
        """Seals the active segment and starts the next one. The next file is created (and the directory fsynced)
        before the manifest records the seal, and the mark moves to it after: a crash in between leaves a segment
        the manifest does not know (adopted: it is empty) or a mark of the sealed segment (ignored)."""
        seq = self._seq + 1
        path = self.path / _segment_name(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _fsync_dir(self.path)
            with self._manifest_lock:
                sealed, active = _segment_name(self._seq), self._manifest.active
                self._manifest.segments[sealed] = self._tally
                self._manifest.active = path.name
                try:
                    self._save_manifest()
                except Exception:
                    del self._manifest.segments[sealed]
                    self._manifest.active = active
                    raise
        except Exception:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd, self._seq, self._tally = fd, seq, _Tally()
        self._undo = None  # the last record is sealed in: it cannot be taken back
        self._move_mark()

    def retract(self) -> bool:
        """Takes the last appended record back out of the log: its write could not be applied, so it must never be
        replayed. The caller holds the write order (no append since). Returns False when that is no longer
        possible (the record's segment was sealed since; replaying it then fails again, and the shard quarantines
        the collection)."""
        with self._lock:
            undo, self._undo = self._undo, None
            if undo is None or undo[0] != self._seq or self._closed:
                return False
            os.ftruncate(self._fd, undo[1].bytes)
            os.fsync(self._fd)
            self._tally = undo[1]
            self._write_mark(sync=True)  # a mark counting the record would report the cut as damage
            return True

    def _move_mark(self) -> None:
        try:
            self._write_mark()
        except OSError:  # the writes are durable all the same; a mark that counts less is never wrong
            log.exception("storage %s: updating %s failed", self.path, MARK)

    # --- reading --------------------------------------------------------------------------------------------
    def _read_segment(self, path: pathlib.Path, active: bool = False,
                      expected: _Tally | None = None, start: int = 0) -> Iterator[Batch]:
        """The records of a segment (from byte ``start``, where a frame starts). Damage (found after the store was
        opened) is reported, the segment copied aside, and reading goes on after it (see :func:`_scan_frames`); so
        is a segment that holds fewer records than ``expected`` (see :func:`_assess`)."""
        gaps: list[_Gap] = []
        ack = _Tally()
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for _, end, batch, header in _scan_frames(f, size, _parse_record, gaps, active, start):
                if expected is not None and end <= expected.bytes:
                    ack.add(header, len(batch.ids))
                yield batch
        problem = _assess(gaps, size, expected, ack)
        if problem is not None:
            self._set_aside(path, "wal", *problem, "copy")

    def _load_snapshot(self, path: pathlib.Path) -> Batch | None:
        """A bucket snapshot's items; None, after moving it aside and reporting it, if it is damaged."""
        try:
            batch = _read_snapshot(path, int(path.stem[1:]))
        except _Damaged as err:
            with self._manifest_lock:
                written = self._manifest.snapshots.get(path.name)
            held = f" (it held {written.held()})" if written is not None else ""
            self._set_aside(path, "snapshot", err.offset, f"{err.reason} at byte {err.offset}; its bucket is "
                            f"served from what the log holds, the items only in this snapshot are missing{held}",
                            "move")
            with self._manifest_lock:
                self._manifest.snapshots.pop(path.name, None)
                self._save_manifest()
            return None
        with self._manifest_lock:
            written = self._manifest.snapshots.get(path.name)
            if written is not None and written.items is None:
                written.items = len(batch.ids)
                self._manifest_dirty = True
        return batch

    # --- damage ---------------------------------------------------------------------------------------------
    def damaged(self) -> list[str]:
        """The damaged files, one line each, for stats."""
        return [str(d) for d in list(self.damage)]

    def _set_aside(self, path: pathlib.Path, kind: str, offset: int, message: str, how: str) -> None:
        """Reports a damaged file and keeps it aside in ``damaged/`` with a note. ``how``: "move" it there, "copy"
        it (a log segment: compaction may read it several times before deleting it; it is copied once per damage
        found), or "gone": it is missing, there is only the note."""
        if how != "move":
            key = (path.name, offset, how)
            if key in self._reported:
                return
            self._reported.add(key)
        now = datetime.datetime.now(datetime.UTC)
        folder = self.path / DAMAGED_DIR
        folder.mkdir(exist_ok=True)
        dest = folder / f"{path.name}.{now:%Y%m%dT%H%M%SZ}"
        n = 1
        while dest.exists() or dest.with_name(dest.name + ".json").exists():
            dest = folder / f"{path.name}.{now:%Y%m%dT%H%M%SZ}.{n}"
            n += 1
        if how == "move":
            os.replace(path, dest)
        elif how == "copy":
            with open(path, "rb") as src, open(dest, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        damage = Damage(path.name, kind, offset, message, "" if how == "gone" else str(dest),
                        now.isoformat(timespec="seconds"))
        with open(dest.with_name(dest.name + ".json"), "w") as note:
            note.write(json.dumps(asdict(damage), indent=1) + "\n")
            note.flush()
            os.fsync(note.fileno())
        _fsync_dir(folder)
        _fsync_dir(self.path)
        self.damage.append(damage)
        log.error("storage %s: damaged file %s", self.path, damage)

    def _earlier_damage(self) -> list[Damage]:
        """What earlier runs set aside, from their notes (until an operator removes them)."""
        out = []
        for note in sorted((self.path / DAMAGED_DIR).glob("*.json")):
            try:
                out.append(Damage(**json.loads(note.read_text())))
            except (OSError, ValueError, TypeError) as err:
                log.warning("%s: unreadable note (%s)", note, err)
        return sorted(out, key=lambda d: d.detected)

    def load(self, buckets: set[int] | None = None, after: LogPosition | None = None) -> Iterator[Batch]:
        """Everything stored, in order, as batches to apply: snapshots first, then the log.

        Args:
            buckets: keep only items of these buckets (None: all).
            after: only the records logged after this position (an index checkpoint holds the rest; the caller
                checked it with :meth:`check_position`): no snapshots, no earlier segment.
        """
        # Compaction rewrites snapshots and deletes segments: hold it off while reading.
        with self._compact_lock:
            if after is None:
                # Snapshots hold disjoint ids: coalesce them into large batches.
                snapshots = (self._load_snapshot(path) for path in sorted(self.path.glob("b*.snap"))
                             if buckets is None or int(path.stem[1:]) in buckets)
                yield from _coalesce((b for b in snapshots if b is not None and b.ids), _LOAD_BATCH)
            segs = self._segments()
            if after is not None:
                segs = [seg for seg in segs if _seq_of(seg.name) >= after.seq]
            for i, seg in enumerate(segs):
                start = after.bytes if after is not None and _seq_of(seg.name) == after.seq else 0
                for batch in self._read_segment(seg, active=i == len(segs) - 1, start=start):
                    self.replayed_records += 1
                    if buckets is not None:
                        batch = _filter(batch, buckets, self.n_buckets)
                    if batch.ids or batch.buckets:
                        yield batch
            with self._manifest_lock:
                if self._manifest_dirty:
                    self._save_manifest()
                    self._manifest_dirty = False

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

    def compact_soon(self) -> None:
        """Starts a compaction in the background (e.g. after a RESET, so that the snapshots of buckets given away
        are deleted now rather than once the log fills a segment)."""
        threading.Thread(target=self._compact_quietly, name=f"compact-{self.path.name}", daemon=True).start()

    def compact(self) -> int:
        """Folds every sealed segment into bucket snapshots and deletes the segments. Returns segments folded.

        The steps, each one durable before the next starts; a crash after any of them leaves a state the next open
        accepts without reporting damage:

        1. seal the active segment (:meth:`_rotate_locked`);
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
        with self._compact_lock:
            with self._lock:
                if self._closed:
                    return 0
                if self._tally.bytes > 0:
                    self._rotate_locked()
            with self._manifest_lock:
                recorded = dict(self._manifest.segments)
                folded = set(self._manifest.folded)
            if not recorded:
                return 0
            sealed = []
            for name, tally in sorted(recorded.items()):
                if not (self.path / name).exists():
                    self._set_aside(self.path / name, "wal", 0, f"log segment missing: {tally.lost(_Tally())}",
                                    "gone")
                elif name not in folded:
                    sealed.append((self.path / name, tally))
            # Fold in passes over groups of buckets so that one pass holds about compact_pass_bytes of rows.
            sealed_bytes = sum(seg.stat().st_size for seg, _ in sealed)
            passes = max(1, min(self.n_buckets, -(-sealed_bytes // self.compact_pass_bytes)))
            touched = 0
            for group in range(passes):
                touched += self._compact_pass(sealed, passes, group)
            with self._manifest_lock:
                horizon = self._horizon()
                for name in recorded:
                    if horizon is None or _seq_of(name) < horizon or not (self.path / name).exists():
                        self._manifest.segments.pop(name, None)
                        self._manifest.folded.discard(name)
                    else:
                        self._manifest.folded.add(name)
                self._save_manifest()
            deleted = [name for name in recorded if name not in self._manifest.segments]
            for name in deleted:
                (self.path / name).unlink(missing_ok=True)
            _fsync_dir(self.path)
            log.info("compacted %d segment(s) of %s into %d bucket snapshot(s) in %d pass(es); %d segment(s) deleted",
                     len(sealed), self.path, touched, passes, len(deleted))
            release_memory()
            return len(sealed)

    # --- index checkpoints (see shard.checkpoint) -----------------------------------------------------------
    def _horizon(self) -> int | None:
        """The first segment compaction must keep (None: none). The caller holds _manifest_lock."""
        marks = [s for s in (self._keep_from, self._pinned) if s is not None]
        return min(marks) if marks else None

    def pin_position(self) -> LogPosition | None:
        """The current end of the log, for a checkpoint of what memory holds: the caller holds the collection's
        write order, so every record logged so far is applied and none is appended meanwhile. Until
        :meth:`checkpointed` or :meth:`unpin`, compaction keeps the position's segment and those after it (a
        compaction that sealed it after this call decides what to delete after it too). None once closed."""
        with self._lock:
            if self._closed:
                return None
            with self._manifest_lock:
                self._pinned = self._seq if self._pinned is None else min(self._pinned, self._seq)
            t = self._tally
            return LogPosition(self._seq, t.records, t.items, t.bytes, t.crc)

    def unpin(self) -> None:
        """The checkpoint being written failed: compaction keeps only what the newest complete one needs."""
        with self._manifest_lock:
            self._pinned = None

    def checkpointed(self, position: LogPosition | None) -> None:
        """A checkpoint covering everything before ``position`` is complete (or, at load, is the one in use; None:
        there is none): compaction may delete the segments before the position's one from now on."""
        with self._manifest_lock:
            self._keep_from = position.seq if position is not None else None
            self._pinned = None

    def trim_log(self) -> int:
        """Deletes the segments that compaction folded and kept until a checkpoint covered them, now that one does.
        Returns how many. Waits for a compaction in progress."""
        with self._compact_lock:
            with self._manifest_lock:
                horizon = self._horizon()
                gone = sorted(n for n in self._manifest.folded & set(self._manifest.segments)
                              if horizon is None or _seq_of(n) < horizon)
                if not gone or self._closed:
                    return 0
                for name in gone:
                    self._manifest.segments.pop(name)
                    self._manifest.folded.discard(name)
                self._save_manifest()
            for name in gone:
                (self.path / name).unlink(missing_ok=True)
            _fsync_dir(self.path)
            log.info("storage %s: deleted %d compacted log segment(s) a checkpoint now covers", self.path, len(gone))
            return len(gone)

    def check_position(self, position: LogPosition) -> str | None:
        """Why the log no longer holds ``position`` as it was when a checkpoint recorded it (its segment is gone,
        holds fewer records, or other frames: rewritten after damage), or None if it does. Reads only the headers
        of the records before the position (the store checked every frame when it opened)."""
        with self._compact_lock:
            path = self.path / position.segment
            tally = _Tally()
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    while tally.records < position.records and tally.bytes + _HEADER.size <= size:
                        f.seek(tally.bytes)
                        header = f.read(_HEADER.size)
                        length = _HEADER.unpack(header)[0]
                        if length == 0 or tally.bytes + _HEADER.size + length > size:
                            break
                        tally.add(header, 0)
            except FileNotFoundError:
                return f"log segment {position.segment} is gone"
            if tally.records < position.records:
                return (f"log segment {position.segment} holds {tally.records} records, the checkpoint covers "
                        f"{position.records} of it")
            if not position.same_frames(tally):
                return (f"the first {position.records} records of log segment {position.segment} are not those the "
                        f"checkpoint covers ({tally.bytes} bytes, CRC-32 of their headers {tally.crc:08x}; "
                        f"{position.bytes} bytes, {position.crc:08x} when it was written)")
            return None

    def report_damage(self, path: pathlib.Path, kind: str, offset: int, message: str,
                      companions: tuple[pathlib.Path, ...] = ()) -> None:
        """Reports a damaged file of this directory and moves it aside to ``damaged/`` like a damaged snapshot (see
        the module's docstring); ``companions``, files that belong with it (the other files of a checkpoint), are
        moved there too, beside it."""
        self._set_aside(path, kind, offset, message, "move" if path.exists() else "gone")
        folder = self.path / DAMAGED_DIR
        kept = self.damage[-1].kept
        stamp = kept[len(str(folder / path.name)):] if kept else ""  # ".<UTC time>[.n]": kept beside it
        for other in companions:
            if other.exists():
                os.replace(other, folder / (other.name + (stamp or f".{self.damage[-1].detected}")))
        _fsync_dir(folder)
        _fsync_dir(self.path)

    def _compact_pass(self, sealed: list[tuple[pathlib.Path, _Tally]], passes: int, group: int) -> int:
        """Folds the writes of buckets ``b % passes == group``; returns the snapshots rewritten."""
        # bucket -> {id: (row, payload)} or None for a delete, in log order
        changes: dict[int, dict[str, tuple[np.ndarray, bytes | None] | None]] = {}
        resets: set[int] = set()  # buckets whose snapshot is replaced rather than updated
        for seg, tally in sealed:
            for batch in self._read_segment(seg, expected=tally):
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
            new[_snapshot_path(self.path, bucket).name] = self._write_snapshot(bucket, ch, bucket in resets)
        with self._manifest_lock:
            self._manifest.replacing = {name: seal for name, (_, seal) in new.items()}
            self._save_manifest()
        for name, (tmp, _) in new.items():
            if tmp is None:
                (self.path / name).unlink(missing_ok=True)
            else:
                os.replace(tmp, self.path / name)
        _fsync_dir(self.path)
        with self._manifest_lock:
            for name, (_, seal) in new.items():
                if seal is None:
                    self._manifest.snapshots.pop(name, None)
                else:
                    self._manifest.snapshots[name] = seal
            self._manifest.replacing = {}
            self._save_manifest()
        return len(new)

    def _write_snapshot(self, bucket: int, changes: dict,
                        reset: bool = False) -> tuple[pathlib.Path | None, _Seal | None]:
        """Writes a bucket's snapshot with ``changes`` applied (to an empty one if ``reset``) to a temporary file:
        (that file, what it holds), or (None, None) if the bucket is left empty (its snapshot is to be deleted)."""
        path = _snapshot_path(self.path, bucket)
        items: dict[str, tuple[np.ndarray, bytes | None]] = {}
        old = None if reset else self._current_snapshot(path)
        if old is not None:
            for i, uid in enumerate(old.ids):
                items[uid] = (old.vectors[i], old.payloads[i])
        for uid, change in changes.items():
            items.pop(uid, None)
            if change is not None:
                items[uid] = change
        if not items:
            return None, None
        rows = np.stack([v[0] for v in items.values()])
        snap = storage_pb2.BucketSnapshot(bucket=bucket, ids=list(items))
        snap.vectors.CopyFrom(vectors_to_proto(rows))
        snap.payloads.extend(_payloads_to_proto([v[1] for v in items.values()]))
        data = _frame(snap.SerializeToString())
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp, _Seal(len(items), len(data), _HEADER.unpack_from(data)[1])

    def _current_snapshot(self, path: pathlib.Path) -> Batch | None:
        """The items of the snapshot compaction folds changes into; None if there is none, or if it is not what the
        manifest records (reported: missing, or set aside)."""
        with self._manifest_lock:
            written = self._manifest.snapshots.get(path.name)
        if not path.exists():
            if written is not None:
                self._snapshot_gone(path, written)
                with self._manifest_lock:
                    self._manifest.snapshots.pop(path.name, None)
            return None
        found = _seal_of(path)
        if written is not None and not written.same_file(found):
            self._reject_snapshot(path, written, found)
            with self._manifest_lock:
                self._manifest.snapshots.pop(path.name, None)
            return None
        return self._load_snapshot(path)

    # --- lifecycle ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the log; waits for a compaction in progress, so the files are quiet afterwards."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._fd is not None:
                    os.close(self._fd)
                if self._mark_fd is not None:
                    try:
                        os.fsync(self._mark_fd)  # a clean close: the next open holds the log to every write
                    finally:
                        os.close(self._mark_fd)
        with self._compact_lock:
            pass

    def destroy(self) -> None:
        """Closes and deletes everything stored for the collection on this shard."""
        self.close()
        with self._compact_lock:
            # The manifest first: a crash half way through leaves files to adopt, not missing ones to report.
            (self.path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)


# --- reading a store from outside its shard ---------------------------------------------------------------------
def _snapshot_path(path: pathlib.Path, bucket: int) -> pathlib.Path:
    return path / f"b{bucket:05d}.snap"


class _Damaged(Exception):
    """A damaged snapshot: ``reason`` at byte ``offset``."""

    def __init__(self, offset: int, reason: str):
        super().__init__(f"{reason} at byte {offset}")
        self.offset = offset
        self.reason = reason


def _read_snapshot(path: pathlib.Path, bucket: int) -> Batch:
    """The items of a bucket's snapshot.

    Raises:
        _Damaged: the file is not exactly one valid snapshot frame of ``bucket``.
        FileNotFoundError: no such file (compaction may just have deleted it).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            end, (got, batch), _ = _frame_at(f, 0, size, _parse_snapshot)
        except (_Corrupt, _Invalid) as err:
            raise _Damaged(0, str(err)) from None
    if end != size:
        raise _Damaged(end, f"{size - end} bytes after the snapshot's frame")
    if got != bucket:
        raise _Damaged(0, f"the snapshot is of bucket {got}, not {bucket}")
    return batch


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
    starts over. Damaged parts (a snapshot, or frames of a segment) are logged and skipped: the files stay as they
    are, for their owner to report and set aside.

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
            base = _read_snapshot(snap, b) if snap.exists() else None
        except FileNotFoundError:
            raise StoreChanged() from None
        except _Damaged as err:  # its owner reports it and sets it aside when it reads it; a reader only skips it
            log.error("%s: damaged snapshot (%s); its items are not copied", snap, err)
            base = None
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
        for k, (seg, f) in enumerate(zip(segs, files)):
            gaps: list[_Gap] = []
            size = os.fstat(f.fileno()).st_size
            for _, _, batch, _ in _scan_frames(f, size, _parse_record, gaps, active=k == len(segs) - 1):
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
            damaged = [g for g in gaps if not g.torn]
            if damaged:  # its owner reports it and sets a copy aside when it reads it; a reader only skips it
                log.error("%s: damaged log segment (%s); the valid frames around it are copied",
                          seg, _damage_summary(damaged, size)[1])
    finally:
        for f in files:
            f.close()
    return state
