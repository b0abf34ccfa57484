"""Index checkpoints: a shard restart loads the built index and id table and replays only the log written after
them; one that does not check out is reported as damage and the storage replayed in full, with the same answers."""

import dataclasses
import json
import shutil
import threading
import zlib

import faiss
import numpy as np
import pytest

from conftest import make_data, trained_config, wait_for
from lookalike.config import CollectionConfig
from lookalike.ids import buckets_of
from protos.common_pb2 import Payload
import shard.checkpointing as checkpointing
import shard.cpu_index
from shard.shard import Shard
from shard.cpu_index import VectorIndex

N_BUCKETS = 8


def _cfg(spec="Flat", metric="l2", dim=16, root=None, xb=None, **kw):
    """The collection's config; for a spec that needs training, trained first on ``xb`` under ``root``."""
    cfg = CollectionConfig("c", dim, metric, spec, buckets=N_BUCKETS, **kw).validated()
    return trained_config(root, cfg, xb) if root is not None else cfg


def _ids(n, start=0):
    return [f"i{i}" for i in range(start, start + n)]


def _payloads(ids):
    return [Payload(fields={"n": u}).SerializeToString() if int(u[1:]) % 3 else None for u in ids]


def _open(root, cfg, segment_bytes=64 << 20, buckets=range(N_BUCKETS)):
    shard = Shard("s", root, segment_bytes=segment_bytes)
    shard.open_collection(cfg, buckets)
    return shard, shard.collection(cfg.name)


def _fill(sc, xb, start, stop, step=250):
    ids = _ids(len(xb))
    for i in range(start, stop, step):
        sc.upsert(ids[i:i + step], xb[i:i + step], _payloads(ids[i:i + step]))


def _answers(sc, xq, k=10):
    D, L, ids, payloads = sc.search(xq, k, include_payloads=True)
    return D.copy(), L.copy(), ids, payloads


def _same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2] and a[3] == b[3]


def _store_dir(root):
    return root / "shards" / "s" / "c"


def _no_rebuild(monkeypatch):
    """Makes any add to an index, training or graph rebuild fail: a load that uses them did not load a checkpoint."""
    def refuse(*_a, **_k):
        raise AssertionError("the index was rebuilt instead of loaded")
    monkeypatch.setattr(VectorIndex, "add", refuse)
    monkeypatch.setattr(VectorIndex, "build_trained", refuse)
    monkeypatch.setattr(shard.cpu_index, "_rebuild_graph", refuse)


def _full_replay(root, tmp_path, cfg, name="replay"):
    """What a restart without any checkpoint answers: a copy of the storage, checkpoints removed."""
    copy = tmp_path / name
    shutil.copytree(root, copy)
    for p in _store_dir(copy).glob("ckpt-*"):
        p.unlink()
    shard, sc = _open(copy, cfg)
    assert not sc.loaded_from_checkpoint
    return shard, sc


# --- (a) a graceful restart loads the checkpoint ----------------------------------------------------------------
@pytest.mark.parametrize("spec,metric,n", [("Flat", "l2", 1500), ("IVF16,Flat", "l2", 3000), ("HNSW32", "ip", 1500),
                                           ("BFlat", "hamming", 800)])
