"""Damaged storage files: a checksum or record that does not check out is reported and the file kept aside in
``damaged/``, never silently loaded or deleted, and everything else is served; so is a file that is missing or
lost its end (the manifest and the mark say what each held). A write a crash cut short at the end of the active
segment, never acknowledged, is still dropped silently, and a crash between any two steps of sealing a segment or
compacting is never reported as damage."""

import logging
import os
import shutil
import struct

import numpy as np
import pytest

from conftest import make_data
from lookalike.config import CollectionConfig
from lookalike.ids import buckets_of
from control.local import LocalCluster
from lookalike.wire import vectors_to_proto
from protos import common_pb2, storage_pb2
from shard.bucket_reader import read_buckets
from shard.damage import DAMAGED_DIR
from shard.frames import frame as _frame
from shard.manifest import MANIFEST, MARK
from shard.records import DELETE, UPSERT
from shard.store import CollectionStore

N_BUCKETS = 4


def _state(batches) -> dict[str, bytes]:
    """id -> vector bytes after applying batches in order."""
    items: dict[str, bytes] = {}
    for b in batches:
        if b.op == UPSERT:
            for i, uid in enumerate(b.ids):
                items[uid] = b.vectors[i].tobytes()
        elif b.op == DELETE:
            for uid in b.ids:
                items.pop(uid, None)
        else:
            gone = [u for u, bucket in zip(items, buckets_of(list(items), N_BUCKETS).tolist()) if bucket in b.buckets]
            for uid in gone:
                del items[uid]
    return items


def _data(n: int, seed: int = 0):
    xb, _ = make_data("l2", n, 8, seed=seed)
    return [f"id{i}" for i in range(n)], xb


def _write(store, ids, xb, start: int, stop: int, step: int) -> list[int]:
    """Appends items start..stop in batches of ``step``; returns the active segment's size before each batch."""
    seg = max(store.path.glob("wal-*.log"))
    starts = []
    for i in range(start, stop, step):
        starts.append(seg.stat().st_size)
        store.append(UPSERT, ids[i:i + step], xb[i:i + step], [None] * len(ids[i:i + step]))
    return starts


def _kept_files(path, name: str):
    """The copies of ``name`` kept aside (not their notes)."""
    return sorted(p for p in (path / DAMAGED_DIR).glob(f"{name}.*") if p.suffix != ".json")


def _flip(path, offset: int, n: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _error_lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and name in r.getMessage()]


def _notes(path, name: str):
    return sorted((path / DAMAGED_DIR).glob(f"{name}.*.json"))


class _Crash(BaseException):
    """Stops the store between two steps as a crash would: none of its handlers catches it."""


def _crash(store) -> None:
    """Lets go of a store's files as a killed process does: nothing more is written or fsynced. (What it wrote
    without an fsync stays: the page cache outlives the process.)"""
    os.close(store.wal.fd)
    os.close(store.wal.mark_fd)
    store.wal.closed = True


# --- snapshots ------------------------------------------------------------------------------------------------
def test_damaged_snapshot_is_set_aside_and_the_rest_loads(tmp_path, caplog):
    ids, xb = _data(800)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 600, 100)
    assert store.compact() == 1
    _write(store, ids, xb, 600, 800, 100)  # in the log only
    store.close()
    snaps = sorted(tmp_path.glob("b*.snap"))
    assert len(snaps) == N_BUCKETS
    bad = snaps[1]
    bucket = int(bad.stem[1:])
    _flip(bad, bad.stat().st_size // 2)
    damaged_bytes = bad.read_bytes()

    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    got = _state(store.load())
    home = buckets_of(ids, N_BUCKETS)
    lost = {ids[i] for i in range(600) if home[i] == bucket}
    want = {uid: xb[i].tobytes() for i, uid in enumerate(ids) if uid not in lost}
    assert lost and got == want  # every item of the other buckets, and the bucket's items still in the log

    assert not bad.exists()
    [kept] = _kept_files(tmp_path, bad.name)
    assert kept.read_bytes() == damaged_bytes
    [d] = store.damage
    assert (d.file, d.kind, d.offset, d.kept) == (bad.name, "snapshot", 0, str(kept))
    assert "checksum mismatch at byte 0" in d.message
    assert store.damaged() == [f"{bad.name}: {d.message}; kept in {kept}"]
    assert any(str(kept) in line for line in _error_lines(caplog, bad.name))

    # Compaction rebuilds the bucket's snapshot from the log alone; the copy stays aside, still reported.
    _write(store, ids, xb, 0, 10, 10)
    store.compact()
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    want.update({uid: xb[i].tobytes() for i, uid in enumerate(ids[:10])})
    assert _state(store.load()) == want
    assert store.damaged() == [str(d)]  # from its note in damaged/
    assert _kept_files(tmp_path, bad.name) == [kept]
    store.close()


@pytest.mark.parametrize("how", ["truncated", "trailing bytes", "undecodable"])
def test_other_snapshot_damage(tmp_path, how):
    ids, xb = _data(200)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 200, 50)
    store.compact()
    store.close()
    bad = min(tmp_path.glob("b*.snap"))
    if how == "truncated":
        os.truncate(bad, bad.stat().st_size - 3)
    elif how == "trailing bytes":
        with open(bad, "ab") as f:
            f.write(b"\x01\x02")
    else:  # the checksum matches, the bytes are no snapshot
        bad.write_bytes(_frame(b"\x12\xff\xff\xff\xff\x0f"))
    store = CollectionStore(tmp_path, N_BUCKETS)
    got = _state(store.load())
    assert set(got) == {u for u, b in zip(ids, buckets_of(ids, N_BUCKETS).tolist()) if b != int(bad.stem[1:])}
    assert [d.file for d in store.damage] == [bad.name] and not bad.exists()
    assert len(_kept_files(tmp_path, bad.name)) == 1
    store.close()


