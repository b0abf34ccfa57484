"""A shard's memory is its FAISS index plus the id table: its own accounting against FAISS's serialized bytes, and
Get/Scan returning the original vectors where the index only holds approximations.

Resident memory (RSS) figures are in bench/memory_bench.py's output, not asserted here: they flake with the
allocator and whatever else the test process did.
"""

import time

import faiss
import numpy as np
import pytest

from conftest import make_data, trained_config
from lookalike.config import CollectionConfig
from lookalike.ids import order_by_distance_then_label
import shard.upkeep as shard_upkeep
from shard.shard import Shard
from shard.cpu_index import VectorIndex
from shard.specs import build_index

N, DIM = 40_000, 64


@pytest.fixture(autouse=True)
def _quick_repack(monkeypatch):
    """Lists are packed 0.5 s after the last write here (5 s in a shard)."""
    monkeypatch.setattr(shard_upkeep, "_REPACK_IDLE_S", 0.5, raising=False)


def _uids(n, start=0):
    return [f"img-{i:08d}" for i in range(start, start + n)]


def _load(tmp_path, spec, xb, metric="l2", batch=10_000):
    shard = Shard("mem-0", tmp_path)
    cfg = trained_config(tmp_path, CollectionConfig("m", DIM, metric, index=spec, buckets=16).validated(), xb[:4000])
    shard.open_collection(cfg, range(16))
    sc = shard.collection("m")
    for i in range(0, len(xb), batch):
        sc.upsert(_uids(min(batch, len(xb) - i), i), xb[i:i + batch], [None] * len(xb[i:i + batch]))
    return shard, sc


def _faiss_bytes(spec, xb):
    """Serialized bytes of the same spec in FAISS alone, with its 64-bit ids (in the IVF lists)."""
    idx = build_index(DIM, "l2", spec)
    idx.train(xb[:10 * 256])  # enough for a trained index of the same size (its quality does not matter here)
    idx.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    return len(faiss.serialize_index(idx))


def _table_bytes(t):
    return t.nbytes


@pytest.mark.parametrize("spec", ["IVF64,PQ8", "IVF64,Flat"])
def test_shard_holds_faiss_bytes_plus_id_table(tmp_path, spec):
    xb, _ = make_data("l2", N, DIM, seed=4)
    shard, sc = _load(tmp_path, spec, xb)
    try:
        assert sc.index.trained and sc.index.ntotal == N
        ours = (sc.index.nbytes + _table_bytes(sc.table)) / N
        theirs = _faiss_bytes(spec, xb) / N
        assert ours <= theirs + 48, (spec, ours, theirs)
    finally:
        shard.close()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_get_and_scan_return_the_original_vectors_of_a_pq_index(tmp_path, metric):
    xb, _ = make_data(metric, 3000, DIM, seed=5)
    shard, sc = _load(tmp_path, "IVF16,PQ8x4", xb, metric=metric, batch=1000)  # trains at 1600
    try:
        assert sc.index.trained
        want = xb.copy()
        if metric == "cosine":  # the index holds them normalized, and Get always returned them so
            faiss.normalize_L2(want)
        rows = [3, 2000, 2999, 3]
        found, x, _ = sc.get([f"img-{i:08d}" for i in rows] + ["absent"], include_vectors=True)
        assert found == [f"img-{i:08d}" for i in rows]
        check = np.testing.assert_array_equal if metric == "l2" else lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-6, atol=1e-7)  # normalized in another batch shape: last-bit differences
        check(x, want[rows])  # exact: 4-bit PQ codes are far off
        # a replaced vector comes back as replaced; a deleted item is gone
        sc.upsert(["img-00000003"], xb[5:6], [None])
        sc.delete(["img-00002000"])
        found, x, _ = sc.get(["img-00000003", "img-00002000"], include_vectors=True)
        assert found == ["img-00000003"]
        check(x, want[5:6])
        ids, x, _ = sc.scan([0, 1], include_vectors=True)
        rows = [5 if u == "img-00000003" else int(u[4:]) for u in ids]
        assert len(ids) > 0
        check(x, want[rows])
    finally:
        shard.close()


