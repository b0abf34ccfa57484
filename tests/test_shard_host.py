"""Shards sharing one process (shard.host): one Search call per process for all of its shards, answers equal to one
FAISS index, calls that name their shard, and a shard of the process that cannot answer reported as that shard's
failure while the others answer."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from conftest import wait_for
from test_trained_index import _data, _load, _normalized, _one_faiss_index, _top_k_by_distance_then_label

from control.local import LocalCluster
from control.placer import process_of
from lookalike.config import CollectionConfig, MovePolicy
from lookalike.errors import InvalidArgument, StaleShardMap, Unavailable
from lookalike.filters import parse_filter
from lookalike.payloads import payload_to_dict, payload_to_proto
from protos import shard_pb2
from router.shard_client import GrpcShardClient
from router.shards import _answered
from shard.host import HostServicer


def _cluster(tmp_path, shards: int = 4, per_process: int = 2):
    return LocalCluster(tmp_path / "data", shards=shards, shards_per_process=per_process,
                        policy=MovePolicy(grace_s=0.3, train_check_s=0.05))


def _counting(monkeypatch, way: str):
    """Puts a counting wrapper around ``shard.host.<way>`` (a way of answering several shards at once). Returns
    (whether each call answered, the wrapper: to put back after patching it away)."""
    import shard.host

    answered = []
    real = getattr(shard.host, way)

    def counting(parts, request):
        got = real(parts, request)
        answered.append(got is not None)
        return got

    monkeypatch.setattr(shard.host, way, counting)
    return answered, counting


def _ids_held(cl, shard_id: str, name: str) -> set[str]:
    table = cl.placer.shards[shard_id].collection(name).table
    return set(table.uids_at(np.arange(len(table))))


def test_consecutive_shards_go_to_different_processes_and_added_shards_to_new_ones():
    assert [process_of(f"shard-{i}", 2, 4) for i in range(6)] == [0, 1, 0, 1, 2, 2]
    assert [process_of(f"shard-{i}", 4, 6) for i in range(10)] == [0, 1, 0, 1, 0, 1, 0, 1, 2, 2]
    assert [process_of(f"shard-{i}", 1, 4) for i in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("spec", ["IVF32,Flat", "IVF16,PQ8x4"])
def test_shards_sharing_processes_answer_as_one_index_with_one_call_per_process(tmp_path, spec, monkeypatch):
    calls = []
    real = HostServicer.search_shards

    def counting(self, request, context):
        calls.append(list(request.shards))
        return real(self, request, context)

    monkeypatch.setattr(HostServicer, "search_shards", counting)
    cl = _cluster(tmp_path)
    try:
        cfg = CollectionConfig("w", 32, index=spec, nprobe=4, buckets=64).validated()
        cl.router.create_collection(cfg)
        xb, xq = _data(6000, seed=5)
        ids = _load(cl, "w", xb)
        assert cl.controller._wait_trained("w", 30), cl.router.training_status("w")
        smap = cl.controller.shard_map("w")
        addresses = {sid: info.address for sid, info in smap.shards.items()}
        assert addresses["shard-0"] == addresses["shard-2"] != addresses["shard-1"] == addresses["shard-3"]
        one, by_label = _one_faiss_index(cl, cfg, ids, xb)
        D1, L1 = _top_k_by_distance_then_label(one, xq, 10, nprobe=4)
        calls.clear()
        res = cl.router.search("w", xq, k=10, nprobe=4, include_payloads=True)
        assert sorted(map(sorted, calls)) == [["shard-0", "shard-2"], ["shard-1", "shard-3"]]
        assert res.ids == [[by_label[lab] for lab in row if lab >= 0] for row in L1.tolist()]
        np.testing.assert_allclose(res.D, D1, rtol=1e-5, atol=1e-4)
        assert res.coverage == 1.0 and len(res.payloads) == len(xq)
        assert all(cl.router.search("w", xq[:5], k=10, nprobe=4).ids == res.ids[:5] for _ in range(10))
        # the other calls name their shard: writes, reads and stats reach the right one in its process
        found, vectors, _ = cl.router.get("w", ids[:50], include_vectors=True)
        assert found == ids[:50] and vectors.shape == (50, 32)
        cl.router.delete("w", ids[:20])
        after = cl.router.search("w", xb[:20], k=3, nprobe=4)
        assert not set(ids[:20]) & {i for row in after.ids for i in row}
        stats = {info.shard_id: st for info, st in cl.router.shard_stats()}
        assert sorted(stats) == ["shard-0", "shard-1", "shard-2", "shard-3"]
        assert all(st.shard_id == sid for sid, st in stats.items())
        assert sum(c.vectors for st in stats.values() for c in st.collections) == len(xb) - 20
    finally:
        cl.close()


def test_a_shard_that_cannot_answer_fails_alone_while_the_others_of_its_process_answer(tmp_path):
    cl = _cluster(tmp_path)
    try:
        cl.router.create_collection(CollectionConfig("f", 32, buckets=16))
        xb, xq = _data(2000, seed=2)
        ids = _load(cl, "f", xb)
        cl.placer.shards["shard-3"].serving = False  # answers UNAVAILABLE ("still loading"); shard-1 shares its process
        with pytest.raises(Unavailable, match="shard-3"):
            cl.router.search("f", xq, k=5)
        res = cl.router.search("f", xq, k=5, min_coverage=0.5)
        smap = cl.controller.shard_map("f")
        assert res.coverage == pytest.approx(1 - smap.served_by("shard-3").sum() / 16)
        found = {i for row in res.ids for i in row}
        held = _ids_held(cl, "shard-3", "f")
        assert held and found and not found & held
        assert _ids_held(cl, "shard-1", "f") & found  # the other shard of its process still answers
    finally:
        cl.close()


def test_a_process_of_several_shards_needs_each_call_to_name_one_it_holds(tmp_path):
    cl = _cluster(tmp_path)
    try:
        cl.router.create_collection(CollectionConfig("m", 32, buckets=16))
        address = cl.controller.shard_map("m").shards["shard-0"].address
        client = GrpcShardClient(address)
        try:
            with pytest.raises(InvalidArgument, match="lookalike-shard"):
                client.call("Stats", shard_pb2.ShardStatsRequest(), 5).result()
            with pytest.raises(Unavailable, match="shard-1 is not held"):
                client.call("Stats", shard_pb2.ShardStatsRequest(), 5, "shard-1").result()
            assert client.call("Stats", shard_pb2.ShardStatsRequest(), 5, "shard-2").result().shard_id == "shard-2"
            req = shard_pb2.ShardSearchRequest(collection="m", k=3, shards=["shard-0"] * 2000)
            with pytest.raises(InvalidArgument, match="at most"):
                client.call("Search", req, 5).result()
        finally:
            client.close()
    finally:
        cl.close()


def test_shards_answered_at_once_are_locked_in_shard_order_whatever_the_requests_order():
    """A waiting writer holds back new readers, so two searches locking two shards in opposite orders, each behind
    a writer of the other's shard, would wait forever: every search locks in one order."""
    import contextlib
    import types

    from shard import stacked

    taken = []

    def servicer(sid):
        @contextlib.contextmanager
        def read():
            taken.append(sid)
            yield

        sc = types.SimpleNamespace(_rw=types.SimpleNamespace(read=read), _check_live=lambda: None,
                                   _check_epoch=lambda epoch: None, _owned=np.array([sid == "shard-0", True]))
        return types.SimpleNamespace(collection_of=lambda name: sc)

    request = shard_pb2.ShardSearchRequest(collection="c", k=3)
    parts = [(sid, servicer(sid)) for sid in ("shard-3", "shard-1", "shard-0")]
    with contextlib.ExitStack() as held, pytest.raises(stacked._Declined):  # the fakes share a bucket: declined
        stacked._checked(held, parts, request)
    assert taken == ["shard-0", "shard-1", "shard-3"]


