"""Plain classes, no Ray, no gRPC: the FAISS index wrapper, the id table, the merge and durable storage."""

import gc
import tracemalloc

import numpy as np
import pytest

from conftest import exact_knn, make_data
from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument
from lookalike.ids import buckets_and_labels
from protos.common_pb2 import Payload
from lookalike.topk import merge_topk
from shard.shard import Shard
from shard.cpu_index import VectorIndex
from shard.idtable import IdTable
from shard.records import DELETE, UPSERT
from shard.store import CollectionStore


def _labels(n, start=0):
    return np.arange(start, start + n, dtype=np.int64) * 7 + 3


@pytest.mark.parametrize("metric,spec", [("l2", "Flat"), ("ip", "Flat"), ("cosine", "Flat"), ("hamming", "BFlat")])
def test_flat_index_is_exact(metric, spec):
    xb, xq = make_data(metric, 2000, 64)
    index = VectorIndex(CollectionConfig("c", 64, metric, spec).validated())
    index.add(_labels(2000), xb)
    D, L = index.search(xq, 10)
    D_ref, I_ref = exact_knn(metric, xb, xq, 10)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    if metric != "hamming":
        np.testing.assert_array_equal(L, _labels(2000)[I_ref])


def test_untrained_ivf_answers_exactly_then_trains():
    xb, xq = make_data("l2", 3000, 32)
    index = VectorIndex(CollectionConfig("c", 32, "l2", "IVF16,Flat", nprobe=16).validated())
    assert not index.trained and index.train_size == 1000  # lookalike.indexspec.training_points: at least 1000
    index.add(_labels(500), xb[:500])
    assert not index.train_if_ready()
    D, L = index.search(xq, 5)
    np.testing.assert_array_equal(L, _labels(500)[exact_knn("l2", xb[:500], xq, 5)[1]])
    index.add(_labels(2500, 500), xb[500:])
    assert index.train_if_ready()
    assert index.trained and index.ntotal == 3000
    _, L = index.search(xq, 5)  # nprobe == nlist: still exact
    np.testing.assert_array_equal(L, _labels(3000)[exact_knn("l2", xb, xq, 5)[1]])


@pytest.mark.parametrize("spec", ["HNSW16", "IVF8,Flat"])
def test_remove_hides_vectors_and_rebuilds(spec):
    xb, _ = make_data("l2", 3000, 16)
    index = VectorIndex(CollectionConfig("c", 16, "l2", spec, nprobe=8, ef_search=128).validated())
    labels = _labels(3000)
    index.add(labels, xb)
    index.train_if_ready()
    gone = labels[:1500]  # past the rebuild threshold for HNSW
    assert index.remove(gone) == 1500
    assert index.ntotal == 1500
    _, L = index.search(xb[:20], 1)
    assert not np.isin(L, gone).any()
    _, L = index.search(xb[2000:2020], 1)
    np.testing.assert_array_equal(L[:, 0], labels[2000:2020])
    np.testing.assert_allclose(index.reconstruct(labels[2000:2002]), xb[2000:2002], rtol=1e-6)


def test_bad_index_spec_is_a_clear_error():
    with pytest.raises(InvalidArgument, match="not a supported index"):
        CollectionConfig("c", 16, "l2", "NoSuchIndex").validated()
    with pytest.raises(InvalidArgument, match="multiple of 8"):
        CollectionConfig("c", 12, "hamming").validated()


def test_merge_keeps_metric_direction_and_drops_copies():
    # shard 0 and 1 both hold label 5 (a bucket mid-move); best-first lists
    D = np.array([[[0.1, 0.4, 0.9]], [[0.1, 0.2, 0.3]]], dtype=np.float32)
    L = np.array([[[5, 6, 7]], [[5, 8, 9]]], dtype=np.int64)
    Dm, Im = merge_topk(D, L, larger_is_better=False)
    assert L.ravel()[Im[0]].tolist() == [5, 8, 9]
    np.testing.assert_allclose(Dm[0], [0.1, 0.2, 0.3])
    # similarities: larger first
    S = np.array([[[0.9, 0.4, 0.1]], [[0.9, 0.3, 0.2]]], dtype=np.float32)
    Ls = np.array([[[5, 6, 7]], [[5, 8, 9]]], dtype=np.int64)
    Dm, Im = merge_topk(S, Ls, larger_is_better=True)
    assert Ls.ravel()[Im[0]].tolist() == [5, 6, 8]
    np.testing.assert_allclose(Dm[0], [0.9, 0.4, 0.3])