def test_restart_after_close_loads_the_checkpoint(tmp_path, monkeypatch, spec, metric, n):
    dim = 64 if metric == "hamming" else 16
    xb, xq = make_data(metric, n, dim)
    root = tmp_path / "data"
    cfg = _cfg(spec, metric, dim, root, xb)
    shard, sc = _open(root, cfg)
    _fill(sc, xb, 0, n)
    sc.delete(_ids(40))  # HNSW: dead positions the checkpoint must keep hidden
    assert sc.index.trained
    before = _answers(sc, xq)
    got_before = sc.get(_ids(3, 39), include_vectors=True)
    shard.close()
    assert sorted(p.suffix for p in _store_dir(root).glob("ckpt-*")) == [".index", ".json", ".table"]

    with monkeypatch.context() as m:
        _no_rebuild(m)
        shard, sc = _open(root, cfg)
        assert sc.loaded_from_checkpoint and sc.replayed_records == 0
        stats = sc.stats()
        assert stats["loaded_from_checkpoint"] and stats["trained"] and stats["vectors"] == n - 40
        _same(_answers(sc, xq), before)
        found, vectors, payloads = sc.get(_ids(3, 39), include_vectors=True)
        assert found == got_before[0] == ["i40", "i41"] and payloads == got_before[2] == _payloads(found)
        np.testing.assert_array_equal(vectors, got_before[1])
    # it keeps taking writes (replacing, deleting) exactly like an index that was never restarted
    _fill(sc, xb[::-1].copy(), 0, 500)
    sc.delete(_ids(30, 100))
    after = _answers(sc, xq)
    shard.close()
    replay_shard, replay = _full_replay(root, tmp_path, cfg)
    np.testing.assert_array_equal(replay.table.labels, sc.table.labels)
    assert replay.table.payloads_at(np.arange(len(sc.table))) == sc.table.payloads_at(np.arange(len(sc.table)))
    if spec.startswith("HNSW"):  # a graph built in another order: the same items, nearly the same neighbours
        hits = [len(set(a) & set(b)) for a, b in zip(np.reshape(_answers(replay, xq)[2], (-1, 10)),
                                                    np.reshape(after[2], (-1, 10)))]
        assert sum(hits) >= 0.9 * len(xq) * 10
    else:
        _same(_answers(replay, xq), after)
    replay_shard.close()


# --- (b) writes after the checkpoint, then a kill -----------------------------------------------------------------
def test_writes_after_the_checkpoint_are_replayed_on_top_after_a_kill(tmp_path, monkeypatch):
    cfg = _cfg("HNSW32")
    xb, xq = make_data("l2", 3000, 16)
    root = tmp_path / "data"
    shard, sc = _open(root, cfg)
    _fill(sc, xb, 0, 2000)
    shard.close()
    shard, sc = _open(root, cfg)
    assert sc.loaded_from_checkpoint
    _fill(sc, xb, 2000, 3000, step=100)      # 10 records
    sc.delete(_ids(50))                       # 1
    sc.upsert(_ids(5, 60), xb[:5], [None] * 5)  # 1: replaces
    want = _answers(sc, xq)
    # killed: no close, no checkpoint. The next start loads the checkpoint and replays the 12 records.
    real_add = VectorIndex.add
    added = []
    monkeypatch.setattr(VectorIndex, "add", lambda self, labels, x: added.append(len(labels)) or
                        real_add(self, labels, x))
    again, sc2 = _open(root, cfg)
    assert sc2.loaded_from_checkpoint and sc2.replayed_records == 12
    assert sum(added) == 1000 + 5  # only the writes after the checkpoint were applied
    _same(_answers(sc2, xq), want)
    assert sc2.get(["i60", "i10"], False)[0] == ["i60"]
    sc.store.close()

    # A checkpoint taken in the background while writes go on covers what was logged before it.
    sc2.checkpoint_every_bytes = 1
    sc2.upsert(["late"], xb[:1], [None])
    for t in threading.enumerate():
        if t.name.startswith("checkpoint-"):
            t.join()
    assert sc2._checkpoint_at is not None and sc2._checkpoint_at.records > 0
    sc2.checkpoint_every_bytes = 1 << 40
    sc2.upsert(["later"], xb[1:2], [None])
    want = _answers(sc2, xq)
    third, sc3 = _open(root, cfg)
    assert sc3.loaded_from_checkpoint and sc3.replayed_records == 1
    _same(_answers(sc3, xq), want)
    sc2.store.close()
    third.close()


