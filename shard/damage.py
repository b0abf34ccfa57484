"""Damage: a storage file that does not check out, kept aside and reported, never deleted or loaded as it is.

Damaged files are kept in ``<collection>/damaged/<name>.<UTC time>`` with a ``.json`` note (:class:`DamageLog`):
moved there (a snapshot, a checkpoint), copied (a log segment: its valid frames are kept in place), or, for a
missing file, only the note. :func:`assess` says whether a log segment read back holds what was written to it.

Uses the standard library and shard.frames / shard.osutil only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import shutil
from dataclasses import asdict, dataclass

from shard.frames import Gap, Tally
from lookalike.files import fsync_dir

log = logging.getLogger(__name__)

DAMAGED_DIR = "damaged"


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


def damage_summary(gaps: list[Gap], size: int) -> tuple[int, str]:
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


def assess(gaps: list[Gap], size: int, expected: Tally | None, ack: Tally) -> tuple[int, str] | None:
    """(offset, message) describing the damage of a log segment of ``size`` bytes; None if it has none.

    Args:
        gaps: its ranges that hold no valid frame. A torn tail among them (see :func:`shard.frames.scan_frames`) is
            damage after all if it starts within ``expected``: a crash cannot cut a write that was acknowledged.
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
        offset, message = damage_summary(damaged, size)
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



class DamageLog:
    """The damaged files of one store directory: those set aside by earlier runs (their notes in ``damaged/``, until
    an operator removes them) and those found by this one.

    Attributes:
        damage: every :class:`Damage`, oldest first.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.damage: list[Damage] = self._earlier()
        if self.damage:
            log.warning("storage %s: %d damaged file(s) set aside earlier, in %s: %s", self.path, len(self.damage),
                        self.path / DAMAGED_DIR, "; ".join(map(str, self.damage)))
        self._reported: set[tuple[str, int, str]] = set()  # (file, offset, how) already reported by this run

    def _earlier(self) -> list[Damage]:
        """What earlier runs set aside, from their notes."""
        out = []
        for note in sorted((self.path / DAMAGED_DIR).glob("*.json")):
            try:
                out.append(Damage(**json.loads(note.read_text())))
            except (OSError, ValueError, TypeError) as err:
                log.warning("%s: unreadable note (%s)", note, err)
        return sorted(out, key=lambda d: d.detected)

    def set_aside(self, path: pathlib.Path, kind: str, offset: int, message: str, how: str) -> None:
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
        fsync_dir(folder)
        fsync_dir(self.path)
        self.damage.append(damage)
        log.error("storage %s: damaged file %s", self.path, damage)

    def move_aside(self, path: pathlib.Path, kind: str, offset: int, message: str,
                   companions: tuple[pathlib.Path, ...] = ()) -> None:
        """Reports a damaged file of this directory and moves it aside to ``damaged/`` like a damaged snapshot;
        ``companions``, files that belong with it (the other files of a checkpoint), are moved there too, beside
        it."""
        self.set_aside(path, kind, offset, message, "move" if path.exists() else "gone")
        folder = self.path / DAMAGED_DIR
        kept = self.damage[-1].kept
        stamp = kept[len(str(folder / path.name)):] if kept else ""  # ".<UTC time>[.n]": kept beside it
        for other in companions:
            if other.exists():
                os.replace(other, folder / (other.name + (stamp or f".{self.damage[-1].detected}")))
        fsync_dir(folder)
        fsync_dir(self.path)