def test_a_stale_map_reported_for_one_shard_of_a_process_is_that_shards_stale_map():
    resp = shard_pb2.ShardSearchResponse(failures=[shard_pb2.ShardFailure(shard="shard-2", code=9, message="old"),
                                                   shard_pb2.ShardFailure(shard="shard-9", code=14, message="?")])
    got, failed = _answered(["shard-0", "shard-2"], resp)
    assert got is resp and list(failed) == ["shard-2"] and isinstance(failed["shard-2"], StaleShardMap)


@pytest.mark.parametrize("way", ["search_lists_shared", "search_as_one"])
def test_ivf_pq_shards_of_a_process_searched_as_one_index_answer_as_searched_one_by_one(tmp_path, monkeypatch, way):
    import shard.host
    import shard.specs
    from shard.cpu_index import VectorIndex
    from shard.specs import drop_precomputed_tables

    # without precomputed tables, as shards keep IVF-PQ past 16 MiB of them (IVF4096,PQ32: 128 MiB)
    monkeypatch.setattr(shard.specs, "PRECOMPUTED_TABLE_MAX_BYTES", 0)
    if way == "search_as_one":  # shards with lists of their own, stacked as one view (HStackInvertedLists)
        monkeypatch.setattr(VectorIndex, "share_lists", lambda self, groups: False)
    stacked, counting = _counting(monkeypatch, way)
    cl = _cluster(tmp_path, shards=4, per_process=4)
    try:
        cfg = CollectionConfig("p", 32, index="IVF16,PQ8x4", nprobe=4, buckets=64, metric="cosine").validated()
        cl.router.create_collection(cfg)
        xb, xq = _data(6000, seed=9)
        ids = _load(cl, "p", xb)
        assert cl.controller._wait_trained("p", 30), cl.router.training_status("p")
        trained = cl.controller.shard_map("p").collection
        cl.router.search("p", xq, k=10)  # the first search asks a shard for the centroids, in the background
        assert wait_for(lambda: cl.router._coarse.ready(trained) is not None, 10)
        stacked.clear()
        res = cl.router.search("p", xq, k=10, nprobe=5, include_payloads=True)
        assert stacked == [True]  # one process, its four shards' lists as one index
        one, by_label = _one_faiss_index(cl, trained, ids, _normalized(xb))
        drop_precomputed_tables(one)
        D1, L1 = _top_k_by_distance_then_label(one, _normalized(xq), 10, nprobe=5, larger_is_better=True)
        assert res.ids == [[by_label[lab] for lab in row] for row in L1.tolist()]
        np.testing.assert_allclose(res.D, D1, rtol=1e-5, atol=1e-5)
        # the same answer, bit for bit, as the shards searched one by one
        monkeypatch.setattr(shard.host, way, lambda parts, request: None)
        alone = cl.router.search("p", xq, k=10, nprobe=5, include_payloads=True)
        assert alone.ids == res.ids and (alone.D == res.D).all() and alone.payloads == res.payloads
        # a move between two shards of the process (a bucket on both) is searched one by one
        monkeypatch.setattr(shard.host, way, counting)
        stacked.clear()
        sc0, sc1 = (cl.placer.shards[s].collection("p") for s in ("shard-0", "shard-1"))
        b = int(np.flatnonzero(sc0._owned)[0])
        sc1._owned[b] = True
        try:
            assert cl.router.search("p", xq, k=10, nprobe=5).ids == res.ids and stacked == [False]
        finally:
            sc1._owned[b] = False
    finally:
        cl.close()