def test_storage_replays_after_torn_write(tmp_path):
    store = CollectionStore(tmp_path, n_buckets=8)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.append(UPSERT, ["a", "b", "c"], x, [None, Payload(fields={"k": "v"}).SerializeToString(), None])
    store.append(DELETE, ["b"])
    store.close()
    seg = sorted(tmp_path.glob("wal-*.log"))[-1]
    with open(seg, "ab") as f:  # a write cut short by kill -9: never acknowledged
        f.write(b"\x10\x00\x00\x00garbage")
    store = CollectionStore(tmp_path, n_buckets=8)
    batches = list(store.load())
    assert [(b.op, b.ids) for b in batches] == [(UPSERT, ["a", "b", "c"]), (DELETE, ["b"])]
    np.testing.assert_array_equal(batches[0].vectors, x)
    store.append(UPSERT, ["d"], x[:1], [None])  # appends after the torn tail was cut
    assert [b.ids for b in store.load()][-1] == ["d"]


def test_compaction_keeps_state_and_is_idempotent(tmp_path):
    xb, _ = make_data("l2", 600, 8)
    ids = [f"id{i}" for i in range(600)]
    store = CollectionStore(tmp_path, n_buckets=4, segment_bytes=1 << 30)
    for i in range(0, 600, 100):
        store.append(UPSERT, ids[i:i + 100], xb[i:i + 100], [None] * 100)
    store.append(UPSERT, ids[:10], xb[590:600], [None] * 10)  # replace
    store.append(DELETE, ids[10:20])

    def state():
        items = {}
        for b in store.load():
            for i, uid in enumerate(b.ids):
                if b.op == DELETE:
                    items.pop(uid, None)
                else:
                    items[uid] = b.vectors[i].tobytes()
        return items

    before = state()
    assert store.compact() == 1
    assert not list(tmp_path.glob("wal-*.log"))[:-1]
    assert state() == before
    assert len(before) == 590 and before["id0"] == xb[590].tobytes()


def test_shard_reload_restores_everything(tmp_path):
    coll = CollectionConfig("c", 16, "l2", "Flat", buckets=8).validated()
    xb, xq = make_data("l2", 1000, 16)
    ids = [f"i{i}" for i in range(1000)]
    shard = Shard("s", tmp_path, segment_bytes=20_000)  # small segments: compaction runs too
    shard.open_collection(coll, range(8))
    sc = shard.collection("c")
    for i in range(0, 1000, 100):
        sc.upsert(ids[i:i + 100], xb[i:i + 100], [Payload(fields={"n": str(i)}).SerializeToString()] * 100)
    sc.delete(ids[:50])
    want = sc.search(xq, 5)[2]
    shard.close()
    again = Shard("s", tmp_path)
    assert again.open_collection(coll, range(8)) == 950
    assert again.collection("c").search(xq, 5)[2] == want
    found, _, payloads = again.collection("c").get(["i0", "i60"], False)
    assert found == ["i60"] and Payload.FromString(payloads[0]).fields["n"] == "0"


def test_id_table_collisions_unicode_and_removal():
    from shard.idtable import IdTable

    t = IdTable()
    uids = ["a", "ü-ид-画像", "x" * 256, "b"]
    home = np.array([100, 100, 100, 7 << 40], dtype=np.int64)  # three ids hash to one label: probing
    labels, existing = t.assign(home, uids)
    assert not existing.any() and len(set(labels.tolist())) == 4
    assert labels[:3].tolist() == [100, 101, 102]
    t.put(labels, uids, [None, b"p", None, None], existing)
    np.testing.assert_array_equal(t.find(home, uids), labels)
    assert t.uids_at(t.positions(labels)) == uids
    again, existing = t.assign(home[:2], uids[:2])  # upsert of stored ids keeps their labels
    assert existing.all() and again.tolist() == [100, 101]
    t.remove(np.array([100]))  # the first of the chain goes: the others are still found past the hole
    assert t.find(home, uids).tolist() == [-1, 101, 102, 7 << 40]
    assert t.uids_at(t.positions(np.array([101, 102]))) == uids[1:3]
    assert t.payloads_at(t.positions(np.array([101]))) == [b"p"]
    relabel, existing = t.assign(home[:1], ["a"])  # a comes back into the free label
    assert relabel.tolist() == [100] and not existing.any()