def test_ivf_and_graph_remove_and_reconstruct_without_a_label_map():
    xb, _ = make_data("l2", 6000, 16, seed=6)
    labels = np.arange(6000, dtype=np.int64) * 11 + 5
    for spec in ("IVF16,Flat", "HNSW8"):
        index = VectorIndex(CollectionConfig("c", 16, "l2", spec, nprobe=16, ef_search=64).validated())
        index.add(labels[:3000], xb[:3000])
        index.train_if_ready()
        index.add(labels[3000:], xb[3000:])
        assert faiss.try_extract_index_ivf(index._main) is None or \
            faiss.extract_index_ivf(index._main).direct_map.type == faiss.DirectMap.NoMap
        assert index.remove(labels[100:600]) == 500 and index.remove(labels[100:101]) == 0
        np.testing.assert_allclose(index.reconstruct(labels[[4000, 7, 5999]]), xb[[4000, 7, 5999]], rtol=1e-6)
        index.add(labels[100:110], xb[:10])  # back, with other vectors
        np.testing.assert_allclose(index.reconstruct(labels[100:110]), xb[:10], rtol=1e-6)
        _, L = index.search(xb[200:220], 1)
        assert not np.isin(L, labels[110:600]).any()


def test_compressed_ivf_lists_are_packed_once_writes_stop_and_answers_stay_the_same(tmp_path):
    from conftest import wait_for

    xb, xq = make_data("l2", N, DIM, seed=6)
    shard, sc = _load(tmp_path, "IVF64,PQ8", xb)
    try:
        before = sc.search(xq, 10, nprobe=8)
        old = int(sc.index._ivf.invlists.this)
        assert wait_for(lambda: sc.upkeep.packed_at == N, 20)  # the idle trim packed the lists
        assert int(sc.index._ivf.invlists.this) != old  # new lists, in the same index
        after = sc.search(xq, 10, nprobe=8)
        np.testing.assert_array_equal(after[0], before[0])
        assert after[2] == before[2]
        sc.upsert(_uids(10, N), xb[:10], [None] * 10)  # a few more: not worth packing again so soon
        time.sleep(1.5 + shard_upkeep._REPACK_IDLE_S)
        assert sc.upkeep.packed_at == N
    finally:
        shard.close()


def test_lists_are_packed_even_when_every_write_trims_on_the_way(tmp_path, monkeypatch):
    """A burst whose last write crossed the trim threshold used to leave no idle thread behind: the lists stayed
    as they grew."""
    from conftest import wait_for
    import shard.upkeep

    monkeypatch.setattr(shard.upkeep, "_TRIM_EVERY_BYTES", 1)  # every write trims on the way
    xb, _ = make_data("l2", 20_000, DIM, seed=7)
    shard_, sc = _load(tmp_path, "IVF64,PQ8", xb, batch=5_000)
    try:
        assert wait_for(lambda: sc.upkeep.packed_at == len(xb), 20)
    finally:
        shard_.close()