@pytest.mark.parametrize("spec", ["IVF32,Flat", "HNSW16"])
def test_shards_of_a_process_answered_once_answer_as_each_shard_answering_alone(tmp_path, monkeypatch, spec):
    import shard.host

    ways, counting = _counting(monkeypatch, "search_one_by_one")
    # IVF shards in shared lists: each searched alone within them (its selector), as a search naming some of them is
    monkeypatch.setattr(shard.host, "search_lists_shared", lambda parts, request: None)
    cl = _cluster(tmp_path, shards=4, per_process=4)
    try:
        cfg = CollectionConfig("o", 32, index=spec, nprobe=4, buckets=64, filterable="g:int").validated()
        cl.router.create_collection(cfg)
        xb, xq = _data(6000, seed=11)
        xb[100:110] = xb[50]  # ties: equal distances come in label order whichever way is taken
        ids = [f"img-{i:06d}" for i in range(len(xb))]
        for s in range(0, len(xb), 2000):
            cl.router.upsert("o", ids[s:s + 2000], xb[s:s + 2000],
                             [payload_to_proto({"g": i % 3}) for i in range(s, s + 2000)])
        assert cl.controller._wait_trained("o", 30), cl.router.training_status("o")
        trained = cl.controller.shard_map("o").collection
        cl.router.search("o", xq, k=10)
        if "IVF" in spec:  # the router's lists, once it has the centroids (asked in the background)
            assert wait_for(lambda: cl.router._coarse.ready(trained) is not None, 10)
        queries = np.concatenate([xq, xb[50:51]])
        ways.clear()
        once = cl.router.search("o", queries, k=10, include_payloads=True)
        assert ways == [True]  # one process: its four shards answered once
        monkeypatch.setattr(shard.host, "search_one_by_one", lambda parts, request: None)
        alone = cl.router.search("o", queries, k=10, include_payloads=True)
        assert alone.ids == once.ids and (alone.D == once.D).all() and alone.payloads == once.payloads
        assert once.coverage == 1.0 and all(len(row) == 10 for row in once.ids)
        # a filter: each shard plans its own search and answers alone
        monkeypatch.setattr(shard.host, "search_one_by_one", counting)
        ways.clear()
        schema = cl.router.shard_map("o").collection.schema
        got = cl.router.search("o", xq[:5], k=5, filt=parse_filter("g=1", schema), include_payloads=True)
        assert ways == [False] and all(payload_to_dict(p)["g"] == 1 for row in got.payloads for p in row)
        assert all(len(row) == 5 for row in got.ids)
    finally:
        cl.close()