def _built_table(ids, payloads=None, batch=50_000):
    """An id table holding ``ids`` (and their payloads), written in batches as a shard writes them."""
    t = IdTable()
    _, home = buckets_and_labels(ids, 64)
    for s in range(0, len(ids), batch):
        labels, existing = t.assign(home[s:s + batch], ids[s:s + batch])
        pay = [None] * len(labels) if payloads is None else payloads[s:s + batch]
        t = t.with_put(labels, ids[s:s + batch], pay, existing)
    return t


def _contents(t):
    rows = np.arange(len(t))
    return dict(zip(t.uids_at(rows), t.payloads_at(rows)))


def test_id_table_without_payloads_holds_a_label_an_offset_and_the_id_bytes():
    n = 200_000
    ids = [f"item-{i:07d}" for i in range(n)]  # 12 bytes each
    _built_table(ids[:1000], batch=300)  # what a first write imports and caches is not the table's
    gc.collect()
    tracemalloc.start()
    try:
        t = _built_table(ids)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(t) == n
    _, home = buckets_and_labels(ids[-3:], 64)
    assert t.uids_at(t.positions(t.find(home, ids[-3:]))) == ids[-3:]
    # a label (8), an offset (4) and the id's 12 bytes, plus a little: no per-row pointer while no item has a payload
    assert held / n <= 8 + 4 + 12 + 1, f"{held / n:.1f} bytes a row"


def test_id_table_payloads_round_trip_and_old_tables_stay_as_they_were():
    ids = [f"id-{i}" for i in range(50)]
    t = _built_table(ids, batch=20)
    assert set(_contents(t).values()) == {None} and t.payload_items()[1] == []
    _, home = buckets_and_labels(ids, 64)
    # a payload put over stored ids: a new table has it, the old one (searches may read it) does not
    labels, existing = t.assign(home[:10], ids[:10])
    assert existing.all()
    pays = [None if i % 3 else f"p{i}".encode() for i in range(10)]
    t2 = t.with_put(labels, ids[:10], pays, existing)
    want = dict(zip(ids, [None] * 50)) | dict(zip(ids[:10], pays))
    assert _contents(t2) == want and set(_contents(t).values()) == {None}
    # new ids with and without payloads; then payloads replaced (to None too) over the ones stored
    more = [f"new-{i}" for i in range(5)]
    _, mhome = buckets_and_labels(more, 64)
    labels, existing = t2.assign(mhome, more)
    t3 = t2.with_put(labels, more, [b"m0", None, b"m2", None, None], existing)
    want |= dict(zip(more, [b"m0", None, b"m2", None, None]))
    labels, existing = t3.assign(home[:4], ids[:4])
    t4 = t3.with_put(labels, ids[:4], [b"x", None, None, None], existing)
    assert _contents(t3) == want
    want |= dict(zip(ids[:4], [b"x", None, None, None]))
    assert _contents(t4) == want
    t4.set_payloads(t4.positions(t4.find(mhome[1:2], more[1:2])), [b"set"])  # in place (the write lock held)
    want[more[1]] = b"set"
    assert _contents(t4) == want and _contents(t3)[more[1]] is None
    # removal, also of rows with payloads; the old table keeps them
    gone = t4.find(np.concatenate([home[:4], mhome[:1]]), ids[:4] + more[:1])
    t5 = t4.without(np.sort(gone))
    for uid in ids[:4] + more[:1]:
        del want[uid]
    assert _contents(t5) == want and _contents(t4)[ids[0]] == b"x"
    got_labels, got = t5.payload_items()
    assert dict(zip(t5.uids_at(t5.positions(got_labels)), got)) == {u: p for u, p in want.items() if p is not None}
    # checkpoint arrays, with the uint32 offsets written now and the int64 ones older versions wrote
    arrays = t5.to_arrays()
    assert arrays["offsets"].dtype == np.uint32
    for offsets in (arrays["offsets"], arrays["offsets"].astype(np.int64)):
        back = IdTable.from_arrays(arrays | {"offsets": offsets})
        assert _contents(back) == want and back.offsets.dtype == np.uint32
        np.testing.assert_array_equal(back.labels, t5.labels)
    # a table of no payloads keeps no per-row payload array, after a checkpoint too
    bare = IdTable.from_arrays(t.to_arrays())
    assert _contents(bare) == _contents(t) and bare.nbytes == bare.labels.nbytes + bare.offsets.nbytes + len(bare.blob)
    bad = arrays["offsets"].copy()
    bad[[1, 2]] = bad[[2, 1]]  # decreasing (a uint32 difference would wrap around)
    with pytest.raises(ValueError, match="do not hold together"):
        IdTable.from_arrays(arrays | {"offsets": bad})