# --- log segments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["body", "length"])
def test_damaged_segment_keeps_the_frames_around_the_damage(tmp_path, caplog, where):
    ids, xb = _data(50)
    store = CollectionStore(tmp_path, N_BUCKETS)
    starts = _write(store, ids, xb, 0, 50, 10)  # five frames
    store.close()
    [seg] = tmp_path.glob("wal-*.log")
    # the third frame: a sector of its vectors, or its length field
    _flip(seg, starts[2] + 40 if where == "body" else starts[2])
    original = seg.read_bytes()

    store = CollectionStore(tmp_path, N_BUCKETS)
    assert _state(store.load()) == {uid: xb[i].tobytes() for i, uid in enumerate(ids) if not 20 <= i < 30}
    [d] = store.damage
    assert (d.file, d.kind, d.offset) == (seg.name, "wal", starts[2])
    assert f"at byte {starts[2]}" in d.message and "before and after were loaded" in d.message
    [kept] = _kept_files(tmp_path, seg.name)
    assert kept.read_bytes() == original and d.kept == str(kept)
    assert any(str(kept) in line for line in _error_lines(caplog, seg.name))

    # The segment now holds its valid frames only: new writes follow them, and nothing is reported twice.
    store.append(UPSERT, ["new"], xb[:1], [None])
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    got = _state(store.load())
    assert len(got) == 41 and got["new"] == xb[0].tobytes()
    assert store.damaged() == [str(d)]
    assert len(_kept_files(tmp_path, seg.name)) == 1
    store.close()


def test_damage_at_the_end_of_a_sealed_segment_is_reported(tmp_path):
    """Only the active segment can end in a torn write: a sealed one was complete when the next one began."""
    ids, xb = _data(40)
    store = CollectionStore(tmp_path, N_BUCKETS)
    _write(store, ids, xb, 0, 20, 10)
    with store.wal.lock:
        store.wal.rotate_locked()  # seal it (without compacting it)
    _write(store, ids, xb, 20, 40, 10)
    store.close()
    sealed, active = sorted(tmp_path.glob("wal-*.log"))
    os.truncate(sealed, sealed.stat().st_size - 7)  # its last frame cut short

    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids[:10] + ids[20:40])
    [d] = store.damage
    assert d.file == sealed.name and "nothing after it could be read" in d.message
    assert len(_kept_files(tmp_path, sealed.name)) == 1
    assert not _kept_files(tmp_path, active.name)
    store.close()


