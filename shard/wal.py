"""The write-ahead log of one collection on one shard, as it is appended to: the active segment ``wal-<seq>.log``,
its ``active.mark``, and the sealing of a full segment (shard.store's docstring says why each step is durable when
it is).

Uses the standard library, the base package (errors) and shard.frames / shard.manifest / shard.osutil.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import threading
import time
from dataclasses import replace

from lookalike.errors import ResourceExhausted
from lookalike.metrics import WAL_FSYNC_SECONDS
from lookalike.files import fsync_dir
from shard.frames import HEADER, Tally, frame
from shard.manifest import MARK, LogPosition, ManifestFile, pack_mark, segment_name

log = logging.getLogger(__name__)

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a write refused for want of space: ResourceExhausted, not INTERNAL


class WalWriter:
    """Appends records to a store's log, each fsynced before it is acknowledged.

    Args:
        path: the store directory.
        manifest: its manifest, which names the active segment and records every sealed one.
        segment_bytes: size at which the active segment is sealed.

    Attributes:
        lock: held by appends and segment rotation (callers of :meth:`rotate_locked` take it).
        fd, mark_fd: the active segment and ``active.mark``, open.
        seq, tally: the active segment's number and what it holds.
        closed: no more appends.
    """

    def __init__(self, path: pathlib.Path, manifest: ManifestFile, segment_bytes: int):
        self.path = path
        self.manifest = manifest
        self.segment_bytes = segment_bytes
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.mark_fd: int | None = None
        self.seq = 0
        self.tally = Tally()  # what the active segment holds
        self.closed = False
        self._undo: tuple | None = None  # (segment, tally before the last record): what retract restores
        # The store's directory is shards/<shard_id>/<collection> (shard.store): its labels.
        self._fsync_seconds = WAL_FSYNC_SECONDS.labels(shard=path.parent.name, collection=path.name)

    def open_active(self, seq: int, tally: Tally) -> None:
        """Opens (creates) active segment ``seq`` holding ``tally``, then its mark, then names them in the manifest:
        in that order, so that the manifest never names a segment that was not created (a crash in between leaves
        one it does not know, adopted on the next open)."""
        self.seq = seq
        name = segment_name(seq)
        self.fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        assert os.fstat(self.fd).st_size == tally.bytes, f"{name} changed while it was checked"
        self.tally = tally
        self.mark_fd = os.open(self.path / MARK, os.O_RDWR | os.O_CREAT, 0o644)
        self.write_mark(sync=True)
        fsync_dir(self.path)
        with self.manifest.lock:
            self.manifest.m.active = name
            self.manifest.save()

    def position(self) -> LogPosition:
        """The current end of the log. The caller holds ``lock``."""
        t = self.tally
        return LogPosition(self.seq, t.records, t.items, t.bytes, t.crc)

    def append(self, rec) -> bool:
        """Appends one record (a WalRecord) and fsyncs it; returns only once it is durable. True when the active
        segment was full and is sealed now (a compaction is due).

        Raises:
            ResourceExhausted: the disk is full; nothing was stored.
        """
        data = frame(rec.SerializeToString())
        with self.lock:
            if self.closed:
                raise RuntimeError(f"storage {self.path} is closed")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
                t0 = time.perf_counter()
                os.fsync(self.fd)
                self._fsync_seconds.observe(time.perf_counter() - t0)
            except BaseException as err:
                # Cut off what was written (a full disk, a failed fsync): it is not acknowledged, and frames
                # acknowledged later must not follow a torn one (nor lie past what the mark counts).
                try:
                    os.ftruncate(self.fd, self.tally.bytes)
                except OSError:
                    pass
                if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
                    raise ResourceExhausted(
                        f"the shard's storage at {self.path} is full ({os.strerror(err.errno)}): free space or give "
                        "it a larger volume; the write was not stored") from err
                raise
            self._undo = (self.seq, replace(self.tally))  # see retract
            self.tally.add(data[:HEADER.size], len(rec.ids))
            # After the fsync: the mark never counts a write the log does not hold durably. No fsync of its own
            # (see shard.store's docstring).
            self._move_mark()
            if self.tally.bytes >= self.segment_bytes:
                try:
                    self.rotate_locked()
                    return True
                except OSError:  # the write is durable all the same: keep appending here, seal at the next one
                    log.exception("storage %s: sealing segment %d failed", self.path, self.seq)
        return False

    def rotate_locked(self) -> None:
        """Seals the active segment and starts the next one (the caller holds ``lock``). The next file is created
        (and the directory fsynced) before the manifest records the seal, and the mark moves to it after: a crash in
        between leaves a segment the manifest does not know (adopted: it is empty) or a mark of the sealed segment
        (ignored)."""
        seq = self.seq + 1
        path = self.path / segment_name(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fsync_dir(self.path)
            with self.manifest.lock:
                m = self.manifest.m
                sealed, active = segment_name(self.seq), m.active
                m.segments[sealed] = self.tally
                m.active = path.name
                try:
                    self.manifest.save()
                except Exception:
                    del m.segments[sealed]
                    m.active = active
                    raise
        except Exception:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(self.fd)
        self.fd, self.seq, self.tally = fd, seq, Tally()
        self._undo = None  # the last record is sealed in: it cannot be taken back
        self._move_mark()

    def retract(self) -> bool:
        """Takes the last appended record back out of the log (see shard.store.CollectionStore.retract)."""
        with self.lock:
            undo, self._undo = self._undo, None
            if undo is None or undo[0] != self.seq or self.closed:
                return False
            os.ftruncate(self.fd, undo[1].bytes)
            os.fsync(self.fd)
            self.tally = undo[1]
            self.write_mark(sync=True)  # a mark counting the record would report the cut as damage
            return True

    def write_mark(self, sync: bool = False) -> None:
        """Overwrites ``active.mark`` with the active segment's tally (fsynced if ``sync``)."""
        os.pwrite(self.mark_fd, pack_mark(self.seq, self.tally), 0)
        if sync:
            os.fsync(self.mark_fd)

    def _move_mark(self) -> None:
        try:
            self.write_mark()
        except OSError:  # the writes are durable all the same; a mark that counts less is never wrong
            log.exception("storage %s: updating %s failed", self.path, MARK)

    def close(self) -> None:
        """Closes the log (a clean close: the mark is fsynced, so the next open holds the log to every write)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                if self.fd is not None:
                    os.close(self.fd)
                if self.mark_fd is not None:
                    try:
                        os.fsync(self.mark_fd)
                    finally:
                        os.close(self.mark_fd)
