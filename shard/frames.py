"""Frames: how records sit in a shard's storage files, and how they are read back when some bytes are damaged.

A frame is a header (the body's length and CRC-32, two little-endian uint32) and the body (a serialized
``WalRecord`` or ``BucketSnapshot``, see shard.records). Reading checks every frame; after a bad one,
:func:`scan_frames` goes on at the next offset where a valid frame starts (:func:`_resync`) and records what lay
between as a :class:`Gap`. A gap at the very end of the segment being appended to may be a write a crash cut
short (``torn``); whether it is damage after all is shard.damage's call. A :class:`Tally` counts a segment's frames.

Uses numpy and shard.records only.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from shard.records import Invalid

HEADER = struct.Struct("<II")
# The first byte of a serialized WalRecord or BucketSnapshot: the tag of one of their fields 1-5 (a frame is never
# empty). Lets the scan for the next frame after damage skip almost every offset without computing a checksum.
_FIELD_TAGS = np.zeros(256, dtype=bool)
_FIELD_TAGS[[0x08, 0x12, 0x1A, 0x22, 0x2A]] = True
_SCAN_CHUNK = 1 << 20


def frame(data: bytes) -> bytes:
    """``data`` framed: header, then data."""
    return HEADER.pack(len(data), zlib.crc32(data)) + data


class Corrupt(Exception):
    """The bytes at an offset are not a whole frame with a matching checksum."""


@dataclass
class Gap:
    """Bytes of a file that hold no valid frame: from ``start`` to ``end`` (None: to the end of the file)."""

    start: int
    end: int | None
    reason: str
    torn: bool = False  # the end of the active segment, cut by a crash mid-append: not damage


@dataclass
class Tally:
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
        self.bytes += HEADER.size + HEADER.unpack(header)[0]
        self.crc = zlib.crc32(header, self.crc)

    def lost(self, found: Tally) -> str:
        """What of this (what was written) is not in ``found`` (the part of it read back), in words."""
        return (f"{self.records - found.records} of the {self.records} records written to it lost "
                f"({self.items - found.items} upserted or deleted ids in {self.bytes - found.bytes} bytes)")


def frame_at(f, pos: int, size: int, parse: Callable[[bytes], object]) -> tuple[int, object, bytes]:
    """(offset where it ends, parsed body, header) of the frame at ``pos`` of a file of ``size`` bytes.

    Raises:
        Corrupt: no whole frame with a matching checksum there.
        Invalid: the checksum matches but the body is not a valid record.
    """
    f.seek(pos)
    header = f.read(HEADER.size)
    if len(header) < HEADER.size:
        raise Corrupt("incomplete frame header")
    length, crc = HEADER.unpack(header)
    if length == 0:  # never written (every record has a field): zeros where a frame should be
        raise Corrupt("empty frame")
    end = pos + HEADER.size + length
    if end > size:
        raise Corrupt(f"frame of {length} bytes runs past the end of the file")
    body = f.read(length)
    if len(body) < length:
        raise Corrupt("frame cut short")
    if zlib.crc32(body) != crc:
        raise Corrupt("checksum mismatch")
    try:
        return end, parse(body), header
    except Invalid as err:
        err.end = end
        raise


def scan_frames(f, size: int, parse: Callable[[bytes], object], gaps: list[Gap],
                active: bool = False, start: int = 0) -> Iterator[tuple[int, int, object, bytes]]:
    """Yields (start, end, parsed body, header) for the valid frames of a file of ``size`` bytes, in order, and
    appends what lies between them to ``gaps``. After a bad frame it goes on at the next offset where a valid frame
    starts (:func:`_resync`). ``active``: the file is the segment being appended to, whose tail a crash may have cut
    (whether it did is for shard.damage.assess to say). ``start``: where a frame starts (0: the first)."""
    pos = start
    while pos < size:
        try:
            end, value, header = frame_at(f, pos, size, parse)
        except Invalid as bad:  # the checksum holds, so the frame's length does: the next frame follows it
            gaps.append(Gap(pos, bad.end, str(bad)))
            pos = bad.end
            continue
        except Corrupt as bad:
            nxt = _resync(f, pos + 1, size, parse)
            gaps.append(Gap(pos, nxt, str(bad), torn=nxt is None and active and _torn_tail(f, pos, size)))
            if nxt is None:
                return
            pos = nxt
            continue
        yield pos, end, value, header
        pos = end


def _torn_tail(f, pos: int, size: int) -> bool:
    """Whether what follows ``pos`` (where no valid frame follows) can be one append a crash cut: a frame that
    reaches the end of the file, then at most zeros (a filesystem may extend a file before writing its data).

    Reads nothing past ``size``: a reader of a segment its owner is appending to took the size mid-append, and
    what the file holds past it now (the rest of that frame, and more) was written after."""
    f.seek(pos)
    header = f.read(min(HEADER.size, size - pos))
    if len(header) < HEADER.size:
        return True
    length, crc = HEADER.unpack(header)
    if length != size - pos - HEADER.size and zlib.crc32(f.read(size - pos - HEADER.size)) == crc:
        return False  # the whole frame is there, its length field is what is damaged
    end = pos + HEADER.size + length
    if end >= size:
        return True
    f.seek(end)
    left = size - end
    while left > 0 and (chunk := f.read(min(_SCAN_CHUNK, left))):
        left -= len(chunk)
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
        length, crc = HEADER.unpack_from(buf, q)
        end = q + HEADER.size + length
        if end < n and not _looks_like_header(a, end):
            if zeros_from is None:
                zeros_from = len(buf.rstrip(b"\0"))
            if end < zeros_from:
                continue
        if zlib.crc32(view[q + HEADER.size:end]) != crc:
            continue
        try:
            parse(bytes(view[q + HEADER.size:end]))
        except Invalid:
            continue
        return start + q
    return None


def _candidates(a: np.ndarray) -> Iterator[int]:
    """Offsets in ``a`` where a frame could start: a length that is not zero and fits, then a field tag."""
    n = len(a)
    hdr = HEADER.size
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
    if n - pos < HEADER.size:
        return True
    length = int(a[pos]) | int(a[pos + 1]) << 8 | int(a[pos + 2]) << 16 | int(a[pos + 3]) << 24
    return length > 0 and (n - pos == HEADER.size or bool(_FIELD_TAGS[a[pos + HEADER.size]]))