def test_damage_found_by_compaction_is_kept_aside(tmp_path):
    """A segment that goes bad after the store opened: compaction reports it, keeps a copy and folds the rest."""
    ids, xb = _data(50)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    starts = _write(store, ids, xb, 0, 50, 10)
    [seg] = tmp_path.glob("wal-*.log")
    _flip(seg, starts[1] + 30)
    store.compact_pass_bytes = 1 << 10  # several passes over the segment: still one report, one copy
    assert store.compact() == 1
    assert not seg.exists()
    [d] = store.damage
    assert d.file == seg.name and d.offset == starts[1]
    assert len(_kept_files(tmp_path, seg.name)) == 1
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids[:10] + ids[20:])
    store.close()


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
@pytest.mark.parametrize("how", ["cut mid-frame", "cut mid-header", "zero-filled"])
def test_torn_tail_of_active_segment_is_not_damage(tmp_path, caplog, how, closed):
    """A crash in the middle of an append leaves part of its frame at the end of the active segment: a write that
    was never acknowledged (the mark does not count it), cut off without a word of damage."""
    ids, xb = _data(30)
    store = CollectionStore(tmp_path, N_BUCKETS)
    _write(store, ids, xb, 0, 20, 10)
    store.close() if closed else _crash(store)
    [seg] = tmp_path.glob("wal-*.log")
    acknowledged = seg.stat().st_size
    frame = _raw_record(ids[20:30], xb[20:30])
    with open(seg, "ab") as f:  # the third write, as far as it got
        if how == "cut mid-frame":
            f.write(frame[:-5])
        elif how == "cut mid-header":
            f.write(frame[:3])
        else:  # the size reached the disk, the data did not: zeros (and a filesystem may add more)
            f.write(frame[:8] + bytes(len(frame) - 8 + 4096))

    store = CollectionStore(tmp_path, N_BUCKETS)
    assert _state(store.load()) == {uid: xb[i].tobytes() for i, uid in enumerate(ids[:20])}
    assert store.damage == [] and store.damaged() == []
    assert not (tmp_path / DAMAGED_DIR).exists()
    assert seg.stat().st_size == acknowledged  # cut off: new frames follow the valid ones
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    store.append(UPSERT, ids[20:30], xb[20:30], [None] * 10)
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert len(_state(store.load())) == 30 and store.damage == []
    store.close()


def _raw_record(ids, x) -> bytes:
    rec = storage_pb2.WalRecord(op=UPSERT, ids=ids)
    rec.vectors.CopyFrom(vectors_to_proto(x))
    return _frame(rec.SerializeToString())


@pytest.mark.parametrize("garbage", ["undecodable", "wrong vector size", "vectors for fewer ids"])
@pytest.mark.parametrize("last", [False, True])
def test_checksummed_garbage_is_damage(tmp_path, garbage, last):
    ids, xb = _data(30)
    store = CollectionStore(tmp_path, N_BUCKETS)
    _write(store, ids, xb, 0, 20, 10)
    store.close()
    [seg] = tmp_path.glob("wal-*.log")
    offset = seg.stat().st_size
    if garbage == "undecodable":
        body = b"\x12\xff\xff\xff\xff\x0f"
    elif garbage == "wrong vector size":
        body = storage_pb2.WalRecord(op=UPSERT, ids=["z"], vectors=common_pb2.Vectors(
            data=b"123", rows=1, dim=8)).SerializeToString()
    else:
        rec = storage_pb2.WalRecord(op=UPSERT, ids=["y", "z"])
        rec.vectors.CopyFrom(vectors_to_proto(xb[:1]))
        body = rec.SerializeToString()
    with open(seg, "ab") as f:
        f.write(_frame(body))
        if not last:
            f.write(_raw_record(ids[20:30], xb[20:30]))

    store = CollectionStore(tmp_path, N_BUCKETS)
    got = _state(store.load())
    assert set(got) == set(ids[:20] if last else ids)
    [d] = store.damage
    assert d.file == seg.name and d.offset == offset
    assert len(_kept_files(tmp_path, seg.name)) == 1
    store.close()


def test_read_buckets_skips_damage_and_moves_nothing(tmp_path, caplog):
    """Another shard reading this store copies what checks out, logs the rest and leaves the files alone."""
    ids, xb = _data(400)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 300, 100)
    store.compact()
    starts = _write(store, ids, xb, 300, 400, 20)
    seg = max(tmp_path.glob("wal-*.log"))
    bad = sorted(tmp_path.glob("b*.snap"))[2]
    _flip(bad, 100)
    _flip(seg, starts[1] + 50)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    got = _state(read_buckets(tmp_path, N_BUCKETS, range(N_BUCKETS)))
    home = buckets_of(ids, N_BUCKETS)
    assert set(got) == {u for i, u in enumerate(ids)
                        if not (i < 300 and home[i] == int(bad.stem[1:])) and not 320 <= i < 340}
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / DAMAGED_DIR).exists() and store.damage == []
    assert _error_lines(caplog, bad.name) and _error_lines(caplog, seg.name)
    store.close()