def test_id_table_offsets_are_uint32_under_the_limit_and_int64_past_it(monkeypatch):
    monkeypatch.setattr(IdTable, "OFFSETS_LIMIT", 100)
    ids = [f"{i:04d}" for i in range(40)]  # 4 bytes each
    small = _built_table(ids[:20], batch=7)  # 80 bytes
    assert small.offsets.dtype == np.uint32 and len(small.blob) == 80
    big = _built_table(ids, batch=7)  # 160 bytes
    assert big.offsets.dtype == np.int64 and big.offsets[-1] == 160
    assert sorted(_contents(big)) == ids and sorted(_contents(small)) == ids[:20]
    _, home = buckets_and_labels(ids, 64)
    labels, existing = small.assign(home[20:], ids[20:])  # crossing the limit in one write
    grown = small.with_put(labels, ids[20:], [b"p"] * 20, existing)
    assert grown.offsets.dtype == np.int64 and small.offsets.dtype == np.uint32
    assert _contents(grown) == dict(zip(ids, [None] * 20 + [b"p"] * 20))
    shrunk = grown.without(np.sort(grown.find(home[:10], ids[:10])))  # back under it: 120 -> 30 ids of 4 bytes
    assert shrunk.offsets.dtype == np.int64
    shrunk = shrunk.without(np.sort(shrunk.find(home[10:20], ids[10:20])))
    assert shrunk.offsets.dtype == np.uint32 and sorted(_contents(shrunk)) == ids[20:]
    for table, dtype in ((grown, np.int64), (shrunk, np.uint32)):
        arrays = table.to_arrays()
        for offsets in (arrays["offsets"], arrays["offsets"].astype(np.uint32), arrays["offsets"].astype(np.int64)):
            back = IdTable.from_arrays(arrays | {"offsets": offsets})
            assert back.offsets.dtype == dtype and _contents(back) == _contents(table)


def test_pq_trains_at_its_threshold_and_finds_neighbours():
    xb, xq = make_data("l2", 3000, 32, seed=9)
    index = VectorIndex(CollectionConfig("c", 32, "l2", "IVF8,PQ16x4", nprobe=8).validated())
    assert index.train_size == 1000  # max(1000, 39 x 8 lists, 39 x 16 codebook centroids (4 bits))
    labels = _labels(3000)
    index.add(labels[:900], xb[:900])
    assert not index.train_if_ready()
    index.add(labels[900:], xb[900:])
    assert index.train_if_ready() and index.ntotal == 3000
    _, L = index.search(xq, 10)
    _, I_ref = exact_knn("l2", xb, xq, 10)
    recall = np.mean([len(set(L[q]) & set(labels[I_ref[q]])) / 10 for q in range(len(xq))])
    assert recall >= 0.25, recall  # 8-byte codes: approximate, but far from chance (0.003)
    approx = index.reconstruct(labels[:3])
    assert np.linalg.norm(approx - xb[:3]) < 0.5 * np.linalg.norm(xb[:3])


def test_graph_over_compressed_codes_survives_its_rebuild():
    xb, _ = make_data("l2", 3000, 16, seed=2)
    index = VectorIndex(CollectionConfig("c", 16, "l2", "HNSW16_PQ4x4", ef_search=64).validated())
    labels = _labels(3000)
    index.add(labels, xb)
    assert index.train_if_ready()
    index.remove(labels[:1500])  # past the rebuild threshold: the new graph must be trained again
    assert index.ntotal == 1500
    _, L = index.search(xb[2000:2010], 1)
    assert not np.isin(L, labels[:1500]).any() and (L >= 0).all()