# --- (c) compaction --------------------------------------------------------------------------------------------
def test_compaction_keeps_what_the_checkpoint_needs_and_restarts_stay_exact(tmp_path):
    xb, xq = make_data("l2", 4000, 16, seed=1)
    root = tmp_path / "data"
    cfg = _cfg("IVF16,Flat", root=root, xb=xb[:2000])
    shard, sc = _open(root, cfg, segment_bytes=40_000)  # small segments: sealed and compacted as writes go
    _fill(sc, xb, 0, 2000)
    sc.store.compact()
    with sc._write_order:
        assert sc.checkpoint()
    position = sc._checkpoint_at
    _fill(sc, xb, 2000, 4000, step=100)
    sc.delete(_ids(100, 500))
    sc.store.compact()  # folds the segments written since the checkpoint, keeps them: it does not cover them
    segs = sorted(p.name for p in _store_dir(root).glob("wal-*.log"))
    assert segs[0] == position.segment and len(segs) > 2
    manifest = json.loads((_store_dir(root) / "manifest.json").read_text())
    assert manifest["folded"] and set(manifest["folded"]) <= set(segs)
    sc.store.compact()  # nothing new to fold: the kept segments are not folded again
    want = _answers(sc, xq)

    killed, sc2 = _open(root, cfg)  # a kill: loads the checkpoint, replays the kept segments
    assert sc2.loaded_from_checkpoint and sc2.replayed_records > 0 and not sc2.store.damaged()
    _same(_answers(sc2, xq), want)
    replay_shard, replay = _full_replay(root, tmp_path, cfg)  # snapshots + the kept (folded) segments: the same
    _same(_answers(replay, xq), want)
    replay_shard.close()
    sc2.store.close()

    with sc._write_order:  # a newer checkpoint covers them: they go
        assert sc.checkpoint()
    assert sc.store.trim_log() > 0
    assert sorted(p.name for p in _store_dir(root).glob("wal-*.log"))[0] == sc._checkpoint_at.segment
    assert len(list(_store_dir(root).glob("ckpt-*.json"))) == 1
    shard.close()
    again, sc3 = _open(root, cfg)
    assert sc3.loaded_from_checkpoint and sc3.replayed_records == 0 and not sc3.store.damaged()
    _same(_answers(sc3, xq), want)
    again.drop_collection("c")  # dropping deletes the checkpoint with the rest
    assert not _store_dir(root).exists()
    again.close()


# --- (d) damaged checkpoints --------------------------------------------------------------------------------------
def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path, _offset):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _rewrite_json(edit):
    def apply(path, _offset):
        note = path.with_suffix(".json")
        meta = json.loads(note.read_text())
        edit(path, meta)
        note.write_text(json.dumps(meta))
    return apply


def _garbage_with_its_crc(path, meta):  # a file whose CRC matches but that FAISS refuses
    data = b"this is not a FAISS index" * 10
    path.write_bytes(data)
    meta["files"][path.name] = {"bytes": len(data), "crc32": zlib.crc32(data)}


def _position_past_the_log(_path, meta):
    meta["position"]["records"] += 5


