"""Bucket snapshots: ``b<bucket>.snap`` in a store directory, one frame holding a ``BucketSnapshot`` of the
bucket's live items as of the last compaction (shard.compaction writes them, shard.store and shard.bucket_reader
read them).

Uses numpy and shard.damage / shard.frames / shard.manifest / shard.records only.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from shard.damage import DamageLog
from shard.frames import HEADER, Corrupt, frame, frame_at
from shard.manifest import Seal
from shard.records import Batch, Invalid, parse_snapshot, snapshot_message


def snapshot_path(path: pathlib.Path, bucket: int) -> pathlib.Path:
    """The snapshot file of ``bucket`` in store directory ``path``."""
    return path / f"b{bucket:05d}.snap"


class SnapshotDamaged(Exception):
    """A damaged snapshot: ``reason`` at byte ``offset``."""

    def __init__(self, offset: int, reason: str):
        super().__init__(f"{reason} at byte {offset}")
        self.offset = offset
        self.reason = reason


def read_snapshot(path: pathlib.Path, bucket: int) -> Batch:
    """The items of a bucket's snapshot.

    Raises:
        SnapshotDamaged: the file is not exactly one valid snapshot frame of ``bucket``.
        FileNotFoundError: no such file (compaction may just have deleted it).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            end, (got, batch), _ = frame_at(f, 0, size, parse_snapshot)
        except (Corrupt, Invalid) as err:
            raise SnapshotDamaged(0, str(err)) from None
    if end != size:
        raise SnapshotDamaged(end, f"{size - end} bytes after the snapshot's frame")
    if got != bucket:
        raise SnapshotDamaged(0, f"the snapshot is of bucket {got}, not {bucket}")
    return batch


def write_snapshot(path: pathlib.Path, bucket: int,
                   items: dict[str, tuple[np.ndarray, bytes | None]]) -> tuple[pathlib.Path, Seal]:
    """Writes a snapshot of ``bucket`` holding ``items`` (id -> (row, payload)), not empty, to a temporary file
    beside its place in store directory ``path``, fsynced: (that file, what it holds)."""
    rows = np.stack([v[0] for v in items.values()])
    data = frame(snapshot_message(bucket, list(items), rows, [v[1] for v in items.values()]).SerializeToString())
    tmp = snapshot_path(path, bucket).with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp, Seal(len(items), len(data), HEADER.unpack_from(data)[1])


def snapshot_gone(damage: DamageLog, path: pathlib.Path, written: Seal) -> None:
    """Reports a snapshot the manifest records and that is missing."""
    damage.set_aside(path, "snapshot", 0, "snapshot missing; its bucket is served from what the log holds, the "
                     f"items only in this snapshot are missing (it held {written.held()}, {written.bytes} bytes)",
                     "gone")


def reject_snapshot(damage: DamageLog, path: pathlib.Path, written: Seal, found: Seal) -> None:
    """Sets aside a snapshot that is not the one written (reported as damaged if it is, as a stranger if not)."""
    try:
        read_snapshot(path, int(path.stem[1:]))
        offset, reason = 0, (f"not the snapshot written last ({found.bytes} bytes, CRC-32 {found.crc:08x}; "
                             f"written: {written.bytes} bytes, {written.crc:08x})")
    except SnapshotDamaged as err:
        offset, reason = err.offset, f"{err.reason} at byte {err.offset}"
    damage.set_aside(path, "snapshot", offset, f"{reason}; its bucket is served from what the log holds, the "
                     f"items only in this snapshot are missing (it held {written.held()})", "move")
