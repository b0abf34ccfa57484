"""Reading buckets of another shard's store, while its owner keeps writing and compacting: how a bucket moves
(see control.controller) and how a shard reads the original vectors of Get and Scan.

Uses numpy, the base package (lookalike.ids) and the shard storage modules (frames, damage, records, snapshots).
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from lookalike.ids import buckets_of
from shard.damage import damage_summary
from shard.frames import Gap, scan_frames
from shard.records import DELETE, LOAD_BATCH, RESET, UPSERT, Batch, coalesce, parse_record
from shard.snapshots import SnapshotDamaged, read_snapshot, snapshot_path

log = logging.getLogger(__name__)


class StoreChanged(Exception):
    """The store was compacted while being read; read again."""


def read_buckets(path: str | pathlib.Path, n_buckets: int, buckets, batch_items: int = LOAD_BATCH,
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
        yield from coalesce(_live_batches(state), batch_items)
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
        snap = snapshot_path(path, b)
        try:
            base = read_snapshot(snap, b) if snap.exists() else None
        except FileNotFoundError:
            raise StoreChanged() from None
        except SnapshotDamaged as err:  # its owner reports it and sets it aside when it reads it; a reader skips it
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
            gaps: list[Gap] = []
            size = os.fstat(f.fileno()).st_size
            for _, _, batch, _ in scan_frames(f, size, parse_record, gaps, active=k == len(segs) - 1):
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
                          seg, damage_summary(damaged, size)[1])
    finally:
        for f in files:
            f.close()
    return state