def test_a_frame_being_appended_as_another_shard_reads_the_store_is_not_damage(tmp_path, caplog, monkeypatch):
    """A reader takes the active segment's size while the owner is halfway through an append (the file grows page by
    page), and the append ends before the reader looks at what lies past that size: the frame the size cuts is a
    torn tail, not damage (it once read on to the file's end and, finding the frame whole there, logged a "damaged
    log segment" for a store nothing was wrong with)."""
    ids, xb = _data(60)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    starts = _write(store, ids, xb, 0, 60, 20)
    seg = max(tmp_path.glob("wal-*.log"))
    cut = (starts[2] + seg.stat().st_size) // 2  # the last frame as far as its middle
    real = os.fstat

    def seen_mid_append(fd):
        st = real(fd)
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(seg.resolve()):
            return os.stat_result((*st[:6], cut, *st[7:]))
        return st

    monkeypatch.setattr(os, "fstat", seen_mid_append)
    with caplog.at_level(logging.ERROR):
        got = _state(read_buckets(tmp_path, N_BUCKETS, range(N_BUCKETS)))
    monkeypatch.undo()
    assert set(got) == set(ids[:40])  # what was written before it began: the append is "during the call"
    assert not _error_lines(caplog, seg.name)
    store.close()


def test_resync_ignores_a_frame_hidden_in_damaged_data(tmp_path):
    """Scanning on after damage does not stop at a valid-looking frame alone: the header after it must fit too."""
    ids, xb = _data(20)
    store = CollectionStore(tmp_path, N_BUCKETS)
    _write(store, ids, xb, 0, 20, 10)
    store.close()
    [seg] = tmp_path.glob("wal-*.log")
    hidden = _raw_record(["ghost"], xb[:1])
    with open(seg, "ab") as f:  # a damaged frame whose data holds a whole frame followed by junk
        body = b"\x12\x03abc" + hidden + b"\xff" * 32
        f.write(struct.pack("<II", len(body), 0) + body)
        f.write(_raw_record(ids[:1], xb[5:6]))
    store = CollectionStore(tmp_path, N_BUCKETS)
    got = _state(store.load())
    assert "ghost" not in got and got[ids[0]] == xb[5].tobytes()
    assert len(store.damage) == 1
    store.close()


# --- through a shard ------------------------------------------------------------------------------------------
def test_shard_reports_a_damaged_file_and_serves_the_rest(tmp_path, caplog):
    n = 600
    ids, xb = _data(n, seed=3)
    cluster = LocalCluster(tmp_path, shards=2, transport="grpc")
    try:
        cluster.router.create_collection(CollectionConfig("c", 8, "l2", "Flat", buckets=16))
        cluster.router.upsert("c", ids[:500], xb[:500])
        shard = cluster.placer.shards["shard-1"]
        shard.collection("c").store.compact()  # the first 500 go into bucket snapshots
        cluster.router.upsert("c", ids[500:], xb[500:])  # these stay in the log
        cluster.placer.stop_shard("shard-1")

        root = tmp_path / "shards" / "shard-1" / "c"
        for ckpt in root.glob("ckpt-*"):  # the stop's index checkpoint would spare the restart the snapshots
            ckpt.unlink()
        bad = min(root.glob("b*.snap"))
        bucket = int(bad.stem[1:])
        _flip(bad, bad.stat().st_size // 2, 16)
        cluster.placer.ensure_shard("shard-1")  # restarts and reloads from storage

        home = buckets_of(ids, 16)
        lost = [u for i, u in enumerate(ids) if i < 500 and home[i] == bucket]
        served = [u for u in ids if u not in set(lost)]
        assert lost and len(served) > n // 2
        found, vectors, _ = cluster.router.get("c", ids, include_vectors=True)
        assert found == served
        np.testing.assert_array_equal(vectors, xb[[ids.index(u) for u in served]])
        res = cluster.router.search("c", xb, 1)
        assert res.coverage == 1.0
        assert [r[0] for r, u in zip(res.ids, ids) if u in set(served)] == served  # each finds itself

        assert not bad.exists()
        [kept] = _kept_files(root, bad.name)
        stats = {info.shard_id: st for info, st in cluster.router.shard_stats()}
        [coll] = [c for c in stats["shard-1"].collections if c.name == "c"]
        assert len(coll.damaged) == 1
        assert coll.damaged[0].startswith(f"{bad.name}: checksum mismatch at byte 0") and str(kept) in coll.damaged[0]
        assert all(not c.damaged for c in stats["shard-0"].collections)
        assert any(str(kept) in line for line in _error_lines(caplog, bad.name))
    finally:
        cluster.close()


def test_damaged_length_of_the_last_frame_is_not_a_torn_tail(tmp_path):
    """A complete last frame whose length field is damaged looks cut short, but its checksum says it is whole."""
    ids, xb = _data(30)
    store = CollectionStore(tmp_path, N_BUCKETS)
    starts = _write(store, ids, xb, 0, 30, 10)
    store.close()
    [seg] = tmp_path.glob("wal-*.log")
    _flip(seg, starts[2] + 2, 1)
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids[:20])
    [d] = store.damage
    assert d.offset == starts[2] and "nothing after it could be read" in d.message
    assert len(_kept_files(tmp_path, seg.name)) == 1
    store.close()


