"""Reading a store's own files back, checked: a log segment's records and a bucket snapshot's items, with damage
found on the way reported and set aside (shard.damage); and whether the log still holds a checkpoint's position.

Uses the standard library and the shard storage modules (damage, frames, manifest, records, snapshots).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

from shard.damage import DamageLog, assess
from shard.frames import HEADER, Gap, Tally, scan_frames
from shard.manifest import LogPosition, ManifestFile
from shard.records import Batch, parse_record
from shard.snapshots import SnapshotDamaged, read_snapshot


class StoreReader:
    """Reads the files of one store directory for its owner.

    Args:
        manifest: the store's manifest (what each snapshot held, as written).
        damage: where damage found is reported.
    """

    def __init__(self, manifest: ManifestFile, damage: DamageLog):
        self.manifest = manifest
        self.damage = damage

    def read_segment(self, path: pathlib.Path, active: bool = False,
                     expected: Tally | None = None, start: int = 0) -> Iterator[Batch]:
        """The records of a segment (from byte ``start``, where a frame starts). Damage (found after the store was
        opened) is reported, the segment copied aside, and reading goes on after it (see
        :func:`shard.frames.scan_frames`); so is a segment that holds fewer records than ``expected`` (see
        :func:`shard.damage.assess`)."""
        gaps: list[Gap] = []
        ack = Tally()
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for _, end, batch, header in scan_frames(f, size, parse_record, gaps, active, start):
                if expected is not None and end <= expected.bytes:
                    ack.add(header, len(batch.ids))
                yield batch
        problem = assess(gaps, size, expected, ack)
        if problem is not None:
            self.damage.set_aside(path, "wal", *problem, "copy")

    def load_snapshot(self, path: pathlib.Path) -> Batch | None:
        """A bucket snapshot's items; None, after moving it aside and reporting it, if it is damaged."""
        manifest = self.manifest
        try:
            batch = read_snapshot(path, int(path.stem[1:]))
        except SnapshotDamaged as err:
            with manifest.lock:
                written = manifest.m.snapshots.get(path.name)
            held = f" (it held {written.held()})" if written is not None else ""
            self.damage.set_aside(path, "snapshot", err.offset, f"{err.reason} at byte {err.offset}; its bucket is "
                                  "served from what the log holds, the items only in this snapshot are "
                                  f"missing{held}", "move")
            with manifest.lock:
                manifest.m.snapshots.pop(path.name, None)
                manifest.save()
            return None
        with manifest.lock:
            written = manifest.m.snapshots.get(path.name)
            if written is not None and written.items is None:
                written.items = len(batch.ids)
                manifest.dirty = True
        return batch

    @staticmethod
    def check_position(path: pathlib.Path, position: LogPosition) -> str | None:
        """Why the log in directory ``path`` no longer holds ``position`` as it was when a checkpoint recorded it
        (its segment is gone, holds fewer records, or other frames: rewritten after damage), or None if it does.
        Reads only the headers of the records before the position. The caller keeps compaction out."""
        seg = path / position.segment
        tally = Tally()
        try:
            with open(seg, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                while tally.records < position.records and tally.bytes + HEADER.size <= size:
                    f.seek(tally.bytes)
                    header = f.read(HEADER.size)
                    length = HEADER.unpack(header)[0]
                    if length == 0 or tally.bytes + HEADER.size + length > size:
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