@pytest.mark.parametrize("suffix,damage,words", [
    (".index", _flip, "CRC-32"),
    (".table", _truncate, "bytes"),
    (".index", _rewrite_json(_garbage_with_its_crc), "FAISS cannot read it"),
    (".json", _rewrite_json(_position_past_the_log), "no longer in the log"),
    (".json", _truncate, "unreadable"),
])
def test_a_damaged_checkpoint_is_reported_and_the_storage_replayed(tmp_path, suffix, damage, words):
    cfg = _cfg("HNSW32")
    xb, xq = make_data("l2", 1200, 16, seed=2)
    root = tmp_path / "data"
    shard, sc = _open(root, cfg)
    _fill(sc, xb, 0, 1200)
    sc.delete(_ids(20))
    want = _answers(sc, xq)
    shard.close()
    [target] = _store_dir(root).glob(f"ckpt-*{suffix}")
    damage(target, target.stat().st_size // 2)

    shard, sc = _open(root, cfg)
    assert not sc.loaded_from_checkpoint
    _same(_answers(sc, xq), want)
    [line] = sc.stats()["damaged"]
    assert line.startswith(f"{target.name}: index checkpoint") and words in line, line
    kept = sorted(p.name for p in (_store_dir(root) / "damaged").iterdir())
    assert len(kept) == 4 and all(n.startswith("ckpt-") for n in kept)  # the three files and the note
    assert not list(_store_dir(root).glob("ckpt-*"))
    shard.close()  # writes a new checkpoint, used by the next start; the damage stays listed
    shard, sc = _open(root, cfg)
    assert sc.loaded_from_checkpoint and len(sc.stats()["damaged"]) == 1
    _same(_answers(sc, xq), want)
    shard.close()


def test_a_checkpoint_without_its_json_is_an_interrupted_one_and_ignored(tmp_path):
    cfg = _cfg("Flat")
    xb, xq = make_data("l2", 500, 16)
    root = tmp_path / "data"
    shard, sc = _open(root, cfg)
    _fill(sc, xb, 0, 500)
    want = _answers(sc, xq)
    shard.close()
    [note] = _store_dir(root).glob("ckpt-*.json")
    note.unlink()
    shard, sc = _open(root, cfg)
    assert not sc.loaded_from_checkpoint and not sc.stats()["damaged"]
    assert not list(_store_dir(root).glob("ckpt-*"))  # its files are deleted
    _same(_answers(sc, xq), want)
    shard.close()


def test_a_failed_checkpoint_never_fails_a_write_or_loses_data(tmp_path, monkeypatch):
    cfg = _cfg("Flat")
    xb, xq = make_data("l2", 600, 16)
    root = tmp_path / "data"
    shard, sc = _open(root, cfg)
    _fill(sc, xb, 0, 300)
    with sc._write_order:
        first = sc.checkpoint()
    def full(*_a, **_k):
        raise RuntimeError("Error: 'ret == (n)' failed: write error in ckpt: No space left on device")
    monkeypatch.setattr(faiss, "write_index", full)
    sc.checkpoint_every_bytes = 1  # every write asks for one, in the background
    _fill(sc, xb, 300, 600)
    want = _answers(sc, xq)
    shard.close()  # its checkpoint fails too
    monkeypatch.undo()
    assert sorted(p.name for p in _store_dir(root).glob("ckpt-*"))[0].startswith(first)
    assert len(list(_store_dir(root).glob("ckpt-*"))) == 3  # the first one, whole; nothing of the failed ones
    shard, sc = _open(root, cfg)
    assert sc.loaded_from_checkpoint == first and sc.replayed_records > 0
    _same(_answers(sc, xq), want)
    shard.close()


def test_a_background_checkpoint_hands_the_memory_it_freed_back(tmp_path, monkeypatch):
    """Writing a checkpoint allocates and frees about a tenth of the index's bytes; a shard read after the writes
    stopped counted them as resident (13-17 bytes a vector at 500k here) until something else trimmed. Not while
    buckets are copied in: a trim holds the allocator's locks and would stall the searches (shard.moves)."""
    released = []
    monkeypatch.setattr(checkpointing, "release_memory", lambda: released.append(threading.current_thread().name),
                        raising=False)
    xb, _ = make_data("l2", 600, 16)
    shard, sc = _open(tmp_path / "data", _cfg("Flat"))
    try:
        _fill(sc, xb, 0, 300)
        assert not released  # no checkpoint yet (checkpoint_every_bytes is far)
        sc.checkpoint_every_bytes = 1  # the next write asks for one, in the background
        _fill(sc, xb, 300, 301, step=1)
        assert wait_for(lambda: released, 10)
        assert released[0].startswith("checkpoint-"), released  # by the checkpoint's own thread, once written
        released.clear()
        written = sc._checkpoint_at
        sc.joining[0] = set()  # as while bucket 0 is copied in (shard.moves.Moves.join)
        _fill(sc, xb, 301, 302, step=1)
        assert wait_for(lambda: not sc.checkpointer._pending and sc._checkpoint_at != written, 10)  # another one
        assert not released, released
        sc.joining.clear()
    finally:
        shard.close()


# --- (e) a checkpoint written for something else ----------------------------------------------------------------------
# (a checkpoint of an older trained version is used: tests/test_trained_index.py)
@pytest.mark.parametrize("written, change", [({"trained_version": 2}, {"trained_version": 1}),
                                             ({}, {"index": "HNSW16"})], ids=["a later trained version", "spec"])
def test_a_checkpoint_of_another_spec_or_a_later_trained_version_is_not_used(tmp_path, written, change):
    cfg = dataclasses.replace(CollectionConfig("c", 16, "l2", "HNSW32", buckets=N_BUCKETS).validated(), **written)
    xb, xq = make_data("l2", 800, 16)
    root = tmp_path / "data"
    shard, sc = _open(root, cfg)
    _fill(sc, xb, 0, 800)
    want = sc.search(xq, 5)[2]
    shard.close()
    other = dataclasses.replace(cfg, **change)
    shard = Shard("s", root)
    shard.open_collection(other, range(other.buckets))
    sc = shard.collection("c")
    assert not sc.loaded_from_checkpoint and not sc.stats()["damaged"]
    assert sc.search(xq, 5)[2] == want
    assert not list(_store_dir(root).glob("ckpt-0000000001.*"))  # deleted; the close wrote one for this spec
    shard.close()


def test_buckets_moved_away_are_removed_and_buckets_gained_force_a_full_replay(tmp_path):
    cfg = _cfg("Flat")
    xb, xq = make_data("l2", 800, 16)
    root = tmp_path / "data"
    shard, sc = _open(root, cfg, buckets=range(6))
    ids = _ids(800)
    owned = [u for u, b in zip(ids, buckets_of(ids, N_BUCKETS))
             if b < 6]
    sc.upsert(owned, xb[[int(u[1:]) for u in owned]], [None] * len(owned))
    shard.close()
    shard, sc = _open(root, cfg, buckets=range(3))  # the controller moved buckets 3-5 away meanwhile
    assert sc.loaded_from_checkpoint and set(sc.bucket_counts().nonzero()[0].tolist()) == {0, 1, 2}
    fewer = sc.search(xq, 5)[2]
    sc.store.close()  # killed: the checkpoint still holds buckets 0-5
    shard, sc = _open(root, cfg, buckets=range(8))  # owns buckets the checkpoint has no items of
    assert not sc.loaded_from_checkpoint and not sc.stats()["damaged"]
    assert set(sc.bucket_counts().nonzero()[0].tolist()) == set(range(6))
    shard.close()
    shard, sc = _open(root, cfg, buckets=range(3))
    assert sc.loaded_from_checkpoint and sc.search(xq, 5)[2] == fewer
    shard.close()


def test_a_checkpoint_is_not_trusted_after_a_load_that_killed_the_process(tmp_path):
    """The process died during the last load (REPLAYING left behind): reading the checkpoint may have been the cause,
    so it is kept aside as damage and the storage replayed instead."""
    cfg = _cfg("Flat")
    xb, xq = make_data("l2", 300, 16)
    root = tmp_path / "data"
    shard, sc = _open(root, cfg)
    _fill(sc, xb, 0, 300)
    want = _answers(sc, xq)
    shard.close()
    (_store_dir(root) / "REPLAYING").write_text(json.dumps({"attempts": 1}))
    shard, sc = _open(root, cfg)
    assert not sc.loaded_from_checkpoint
    [line] = sc.stats()["damaged"]
    assert line.startswith("ckpt-0000000001.json: index checkpoint not used: the shard process died") and \
        "kept aside" in line
    _same(_answers(sc, xq), want)
    shard.close()