def test_snapshot_damaged_under_a_running_store_is_set_aside_by_compaction(tmp_path):
    ids, xb = _data(200)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 100, 50)
    store.compact()
    bad = min(tmp_path.glob("b*.snap"))
    _flip(bad, 20)
    damaged_bytes = bad.read_bytes()
    _write(store, ids, xb, 100, 200, 50)
    store.compact()  # folds the new writes into a fresh snapshot rather than over the damaged one
    [d] = store.damage
    [kept] = _kept_files(tmp_path, bad.name)
    assert d.file == bad.name and kept.read_bytes() == damaged_bytes
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    home = buckets_of(ids, N_BUCKETS)
    assert set(_state(store.load())) == {u for i, u in enumerate(ids) if i >= 100 or home[i] != int(bad.stem[1:])}
    assert store.damaged() == [str(d)]
    store.close()


# --- files missing or cut short: the manifest and the mark say what each held ------------------------------------
def _ids_in(ids, bucket: int) -> set[str]:
    return {u for u, b in zip(ids, buckets_of(ids, N_BUCKETS).tolist()) if b == bucket}


@pytest.mark.parametrize("how", ["mid-frame", "frame boundary", "mid-frame after a crash", "emptied"])
def test_active_segment_cut_inside_acknowledged_writes_is_damage(tmp_path, caplog, how):
    """The end of the active segment cut off (a truncated file, not a crash mid-append): the writes it held were
    acknowledged (the mark counts them), so this is damage with a count, not a torn tail cut silently."""
    ids, xb = _data(50)
    store = CollectionStore(tmp_path, N_BUCKETS)
    starts = _write(store, ids, xb, 0, 50, 10)  # five frames
    store.close() if "crash" not in how else _crash(store)
    [seg] = tmp_path.glob("wal-*.log")
    size = seg.stat().st_size
    cut = {"frame boundary": starts[2], "emptied": 0}.get(how, starts[2] + 20)
    os.truncate(seg, cut)
    left = 0 if how == "emptied" else 2  # frames left whole

    store = CollectionStore(tmp_path, N_BUCKETS)
    assert _state(store.load()) == {uid: xb[i].tobytes() for i, uid in enumerate(ids[:10 * left])}
    [d] = store.damage
    assert (d.file, d.kind, d.offset) == (seg.name, "wal", starts[left])
    lost = 5 - left
    assert (f"{lost} of the 5 records written to it lost ({10 * lost} upserted or deleted ids in "
            f"{size - starts[left]} bytes)") in d.message
    [kept] = _kept_files(tmp_path, seg.name)
    assert d.kept == str(kept) and kept.stat().st_size == cut
    assert _notes(tmp_path, seg.name) and any(str(kept) in line for line in _error_lines(caplog, seg.name))
    assert seg.stat().st_size == starts[left]  # new frames follow the valid ones

    # Reported once: the store counts what is there now.
    store.append(UPSERT, ["new"], xb[:1], [None])
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert len(_state(store.load())) == 10 * left + 1
    assert store.damaged() == [str(d)]
    store.close()