def test_shards_answered_once_with_fewer_items_than_k_leave_the_slots_past_them_empty(tmp_path, monkeypatch):
    """Each shard packs the ids of its own slots only; slots no shard fills, and shards that fill none, stay empty."""
    import shard.host

    ways, _counting_once = _counting(monkeypatch, "search_one_by_one")
    cl = _cluster(tmp_path, shards=4, per_process=4)
    try:
        cl.router.create_collection(CollectionConfig("e", 32, index="HNSW16", buckets=64).validated())
        xb, xq = _data(3, seed=5)
        cl.router.upsert("e", ["a", "bb", "ccc"], xb, [payload_to_proto({"n": i}) for i in range(3)])
        once = cl.router.search("e", xq[:4], k=10, include_payloads=True)
        assert ways == [True]
        monkeypatch.setattr(shard.host, "search_one_by_one", lambda parts, request: None)
        alone = cl.router.search("e", xq[:4], k=10, include_payloads=True)
        assert once.ids == alone.ids and once.payloads == alone.payloads
        assert all(sorted(row) == ["a", "bb", "ccc"] for row in once.ids)
    finally:
        cl.close()


def test_a_bug_in_one_shards_search_fails_that_shard_alone(tmp_path, monkeypatch):
    cl = _cluster(tmp_path)
    try:
        cl.router.create_collection(CollectionConfig("b", 32, buckets=16))
        xb, xq = _data(1000, seed=4)
        _load(cl, "b", xb)
        index = cl.placer.shards["shard-3"].collection("b").index

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        # searched once with shard-1 of its process first, then alone: each way meets the bug
        monkeypatch.setattr(index, "search", broken)
        with pytest.raises(Unavailable, match="shard-3: internal error: RuntimeError: boom"):
            cl.router.search("b", xq, k=5)
        res = cl.router.search("b", xq, k=5, min_coverage=0.5)
        assert res.coverage == pytest.approx(1 - cl.controller.shard_map("b").served_by("shard-3").sum() / 16)
    finally:
        cl.close()


