"""What a store directory's files hold, as written: ``manifest.json`` for the sealed log segments and the bucket
snapshots, ``active.mark`` for the segment being appended to, and the log positions index checkpoints cover.

``manifest.json`` (replaced atomically: temporary file, fsync, rename, fsync of the directory) records for each
sealed segment its records, ids, bytes and a CRC-32 chained over its frames' headers (a :class:`Tally`), and for
each snapshot its items, bytes and frame CRC (a :class:`Seal`); it is rewritten when a segment is sealed and by
compaction, never per write. The active segment's tally is in ``active.mark``: 36 bytes and their CRC, overwritten
in place after each append's fsync, without an fsync of its own (see shard.store's docstring).

Uses the standard library and shard.frames / shard.osutil only.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import struct
import threading
import zlib
from dataclasses import asdict, dataclass, field

from shard.frames import HEADER, Tally
from lookalike.files import fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MARK = "active.mark"
_MARK = struct.Struct("<QQQQI")  # active segment's number, then its Tally: records, ids, bytes, crc
_CRC = struct.Struct("<I")


def seq_of(segment: str) -> int:
    """The number of log segment ``segment`` (a file name)."""
    return int(segment[len("wal-"):-len(".log")])


def segment_name(seq: int) -> str:
    """The file name of log segment ``seq``."""
    return f"wal-{seq:010d}.log"


def segment_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The log segments in store directory ``path``, oldest first."""
    return sorted(path.glob("wal-*.log"))


@dataclass
class Seal:
    """What a snapshot file holds: ``items`` (None: not known, a snapshot adopted from before manifests), its
    ``bytes`` and the CRC-32 in its frame header."""

    items: int | None
    bytes: int
    crc: int

    def same_file(self, other: Seal) -> bool:
        return (self.bytes, self.crc) == (other.bytes, other.crc)

    def held(self) -> str:
        return "an unknown number of items" if self.items is None else f"{self.items} items"


def seal_of(path: pathlib.Path) -> Seal:
    """The size and frame CRC of a snapshot file (its items are not read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = f.read(HEADER.size)
    return Seal(None, size, HEADER.unpack(header)[1] if len(header) == HEADER.size else 0)


@dataclass
class Manifest:
    """The contents of ``manifest.json``.

    Attributes:
        active: the segment appended to (its tally is in ``active.mark``).
        segments: sealed segment name -> what it holds.
        snapshots: snapshot name -> what it holds.
        replacing: snapshot name -> what a compaction in progress replaces it with (None: deletes it); until the
            compaction records the result, the file may be either.
        folded: sealed segments already folded into the snapshots, kept because the newest index checkpoint does
            not cover them yet (see shard.compaction); replaying them again changes nothing.
    """

    active: str = ""
    segments: dict[str, Tally] = field(default_factory=dict)
    snapshots: dict[str, Seal] = field(default_factory=dict)
    replacing: dict[str, Seal | None] = field(default_factory=dict)
    folded: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({"format": 1, "active": self.active,
                           "segments": {n: asdict(t) for n, t in sorted(self.segments.items())},
                           "snapshots": {n: asdict(s) for n, s in sorted(self.snapshots.items())},
                           "replacing": {n: s and asdict(s) for n, s in sorted(self.replacing.items())},
                           "folded": sorted(self.folded & set(self.segments))})

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Raises ValueError (or KeyError, TypeError) if ``text`` is no manifest."""
        m = json.loads(text)
        if m.get("format") != 1:
            raise ValueError(f"unknown format {m.get('format')!r}")
        return cls(str(m["active"]), {n: Tally(**t) for n, t in m["segments"].items()},
                   {n: Seal(**t) for n, t in m["snapshots"].items()},
                   {n: t and Seal(**t) for n, t in m["replacing"].items()}, set(m.get("folded", [])))


class ManifestFile:
    """A store's manifest in memory (``m``) and on disk.

    Attributes:
        m: the :class:`Manifest`.
        lock: guards ``m`` and the file; taken last, held briefly.
        dirty: ``m`` learnt the items of snapshots adopted from before manifests, not saved yet.
    """

    def __init__(self, path: pathlib.Path, manifest: Manifest | None = None):
        self.path = path
        self.m = manifest or Manifest()
        self.lock = threading.Lock()
        self.dirty = False

    def save(self) -> None:
        """Replaces manifest.json with ``m``, atomically and durably. The caller holds ``lock``."""
        tmp = self.path / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(self.m.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        fsync_dir(self.path)


@dataclass(frozen=True)
class LogPosition:
    """A point in a collection's log: the first ``records`` records of segment ``seq``, which take ``bytes`` bytes
    and whose frame headers chain to CRC-32 ``crc`` (with ``items`` ids upserted or deleted): what an index
    checkpoint covers (everything logged before it), so that a restart replays only what follows. The tally lets
    :meth:`shard.store.CollectionStore.check_position` tell the same frames from others (a segment rewritten after
    damage)."""

    seq: int
    records: int
    items: int
    bytes: int
    crc: int

    @property
    def segment(self) -> str:
        return segment_name(self.seq)

    def same_frames(self, tally: Tally) -> bool:
        """Whether ``tally`` (of a segment's first frames, read back) counts the frames this position counts."""
        return (tally.records, tally.bytes, tally.crc) == (self.records, self.bytes, self.crc)


# --- active.mark --------------------------------------------------------------------------------------------------
def pack_mark(seq: int, t: Tally) -> bytes:
    """The bytes of ``active.mark`` for segment ``seq`` holding ``t``."""
    data = _MARK.pack(seq, t.records, t.items, t.bytes, t.crc)
    return data + _CRC.pack(zlib.crc32(data))


def read_mark(path: pathlib.Path, active: str) -> Tally | None:
    """The tally of segment ``active`` from the mark in directory ``path``; None if the mark is missing, unreadable
    (both warned about: the end of the active segment cannot be checked) or of another segment (a crash between
    sealing a segment and moving the mark to the next one)."""
    try:
        data = (path / MARK).read_bytes()
    except FileNotFoundError:
        data = b""
    if len(data) != _MARK.size + _CRC.size or _CRC.unpack_from(data, _MARK.size)[0] != zlib.crc32(
            data[:_MARK.size]):
        log.warning("storage %s: %s is missing or unreadable: whether the end of the active log segment holds "
                    "every acknowledged write cannot be checked this time", path, MARK)
        return None
    seq, *tally = _MARK.unpack_from(data)
    return Tally(*tally) if active and seq == seq_of(active) else None