@pytest.mark.parametrize("how", ["cut at a frame boundary", "cut mid-frame", "deleted"])
def test_sealed_segment_cut_or_deleted_is_damage(tmp_path, caplog, how):
    ids, xb = _data(60)
    store = CollectionStore(tmp_path, N_BUCKETS)
    starts = _write(store, ids, xb, 0, 30, 10)
    with store.wal.lock:
        store.wal.rotate_locked()  # seal it (without compacting it)
    _write(store, ids, xb, 30, 60, 10)
    store.close()
    sealed, active = sorted(tmp_path.glob("wal-*.log"))
    size = sealed.stat().st_size
    if how == "deleted":
        sealed.unlink()
    else:
        os.truncate(sealed, starts[1] + (0 if how == "cut at a frame boundary" else 30))

    store = CollectionStore(tmp_path, N_BUCKETS)
    left = 0 if how == "deleted" else 1
    assert set(_state(store.load())) == set(ids[:10 * left] + ids[30:])
    [d] = store.damage
    assert (d.file, d.kind) == (sealed.name, "wal")
    lost = 3 - left
    assert (f"{lost} of the 3 records written to it lost ({10 * lost} upserted or deleted ids in "
            f"{size - starts[left]} bytes)") in d.message
    if how == "deleted":
        assert d.message.startswith("log segment missing") and d.kept == "" and d.offset == 0
        assert not _kept_files(tmp_path, sealed.name)
    else:
        assert d.offset == starts[1] and d.kept == str(_kept_files(tmp_path, sealed.name)[0])
    assert len(_notes(tmp_path, sealed.name)) == 1 and _error_lines(caplog, sealed.name)
    assert not _kept_files(tmp_path, active.name)
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)  # the note keeps it listed; nothing is reported twice
    assert store.damaged() == [str(d)]
    assert len(_state(store.load())) == 10 * left + 30
    store.close()


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
def test_deleted_active_segment_is_damage(tmp_path, caplog, closed):
    ids, xb = _data(60)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 30, 10)
    store.compact()  # into snapshots
    _write(store, ids, xb, 30, 60, 10)  # the active segment holds these
    store.close() if closed else _crash(store)
    [seg] = tmp_path.glob("wal-*.log")
    size = seg.stat().st_size
    seg.unlink()

    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    assert set(_state(store.load())) == set(ids[:30])
    [d] = store.damage
    assert (d.file, d.kind, d.kept) == (seg.name, "wal", "")
    assert d.message == ("the active log segment is missing: 3 of the 3 records written to it lost "
                         f"(30 upserted or deleted ids in {size} bytes)")
    assert len(_notes(tmp_path, seg.name)) == 1 and _error_lines(caplog, seg.name)
    store.append(UPSERT, ["new"], xb[:1], [None])  # into the segment made again
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids[:30]) | {"new"}
    assert store.damaged() == [str(d)]
    store.close()


@pytest.mark.parametrize("how", ["deleted", "truncated", "cut to its header", "an older one"])
def test_snapshot_deleted_or_cut_is_damage(tmp_path, caplog, how):
    ids, xb = _data(400)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 200, 50)
    store.compact()
    bad = sorted(tmp_path.glob("b*.snap"))[1]
    older = bad.read_bytes()
    _write(store, ids, xb, 200, 300, 50)
    store.compact()  # rewrites the snapshots
    _write(store, ids, xb, 300, 400, 50)  # in the log only
    store.close()
    bucket = int(bad.stem[1:])
    held = len(_ids_in(ids[:300], bucket))
    if how == "deleted":
        bad.unlink()
    elif how == "truncated":
        os.truncate(bad, bad.stat().st_size // 2)
    elif how == "cut to its header":
        os.truncate(bad, 8)
    else:  # an older snapshot of the bucket put back: valid by itself, but not what was written last
        bad.write_bytes(older)

    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids) - _ids_in(ids[:300], bucket)
    [d] = store.damage
    assert (d.file, d.kind) == (bad.name, "snapshot")
    assert f"the items only in this snapshot are missing (it held {held} items" in d.message
    if how == "deleted":
        assert d.message.startswith("snapshot missing") and d.kept == ""
    else:
        [kept] = _kept_files(tmp_path, bad.name)
        assert d.kept == str(kept) and not bad.exists()
        assert ("not the snapshot written last" in d.message) == (how == "an older one")
    assert len(_notes(tmp_path, bad.name)) == 1 and _error_lines(caplog, bad.name)
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert store.damaged() == [str(d)]
    store.compact()  # the bucket's snapshot is made again from the log
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids) - _ids_in(ids[:300], bucket)
    assert store.damaged() == [str(d)]
    store.close()


def test_files_gone_under_a_running_store_are_reported_by_compaction(tmp_path):
    """Compaction folds what the manifest records: a segment or snapshot deleted meanwhile is reported, not folded
    over as if it had never held anything."""
    ids, xb = _data(300)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 100, 50)
    store.compact()
    snap = sorted(tmp_path.glob("b*.snap"))[2]
    _write(store, ids, xb, 100, 200, 50)
    with store.wal.lock:
        store.wal.rotate_locked()
    _write(store, ids, xb, 200, 300, 50)
    sealed = min(tmp_path.glob("wal-*.log"))
    snap.unlink()
    sealed.unlink()
    assert store.compact() == 1
    assert sorted(d.file for d in store.damage) == sorted([snap.name, sealed.name])
    by_file = {d.file: d for d in store.damage}
    assert "2 of the 2 records written to it lost (100 upserted or deleted ids" in by_file[sealed.name].message
    bucket = int(snap.stem[1:])
    assert f"it held {len(_ids_in(ids[:100], bucket))} items" in by_file[snap.name].message
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids[200:]) | (set(ids[:100]) - _ids_in(ids[:100], bucket))
    assert len(store.damage) == 2
    store.close()