@pytest.mark.parametrize("spec,msg", [("IVF10000000,Flat", "IVF lists"), ("IVF16,PQ8x24", "PQ codes of 24 bits"),
                                      ("HNSW1000", "M=1000"), ("Flat" + "," * 300, "characters")])
def test_index_specs_that_would_allocate_too_much_are_refused_before_building(spec, msg):
    from lookalike.errors import InvalidArgument
    from shard.specs import check_index_spec

    with pytest.raises(InvalidArgument, match=msg):
        check_index_spec(128, "l2", spec)
    check_index_spec(128, "l2", "IVF1024,PQ16x8")  # ordinary ones still build


def test_freed_memory_is_handed_back_once_writes_stop(tmp_path, monkeypatch):
    """A burst of writes smaller than the every-32-MiB trim still ends with one trim once the writes stop, and
    none while buckets are being copied in (a move must not stall searches)."""
    import time

    from shard import upkeep

    trims = []
    monkeypatch.setattr(upkeep, "release_memory", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(upkeep, "_TRIM_IDLE_S", 0.2)
    coll = CollectionConfig("c", 8, "l2", "Flat", buckets=4).validated()
    shard = Shard("s", tmp_path)
    shard.open_collection(coll, range(4))
    sc = shard.collection("c")
    x = np.ones((10, 8), np.float32)
    trims.clear()  # opening trims once
    last = 0.0
    for i in range(5):  # writes 0.05 s apart: one burst
        sc.upsert([f"a{i}-{j}" for j in range(10)], x, [None] * 10)
        last = time.monotonic()
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while not trims and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(trims) == 1 and trims[0] >= last + 0.2  # once, after the burst
    time.sleep(0.5)
    assert len(trims) == 1  # nothing more without writes

    sc.joining[0] = set()  # a copy in progress
    sc.upsert(["b"], x[:1], [None])
    time.sleep(0.6)
    assert len(trims) == 1
    sc.finish_join([0])
    deadline = time.monotonic() + 5
    while len(trims) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(trims) == 2
    shard.close()


def test_id_table_packs_the_ids_of_result_slots_and_looks_up_many_labels_in_order():
    """What a shard answers a search with (IdTable.packed_at: bytes back to back, uint16 lengths), and the sorted
    lookup of many labels (IdTable.positions past _SORT_LOOKUPS labels) giving what a plain binary search gives."""
    from shard.idtable import _SORT_LOOKUPS, IdTable

    rng = np.random.default_rng(3)
    t = IdTable()
    uids = [f"id-{i}" for i in range(500)] + ["ü-ид-画像", "x" * 256, "z", "y"]
    home = np.sort(rng.choice(1 << 40, len(uids), replace=False)).astype(np.int64)
    labels, existing = t.assign(home, uids)
    t.put(labels, uids, [None] * len(uids), existing)
    want = dict(zip(labels.tolist(), uids))

    probe = rng.permutation(np.concatenate([labels, labels[:50], [-1, -1]]))  # repeats, and -1 (no result)
    assert len(probe) > _SORT_LOOKUPS
    np.testing.assert_array_equal(t.positions(probe), np.searchsorted(t.labels, np.maximum(probe, 0)))
    np.testing.assert_array_equal(t.positions(probe.reshape(-1, 2)), t.positions(probe).reshape(-1, 2))

    present = probe >= 0
    blob, lengths = t.packed_at(t.positions(probe), present)
    assert lengths.dtype == np.uint16 and len(lengths) == len(probe)
    ends = np.cumsum(lengths.astype(np.int64)).tolist()
    got = [blob[a:b].decode("utf-8") for a, b in zip([0] + ends[:-1], ends)]
    assert got == [want[x] if x >= 0 else "" for x in probe.tolist()]
    assert len(blob) == sum(len(want[x].encode()) for x in probe.tolist() if x >= 0)
    whole, _ = t.packed_at(t.positions(labels))  # every slot present
    assert whole == "".join(uids).encode("utf-8")
    assert t.packed_at(np.zeros(0, dtype=np.int64))[0] == b""