def test_a_process_of_several_shards_gets_their_resources_and_faiss_threads_no_more_than_the_cores():
    from control.ray_placer import RayPlacer
    from lookalike.config import ClusterConfig

    one = RayPlacer(ClusterConfig(shards=8, shard_num_cpus=0.5), 1 << 20, cluster_gpus=0).actor_options("shard-3")
    four = RayPlacer(ClusterConfig(shards=8, shard_num_cpus=0.5, shards_per_process=4, shard_memory=1 << 30),
                     1 << 20, cluster_gpus=0).actor_options("shard-3")
    assert one["name"].endswith("-shard-3") and four["name"].endswith("-proc-1")  # shard-3: process 3 % 2
    assert four["num_cpus"] == 2.0 and four["memory"] == 4 << 30
    assert four["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert four["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in one["runtime_env"]["env_vars"]
    # jemalloc in a process of several shards only (shard.osutil.host_process_env): one shard keeps glibc's
    assert four["runtime_env"]["env_vars"]["LD_PRELOAD"].endswith("libjemalloc.so")
    assert "LD_PRELOAD" not in one["runtime_env"]["env_vars"]
    # every call of a shard process runs FAISS on its threads, whatever thread of the server takes it
    before = faiss.omp_get_max_threads()
    try:
        HostServicer("p", threads=1)._set_threads(1)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


def test_searches_running_at_once_in_a_process_share_its_threads():
    """shard.host HostServicer._search_threads: a search alone takes the process's FAISS threads; one that starts
    while another runs takes its share; once they end, a search takes them all again."""
    import threading

    host = HostServicer("p", threads=4)
    seen, started, release = [], threading.Event(), threading.Event()

    def search_shards(request, context):
        seen.append(faiss.omp_get_max_threads())
        if len(seen) == 1:
            started.set()
            assert release.wait(10)
        return "answer"

    host.search_shards = search_shards
    first = threading.Thread(target=host._search_shards, args=(None, None))
    first.start()
    assert started.wait(10)
    second = []
    t = threading.Thread(target=lambda: second.append(host._search_shards(None, None)))  # while the first runs
    t.start()
    t.join(10)
    release.set()
    first.join(10)
    third = threading.Thread(target=host._search_shards, args=(None, None))  # alone again, on a new thread
    third.start()
    third.join(10)
    assert seen == [4, 2, 4] and second == ["answer"] and host._searching == 0


def test_a_process_probes_its_storage_once_and_names_the_shard_of_a_collection_it_does_not_serve(tmp_path,
                                                                                                 monkeypatch):
    import shard.host

    cl = _cluster(tmp_path)
    try:
        cl.router.create_collection(CollectionConfig("h", 32, buckets=16))
        writes = []
        monkeypatch.setattr(shard.host, "storage_problem", lambda root: writes.append(root))
        host = cl.placer.hosts[0][0]  # shard-0 and shard-2
        report = shard.host.host_probe(host)()
        assert report[""] is None and len(writes) == 1  # one durable write for the process's two shards
        monkeypatch.setattr(cl.placer.shards["shard-2"], "collection_problems", lambda: {"h": "it is broken"})
        assert shard.host.host_probe(host)()["lookalike.v1.Shard/h"] == "shard-2: it is broken"
    finally:
        cl.close()


def test_a_process_of_several_shards_runs_jemalloc_and_hands_its_freed_pages_back():
    """shard.osutil.host_process_env: Ray's jemalloc in place of glibc's allocator; release_memory then purges
    jemalloc's arenas (glibc's malloc_trim would free nothing of them)."""
    import os
    import subprocess
    import sys

    from shard.osutil import SHARD_PROCESS_ENV, host_process_env

    env = host_process_env("")
    assert env["LD_PRELOAD"].endswith("libjemalloc.so") and os.path.isfile(env["LD_PRELOAD"])
    code = ("import numpy as np, psutil\n"
            "from shard.osutil import release_memory\n"
            "rss = lambda: psutil.Process().memory_info().rss\n"
            "base = rss(); a = [np.ones(100_000) for _ in range(1000)]; del a\n"
            "held = rss() - base; print(release_memory(), held > 400 << 20, rss() - base < 100 << 20)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **SHARD_PROCESS_ENV, **env,
                                                            "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
                         capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["jemalloc", "True", "True"], out.stderr
    # an LD_PRELOAD the process already has is kept, after jemalloc
    assert host_process_env("/x/libother.so")["LD_PRELOAD"] == env["LD_PRELOAD"] + " /x/libother.so"


def test_the_shard_processes_jemalloc_settings_can_be_replaced(monkeypatch):
    """LOOKALIKE_SHARD_MALLOC_CONF replaces jemalloc's settings of a process of several shards, and the process
    runs with them (here: no thread caches)."""
    import os
    import subprocess
    import sys

    from shard.osutil import JEMALLOC_CONF, host_process_env

    assert host_process_env("")["MALLOC_CONF"] == JEMALLOC_CONF
    monkeypatch.setenv("LOOKALIKE_SHARD_MALLOC_CONF", JEMALLOC_CONF + ",tcache:false")
    env = host_process_env("")
    assert env["MALLOC_CONF"] == JEMALLOC_CONF + ",tcache:false"
    code = ("import ctypes\n"
            "v, n = ctypes.c_bool(True), ctypes.c_size_t(1)\n"
            "ctypes.CDLL(None).mallctl(b'opt.tcache', ctypes.byref(v), ctypes.byref(n), None, ctypes.c_size_t(0))\n"
            "print(v.value)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["False"], out.stderr


def test_a_process_tells_what_its_allocator_holds_in_use_and_free():
    """shard.osutil.allocator_stats: jemalloc's statistics where it allocates (a process of several shards), glibc's
    otherwise; 400 MB allocated shows (381 MiB), and leaves once freed."""
    import os
    import subprocess
    import sys

    from shard.osutil import SHARD_PROCESS_ENV, allocator_stats, host_process_env

    code = ("import numpy as np\n"
            "from shard.osutil import allocator_stats, release_memory\n"
            "key = 'allocated' if 'allocated' in allocator_stats() else 'heap_in_use'\n"
            "live = lambda: allocator_stats()[key] + allocator_stats().get('mapped', 0) * (key != 'allocated')\n"
            "base = live(); a = [np.ones(100_000) for _ in range(500)]; held = live() - base; del a\n"
            "release_memory(); print(key, held > 380 << 20, live() - base < 10 << 20)\n")
    for env, key in ((host_process_env(""), "allocated"), ({}, "heap_in_use")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **SHARD_PROCESS_ENV, **env},
                             capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.stdout.split() == [key, "True", "True"], out.stdout + out.stderr
    stats = allocator_stats()  # pytest's process: glibc
    assert stats["heap"] >= stats["heap_in_use"] > 0 and stats["heap_free"] >= 0