def test_reopening_finds_no_damage_after_close_rotation_compaction_or_a_crash(tmp_path, caplog):
    ids, xb = _data(300)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    want: dict[str, bytes] = {}

    def reopen(crash: bool = False):
        _crash(store) if crash else store.close()
        s = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
        assert _state(s.load()) == want
        assert s.damage == [] and not (tmp_path / DAMAGED_DIR).exists()
        return s

    def write(a, b):
        _write(store, ids, xb, a, b, 25)
        want.update({uid: xb[i].tobytes() for i, uid in enumerate(ids[a:b], a)})

    store = reopen()  # nothing written
    write(0, 50)
    store = reopen()
    write(50, 100)
    with store.wal.lock:
        store.wal.rotate_locked()
    store = reopen()  # a sealed segment and an empty active one
    write(100, 150)
    store = reopen(crash=True)
    assert store.compact() == 2
    store = reopen()
    write(150, 200)
    store.append(DELETE, ids[:20])
    for uid in ids[:20]:
        del want[uid]
    store.reset([3])
    for uid in _ids_in(list(want), 3):
        del want[uid]
    store.compact()  # bucket 3's snapshot deleted (RESET), the others rewritten
    store = reopen(crash=True)
    write(200, 300)
    store.segment_bytes = 4096  # sealed and compacted in the background as it goes
    write(0, 100)
    store.compact()
    store = reopen()
    store.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _copy(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def test_a_crash_at_any_step_of_compaction_is_not_damage(tmp_path, monkeypatch):
    """Stops a compaction (sealing the active segment first, in two passes) before each rename or deletion it
    makes, as a crash would, then reopens: nothing is reported, nothing is lost, and it completes afterwards."""
    ids, xb = _data(600)
    base = tmp_path / "base"
    store = CollectionStore(base, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 200, 50)
    store.compact()  # snapshots to replace
    _write(store, ids, xb, 200, 400, 50)
    with store.wal.lock:
        store.wal.rotate_locked()
    _write(store, ids, xb, 400, 600, 50)
    store.append(DELETE, ids[:10])
    store.reset([1])  # bucket 1's snapshot is deleted
    _crash(store)
    reference = CollectionStore(_copy(base, tmp_path / "ref"), N_BUCKETS)
    want = _state(reference.load())
    reference.close()
    assert len(want) == 590 - len(_ids_in(ids[10:], 1))

    real_replace, real_unlink = os.replace, os.unlink
    for crash_at in range(1, 100):
        work = _copy(base, tmp_path / "work")
        store = CollectionStore(work, N_BUCKETS, segment_bytes=1 << 30)
        store.compact_pass_bytes = 8 << 10  # several passes
        steps = [0]

        def counted(real, steps=steps, crash_at=crash_at):
            def op(*args, **kwargs):
                steps[0] += 1
                if steps[0] == crash_at:
                    raise _Crash()
                return real(*args, **kwargs)
            return op

        monkeypatch.setattr(os, "replace", counted(real_replace))
        monkeypatch.setattr(os, "unlink", counted(real_unlink))
        try:
            store.compact()
            finished = True
        except _Crash:
            finished = False
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(os, "unlink", real_unlink)
        _crash(store)
        store = CollectionStore(work, N_BUCKETS)
        assert store.damage == [], f"crash before step {crash_at}: {store.damaged()}"
        assert _state(store.load()) == want, f"crash before step {crash_at}"
        store.compact()
        store.close()
        store = CollectionStore(work, N_BUCKETS)
        assert store.damage == [] and _state(store.load()) == want
        assert len(list(work.glob("wal-*.log"))) == 1
        store.close()
        if finished:
            break
    assert crash_at > 10  # it did stop at each step: sealing, two passes, deleting the segments


@pytest.mark.parametrize("where", ["append", "rotation"])
def test_a_crash_before_the_mark_moves_is_not_damage(tmp_path, monkeypatch, where):
    """The mark is written after the log's fsync: a crash in between leaves a durable write the mark does not count
    (kept), or, when a segment is sealed, a mark of the sealed segment (ignored)."""
    ids, xb = _data(40)
    store = CollectionStore(tmp_path, N_BUCKETS)
    _write(store, ids, xb, 0, 20, 10)

    def crash(*_, **__):
        raise _Crash()

    monkeypatch.setattr(store.wal, "write_mark", crash)
    with pytest.raises(_Crash):
        if where == "append":
            store.append(UPSERT, ids[20:30], xb[20:30], [None] * 10)
        else:
            with store.wal.lock:
                store.wal.rotate_locked()
    _crash(store)
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids[:30] if where == "append" else ids[:20])
    assert store.damage == []
    _write(store, ids, xb, 30, 40, 10)
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert store.damage == [] and len(_state(store.load())) == (40 if where == "append" else 30)
    store.close()


