"""The checks a store makes when it opens: every file in its directory against what was written to it.

Sealed segments and snapshots must match the manifest exactly; the active segment must hold at least the frames
``active.mark`` counts (a frame cut short at its very end, past what the mark counts, is a write a crash
interrupted, never acknowledged, and is dropped silently). A file missing or not as written is damage (reported
with what it held, kept aside: shard.damage); a damaged segment is rewritten with its valid frames. A store written
before manifests is adopted as it is found (see shard.store's docstring).

Uses the standard library and the shard storage modules (damage, frames, manifest, osutil, records, snapshots).
"""

from __future__ import annotations

import logging
import os
import pathlib

from shard.damage import DamageLog, assess
from shard.frames import Gap, Tally, scan_frames
from shard.manifest import (MANIFEST, MARK, Manifest, ManifestFile, read_mark, seal_of, segment_files, segment_name,
                            seq_of)
from lookalike.files import fsync_dir
from shard.records import parse_record
from shard.snapshots import reject_snapshot, snapshot_gone

log = logging.getLogger(__name__)


def read_manifest(path: pathlib.Path, damage: DamageLog) -> Manifest | None:
    """The manifest of store directory ``path``; None if there is none (a new store, or one written before
    manifests) or it is damaged (set aside and reported). Without one, the files found are adopted as they are."""
    file = path / MANIFEST
    try:
        return Manifest.from_json(file.read_text())
    except FileNotFoundError:
        if any(path.glob("wal-*.log")) or any(path.glob("b*.snap")):
            log.info("storage %s: no %s (written before manifests): adopting its files as they are", path, MANIFEST)
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        damage.set_aside(file, "manifest", 0, f"unreadable ({err}); the log segments and snapshots found were "
                         "adopted as they are: whether any went missing or lost their end cannot be told", "move")
        return None


class OpenCheck:
    """Checks a store directory's files on open, against ``manifest`` (``known``: read from disk, not new).

    Args:
        path: the store directory.
        manifest: its manifest; corrected to what is found (missing files dropped, adopted ones added).
        damage: where damage is reported.
        known: whether the manifest was read from disk (else every file found is adopted).
    """

    def __init__(self, path: pathlib.Path, manifest: ManifestFile, damage: DamageLog, known: bool):
        self.path = path
        self.manifest = manifest
        self.damage = damage
        self.known = known

    def run(self) -> tuple[int, Tally]:
        """Checks the snapshots, then the log: returns the active segment's number and what it holds."""
        self._check_snapshots(self.known)
        return self._check_segments(self.known)

    def _check_snapshots(self, known: bool) -> None:
        """Checks the snapshots against the manifest (``known``: there is one): one missing, or not the one written
        last (its size or checksum differ), is damage; the latter is set aside. Only their headers are read here;
        loading them checks the rest. Snapshots the manifest does not know are adopted."""
        m = self.manifest.m
        if known:
            for name in sorted(set(m.snapshots) | set(m.replacing)):
                written = m.snapshots.pop(name, None)
                allowed = [written] + ([m.replacing[name]] if name in m.replacing else [])  # None: no file
                path = self.path / name
                if not path.exists():
                    if None not in allowed:
                        snapshot_gone(self.damage, path, written)
                    continue
                found = seal_of(path)
                match = next((s for s in allowed if s is not None and s.same_file(found)), None)
                if match is not None:
                    m.snapshots[name] = match
                elif any(s is not None for s in allowed):
                    reject_snapshot(self.damage, path, next(s for s in allowed if s is not None), found)
            m.replacing = {}
        for path in sorted(self.path.glob("b*.snap")):
            if path.name not in m.snapshots:
                if known:
                    log.info("storage %s: adopting %s, which the manifest does not know", self.path, path.name)
                m.snapshots[path.name] = seal_of(path)

    def _check_segments(self, known: bool) -> tuple[int, Tally]:
        """Reads the whole log before it is used and checks every segment against what was written to it (the
        manifest's tally for a sealed segment, the mark's for the active one; ``known``: there is a manifest).
        Returns the active segment's number and what it holds (the caller opens it). A missing segment is reported
        with what it held. A torn tail of the active segment, past what the mark counts, is cut off so that new
        frames follow valid ones; a damaged segment is copied aside, then rewritten with its valid frames, so that
        replay, compaction and other shards reading it all see the same frames."""
        m = self.manifest.m
        on_disk = [p.name for p in segment_files(self.path)]
        mark = read_mark(self.path, m.active) if known else None
        active = max([seq_of(n) for n in on_disk] + ([seq_of(m.active)] if m.active else []), default=1)
        if known:
            for name in sorted(set(m.segments) - set(on_disk)):
                lost = m.segments.pop(name).lost(Tally())
                self.damage.set_aside(self.path / name, "wal", 0, f"log segment missing: {lost}", "gone")
            if m.active and m.active not in on_disk:  # created before the manifest named it: never a crash's doing
                if mark is None:
                    self.damage.set_aside(self.path / m.active, "wal", 0, "the active log segment is missing; what "
                                          f"it held is not known ({MARK} is gone or of another segment)", "gone")
                elif mark.records:
                    self.damage.set_aside(self.path / m.active, "wal", 0,
                                          f"the active log segment is missing: {mark.lost(Tally())}", "gone")
        tally = Tally()
        for name in on_disk:
            if known and name in m.segments:
                expected = m.segments[name]
            elif known and name == m.active:
                expected = mark
            else:  # written before manifests, or left by a crash between two steps (see shard.wal, shard.compaction)
                expected = None
            tally = self._check_segment(self.path / name, expected, active=seq_of(name) == active)
            if seq_of(name) != active:
                m.segments[name] = tally
        m.segments.pop(segment_name(active), None)
        return active, (tally if segment_name(active) in on_disk else Tally())

    def _check_segment(self, seg: pathlib.Path, expected: Tally | None, active: bool) -> Tally:
        """Checks a segment against what was written to it (see :func:`shard.damage.assess`); reports damage
        (keeping a copy), then rewrites the segment with its valid frames if some are damaged, or cuts off its torn
        tail. Returns what it holds afterwards."""
        gaps: list[Gap] = []
        kept: list[tuple[int, int]] = []
        found, ack = Tally(), Tally()
        with open(seg, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for start, end, batch, header in scan_frames(f, size, parse_record, gaps, active=active):
                kept.append((start, end))
                found.add(header, len(batch.ids))
                if expected is not None and end <= expected.bytes:
                    ack.add(header, len(batch.ids))
        problem = assess(gaps, size, expected, ack)
        if problem is not None:
            self.damage.set_aside(seg, "wal", *problem, "copy")
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
        fsync_dir(self.path)