def test_lists_grown_a_little_after_a_pack_are_packed_again(tmp_path):
    """Every list that grows after a pack moves into a buffer twice its size: the last tenth of a load, left
    unpacked, cost a 10M-vector shard 220 bytes a vector. Growth of a twentieth is packed again."""
    from conftest import wait_for

    xb, _ = make_data("l2", N + N // 10, DIM, seed=8)
    shard_, sc = _load(tmp_path, "IVF64,PQ8", xb[:N])
    try:
        assert wait_for(lambda: sc.upkeep.packed_at == N, 20)
        sc.upsert(_uids(N // 10, N), xb[N:], [None] * (N // 10))
        assert wait_for(lambda: sc.upkeep.packed_at == N + N // 10, 20)
    finally:
        shard_.close()


def test_a_little_growth_after_a_pack_is_packed_a_while_later(tmp_path, monkeypatch):
    """Growth under _REPACK_GROWTH (the end of a load that came after the last pack, a trickle of writes) is packed
    too, _REPACK_EVERY_S after the last pack: every list it grew sits in a buffer twice its size until then. The
    packed lists answer as the grown ones did."""
    from conftest import wait_for

    monkeypatch.setattr(shard_upkeep, "_REPACK_EVERY_S", 1.0, raising=False)
    xb, _ = make_data("l2", N + N // 100, DIM, seed=10)
    shard_, sc = _load(tmp_path, "IVF64,Flat", xb[:N])
    try:
        assert wait_for(lambda: sc.upkeep.packed_at == N, 20)
        sc.upsert(_uids(N // 100, N), xb[N:], [None] * (N // 100))
        before = sc.search(xb[:20], 10, nprobe=8)
        assert wait_for(lambda: sc.upkeep.packed_at == N + N // 100, 20)
        after = sc.search(xb[:20], 10, nprobe=8)
        assert np.array_equal(before[1], after[1]) and before[2] == after[2]
        assert np.array_equal(before[0], after[0])
    finally:
        shard_.close()


def test_growth_after_a_deferred_pack_is_packed_once_the_writes_stop(tmp_path, monkeypatch):
    """A little growth after a pack defers the next one (_REPACK_EVERY_S); writes that then make the growth due
    (over _REPACK_GROWTH) are packed once they stop, not when the deferred time comes: the trim thread slept until
    then, and the end of a 10M load on 8 shards was still unpacked a minute after its last write, when the
    benchmark measured its RSS."""
    from conftest import wait_for

    monkeypatch.setattr(shard_upkeep, "_TRIM_IDLE_S", 0.1)
    monkeypatch.setattr(shard_upkeep, "_REPACK_EVERY_S", 60.0)
    xb, _ = make_data("l2", N + 10 + N // 10, DIM, seed=14)
    shard_, sc = _load(tmp_path, "IVF64,Flat", xb[:N])
    try:
        assert wait_for(lambda: sc.upkeep.packed_at == N, 20)
        sc.upsert(_uids(10, N), xb[N:N + 10], [None] * 10)  # a little growth: deferred until 60 s after the pack
        time.sleep(1.5 + shard_upkeep._REPACK_IDLE_S)  # the thread has seen it and waits
        assert sc.upkeep.thread.is_alive() and sc.upkeep.packed_at == N
        sc.upsert(_uids(N // 10, N + 10), xb[N + 10:], [None] * (N // 10))  # now 10% more: due
        assert wait_for(lambda: sc.upkeep.packed_at == N + 10 + N // 10, 10), sc.upkeep.packed_at
    finally:
        shard_.close()


def test_a_closed_collection_is_not_packed_any_more(tmp_path, monkeypatch):
    """Its upkeep ends with it: a closed collection's trim thread slept until its pack was due (up to
    _REPACK_EVERY_S) and then packed the closed index's lists (in the suite, a test's leftover pack at 40,010 vectors
    landed in the next test's count)."""
    from conftest import wait_for

    monkeypatch.setattr(shard_upkeep, "_TRIM_IDLE_S", 0.1)
    monkeypatch.setattr(shard_upkeep, "_REPACK_IDLE_S", 0.5, raising=False)
    packs = []
    orig = VectorIndex.repacked
    monkeypatch.setattr(VectorIndex, "repacked", lambda self: packs.append(self.ntotal) or orig(self))
    xb, _ = make_data("l2", N + 10, DIM, seed=13)
    shard_, sc = _load(tmp_path, "IVF64,PQ8", xb[:N])
    assert wait_for(lambda: packs == [N], 20)
    sc.upsert(_uids(10, N), xb[N:], [None] * 10)  # a little growth: packed _REPACK_EVERY_S (60 s) after the pack
    assert wait_for(lambda: sc.upkeep.thread.is_alive(), 5)  # the thread that waits for it
    shard_.close()
    assert wait_for(lambda: not sc.upkeep.thread.is_alive(), 3)  # ended with the close, not a minute later
    assert packs == [N], packs


def test_the_lists_of_a_new_trained_version_are_packed(tmp_path, monkeypatch):
    """Moving a shard's items into a new trained version builds new lists by doubling, with as many items as before:
    the 10M IVF-PQ run on 8 shards measured 273 bytes a vector after its second training, against 214 packed."""
    import dataclasses

    from conftest import wait_for
    from shard.training import adopt_trained

    packs = []
    orig = VectorIndex.repacked
    monkeypatch.setattr(VectorIndex, "repacked", lambda self: packs.append(self.ntotal) or orig(self))
    xb, _ = make_data("l2", N, DIM, seed=11)
    shard_, sc = _load(tmp_path, "IVF64,PQ8", xb)
    try:
        assert wait_for(lambda: packs == [N], 20)
        template = VectorIndex(sc.coll).train_template(xb[-4000:])
        assert adopt_trained(sc, dataclasses.replace(sc.coll, trained_version=2), template)
        assert wait_for(lambda: packs == [N, N], 20), packs
        assert sc.index.trained_version == 2
    finally:
        shard_.close()


def test_short_pauses_of_a_load_do_not_pack_the_lists(tmp_path, monkeypatch):
    """Packing copies the whole index while writes wait: a load that pauses for less than _REPACK_IDLE_S (a slow
    client, a busy machine) is packed once, after its end, not at every pause."""
    from conftest import wait_for

    monkeypatch.setattr(shard_upkeep, "_TRIM_IDLE_S", 0.1)
    monkeypatch.setattr(shard_upkeep, "_REPACK_IDLE_S", 1.5, raising=False)
    packs = []
    orig = VectorIndex.repacked
    monkeypatch.setattr(VectorIndex, "repacked", lambda self: packs.append(self.ntotal) or orig(self))
    xb, _ = make_data("l2", 30_000, DIM, seed=9)
    shard_, sc = _load(tmp_path, "IVF64,PQ8", xb[:12_000])
    try:
        for i in range(12_000, 30_000, 6_000):  # pauses of 0.4 s: longer than a trim's wait, shorter than a pack's
            time.sleep(0.4)
            sc.upsert(_uids(6_000, i), xb[i:i + 6_000], [None] * 6_000)
        assert wait_for(lambda: sc.upkeep.packed_at == 30_000, 20)
        assert packs == [30_000], packs
    finally:
        shard_.close()


def _precomputed_floats(sc) -> int:
    from shard.specs import extract_ivf

    return int(faiss.downcast_index(extract_ivf(sc.index._main)).precomputed_table.size())


def test_small_precomputed_ivf_pq_tables_are_kept(tmp_path):
    """Tables the caches hold make searches with short lists faster (1.3-2.2x at 20k, bench.pqtables_bench):
    IVF64,PQ8 here is 512 KiB."""
    xb, _ = make_data("l2", N, DIM, seed=12)
    shard_, sc = _load(tmp_path, "IVF64,PQ8", xb[:8000])
    try:
        assert _precomputed_floats(sc) == 64 * 8 * 256
    finally:
        shard_.close()


def test_shards_hold_no_large_precomputed_ivf_pq_tables_and_answer_as_faiss_with_them(tmp_path, monkeypatch):
    """IVF-PQ's precomputed tables (nlist x M x 256 floats: 128 MiB at IVF4096,PQ32) are the same on every shard:
    at 10M on 8 shards they were 107 bytes a vector. Past a size (0 here) shards compute each probed list's table
    instead, from the template (a new trained version too) and from a checkpoint alike; the answers are FAISS's
    with the tables."""
    import shard.specs

    monkeypatch.setattr(shard.specs, "PRECOMPUTED_TABLE_MAX_BYTES", 0)
    xb, xq = make_data("l2", N, DIM, seed=12)
    xq = xq[:50]
    shard_, sc = _load(tmp_path, "IVF64,PQ8", xb)
    cfg = sc.coll
    try:
        assert sc.index.trained and _precomputed_floats(sc) == 0
        D, L = sc.index.search(xq, 10, nprobe=8)
        clone = faiss.clone_index(sc.index._main)  # kept: the downcast proxy does not own it
        with_tables = faiss.downcast_index(clone)
        with_tables.use_precomputed_table = 1
        with_tables.precompute_table()
        assert with_tables.precomputed_table.size() == 64 * 8 * 256
        D1, L1 = with_tables.search(xq, 200, params=faiss.SearchParametersIVF(nprobe=8))
        order = order_by_distance_then_label(D1, L1, False)  # the shards' tie order (PQ8 codes coincide often)
        D1, L1 = np.take_along_axis(D1, order, axis=1)[:, :10], np.take_along_axis(L1, order, axis=1)[:, :10]
        np.testing.assert_allclose(D, D1, rtol=1e-5, atol=1e-4)
        assert (L == L1).mean() > 0.99  # equal up to float rounding of near ties
    finally:
        shard_.close()
    reopened = Shard("mem-0", tmp_path)  # from the checkpoint written at close
    try:
        reopened.open_collection(cfg, range(16))
        sc = reopened.collection("m")
        assert sc.index.ntotal == N and _precomputed_floats(sc) == 0
        np.testing.assert_array_equal(sc.index.search(xq, 10, nprobe=8)[1], L)
    finally:
        reopened.close()