def test_store_from_before_manifests_opens_clean_and_is_accounted_for_afterwards(tmp_path, caplog):
    ids, xb = _data(300)
    store = CollectionStore(tmp_path, N_BUCKETS, segment_bytes=1 << 30)
    _write(store, ids, xb, 0, 100, 50)
    store.compact()
    _write(store, ids, xb, 100, 200, 50)
    with store.wal.lock:
        store.wal.rotate_locked()
    _write(store, ids, xb, 200, 300, 50)
    store.close()
    # What a store written before manifests looks like: the same segments and snapshots, nothing else.
    (tmp_path / MANIFEST).unlink()
    (tmp_path / MARK).unlink()
    active = max(tmp_path.glob("wal-*.log"))
    with open(active, "ab") as f:  # and a torn tail
        f.write(_raw_record(["torn"], xb[:1])[:-3])

    store = CollectionStore(tmp_path, N_BUCKETS)
    assert set(_state(store.load())) == set(ids)
    assert store.damage == [] and not (tmp_path / DAMAGED_DIR).exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (tmp_path / MANIFEST).exists() and (tmp_path / MARK).exists()
    store.close()
    # From now on every file is accounted for.
    sealed = min(tmp_path.glob("wal-*.log"))
    snap = min(tmp_path.glob("b*.snap"))
    sealed.unlink()
    snap.unlink()
    store = CollectionStore(tmp_path, N_BUCKETS)
    assert sorted(d.file for d in store.damage) == sorted([sealed.name, snap.name])
    by_file = {d.file: d for d in store.damage}
    assert "2 of the 2 records written to it lost (100 upserted or deleted ids" in by_file[sealed.name].message
    # adopted from its header alone, its items were counted when it was loaded
    assert f"it held {len(_ids_in(ids[:100], int(snap.stem[1:])))} items" in by_file[snap.name].message
    store.close()



def test_damaged_manifest_is_set_aside_and_the_files_adopted(tmp_path):
    ids, xb = _data(100)
    store = CollectionStore(tmp_path, N_BUCKETS)
    _write(store, ids, xb, 0, 50, 50)
    store.compact()
    _write(store, ids, xb, 50, 100, 50)
    store.close()
    (tmp_path / MANIFEST).write_text('{"format": 1, "active": ')
    store = CollectionStore(tmp_path, N_BUCKETS)
    [d] = store.damage
    assert (d.file, d.kind) == (MANIFEST, "manifest") and "adopted" in d.message
    assert set(_state(store.load())) == set(ids)
    store.close()
    store = CollectionStore(tmp_path, N_BUCKETS)  # a new manifest was written: nothing more to report
    assert store.damaged() == [str(d)]
    store.close()


def test_snapshots_of_buckets_given_away_are_deleted_once_the_drop_is_final(tmp_path):
    """A move's source drops the buckets it gave away: their snapshots (tens of MB each) go with them, not when the
    log next fills a segment; the buckets it keeps and a reopen are untouched (no damage reported)."""
    import time

    from lookalike.config import CollectionConfig
    from lookalike.ids import buckets_of
    from shard.shard import Shard

    cfg = CollectionConfig("m", 8, "l2", "Flat", buckets=4).validated()
    shard = Shard("shard-0", tmp_path)
    shard.open_collection(cfg, range(4))
    sc = shard.collection("m")
    ids = [f"v{i}" for i in range(400)]
    sc.upsert(ids, np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32), [None] * 400)
    sc.store.compact()
    snaps = sorted(p.name for p in sc.store.path.glob("b*.snap"))
    assert len(snaps) == 4
    assert sc.drop_buckets([0, 1], epoch=5) == int(np.isin(buckets_of(ids, 4), [0, 1]).sum())
    deadline = time.monotonic() + 30
    while sorted(p.name for p in sc.store.path.glob("b*.snap")) != snaps[2:] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.name for p in sc.store.path.glob("b*.snap")) == snaps[2:]
    kept = len(sc.table)
    shard.close()
    again = Shard("shard-0", tmp_path)
    assert again.open_collection(cfg, [2, 3]) == kept
    assert not again.collection("m").store.damage
    again.close()
