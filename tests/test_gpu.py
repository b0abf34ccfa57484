"""GPU shards. On the CPU (CI) the GPU is emulated (``EmulatedGpuBackend``: "GPU" indexes are CPU clones), which
tests everything of ours: the mirror, tombstones and rebuilds, capacity, placement, validation. The tests marked
``real_gpu`` run FAISS's GPU indexes and are skipped without a GPU and a faiss build with GPU support."""

from __future__ import annotations


import faiss
import numpy as np
import pytest

from conftest import assert_holds_exactly, make_data
from lookalike import gpu
from lookalike.config import ClusterConfig, CollectionConfig, MovePolicy
from lookalike.errors import InvalidArgument, ResourceExhausted
from lookalike.gpu import EmulatedGpuBackend, shard_num_gpus
from control.local import LocalCluster
from shard import gpu_keeper, gpu_mirror, specs
from shard.shard import Shard
from shard.cpu_index import VectorIndex

real_gpu = pytest.mark.skipif(not gpu.available(), reason=f"no GPU, or no GPU support in {gpu.faiss_build()}")

@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """Small indexes: one OpenMP thread is faster than two spinning on a busy machine."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


SPECS = ["Flat", "IVF16,Flat", "IVF16,PQ8x4np", "IVF16,SQ8"]  # np: no polysemous training (slow, not needed)


def _labels(n, start=0):
    return np.arange(start, start + n, dtype=np.int64) * 7 + 3


class Twin:
    """The same writes to a CPU index and to a GPU one; their searches must agree."""

    def __init__(self, cfg: CollectionConfig, backend, dim: int, metric: str, n: int = 3000, seed: int = 0):
        self.cpu, self.gpu = VectorIndex(cfg), VectorIndex(cfg, backend)
        self.xb, self.xq = make_data(metric, 3 * n, dim, seed=seed, nq=40)
        self.fresh = iter(range(n, 3 * n))  # rows never used: replacements bring new vectors (no ties)
        self.labels = _labels(n)
        self.live = set(range(n))
        self.rng = np.random.default_rng(seed)
        for idx in (self.cpu, self.gpu):
            idx.add(self.labels, self.xb[:n])
        if self.cpu.needs_training:  # trained once: two trainings may differ in the last float bits
            main = self.cpu.build_trained()[0]
            self.cpu.install_trained((main, None, None))
            self.gpu.install_trained((faiss.clone_index(main), None, None))

    def replace(self, m: int):
        rows = self.rng.choice(sorted(self.live), m, replace=False)
        x = self.xb[[next(self.fresh) for _ in range(m)]]
        for idx in (self.cpu, self.gpu):
            idx.remove(self.labels[rows])
            idx.add(self.labels[rows], x)

    def delete(self, m: int):
        rows = self.rng.choice(sorted(self.live), m, replace=False)
        self.live -= set(rows.tolist())
        for idx in (self.cpu, self.gpu):
            assert idx.remove(self.labels[rows]) == m

    def add(self, m: int):
        rows = np.array([next(self.fresh) for _ in range(m)])
        labels = _labels(m, 10_000 + rows[0])
        for idx in (self.cpu, self.gpu):
            idx.add(labels, self.xb[rows])

    def check(self, k: int = 10, nprobe: int = 0, on_gpu: bool = True):
        assert self.gpu.on_gpu == on_gpu
        D, L = self.gpu.search(self.xq, k, nprobe)
        D_ref, L_ref = self.cpu.search(self.xq, k, nprobe)
        np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
        for q in range(len(L)):
            if not (L[q] == L_ref[q]).all():
                # only where distances tie (PQ codes that coincide): their order, and which of those tied with
                # the k-th make the cut, are arbitrary
                cut = ~np.isclose(D_ref[q], D_ref[q, -1], rtol=1e-5, atol=1e-6)
                assert set(L[q][cut]) == set(L_ref[q][cut]), f"query {q}"
                for j in np.flatnonzero((L[q] != L_ref[q]) & cut):
                    assert np.isclose(D_ref[q], D_ref[q, j], rtol=1e-5, atol=1e-6).sum() > 1, f"query {q}"


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_gpu_mirror_answers_like_the_cpu_index_through_writes_and_rebuilds(monkeypatch, spec, metric):
    monkeypatch.setattr(gpu_mirror, "_MIN_REBUILD", 256)  # 1024 by default
    backend = EmulatedGpuBackend()
    t = Twin(CollectionConfig("c", 32, metric, spec, nprobe=4).validated(), backend, 32, metric)
    assert t.gpu.trained and not t.gpu.on_gpu  # nothing on the GPU until built
    t.check(on_gpu=False)
    assert t.gpu.sync_gpu() and t.gpu.on_gpu
    assert t.gpu.gpu_nbytes > 0 and backend.clones == 1
    t.check()
    t.check(k=50, nprobe=16)
    # Replacements and deletes leave tombstones on the GPU; searches over-fetch by them and filter.
    t.replace(60)
    t.delete(40)
    t.add(30)
    t.replace(60)  # some replaced twice: their second copies are tombstones too
    assert len(t.gpu._mirror.dead) == 160 and not t.gpu.gpu_needs_build
    t.check()
    t.check(k=1)
    # Past the threshold (256 here: 5% of 3000 is less) the mirror is rebuilt from the CPU index.
    t.delete(120)
    assert t.gpu.gpu_needs_build
    t.check()  # still right before the rebuild
    assert t.gpu.sync_gpu() and backend.clones == 2 and not len(t.gpu._mirror.dead)
    t.check()
    t.replace(20)
    t.check()


def test_searches_use_the_mirror(monkeypatch):
    t = Twin(CollectionConfig("c", 16, "l2", "Flat").validated(), EmulatedGpuBackend(), 16, "l2", n=500)
    t.gpu.sync_gpu()
    calls = []
    search = type(t.gpu._mirror).search
    monkeypatch.setattr(type(t.gpu._mirror), "search", lambda self, *a: calls.append(1) or search(self, *a))
    t.check()
    assert calls == [1]


def test_queries_among_many_tombstones_look_further_then_ask_the_cpu(monkeypatch):
    t = Twin(CollectionConfig("c", 16, "l2", "Flat").validated(), EmulatedGpuBackend(), 16, "l2", n=4000)
    t.gpu.sync_gpu()
    t.replace(300)
    t.check()
    t.check(k=1024)
    # Delete the 1500 nearest neighbours of query 0: its top 2048 on the GPU (the GPU's k limit) hold 1500
    # tombstones, so for k=600 the GPU cannot tell its top k; the other queries are answered on the GPU.
    near = t.cpu.search(t.xq[:1], 1500)[1][0]
    rows = np.flatnonzero(np.isin(t.labels, near))
    for idx in (t.cpu, t.gpu):
        idx.remove(t.labels[rows])
    t.live -= set(rows.tolist())
    assert t.gpu.on_gpu and t.gpu.gpu_needs_build  # 1800 tombstones: past 1024, rebuilt by the next write
    cpu_rows = []
    search_cpu = VectorIndex._search_cpu
    monkeypatch.setattr(VectorIndex, "_search_cpu",
                        lambda self, xq, *a: cpu_rows.append(len(xq)) or search_cpu(self, xq, *a))
    t.check(k=600)
    assert cpu_rows == [1, len(t.xq)]  # query 0 from the GPU index's CPU fallback; then the whole reference
    cpu_rows.clear()
    t.check(k=10)
    assert cpu_rows == [len(t.xq)]  # k=10: query 0 looked further on the GPU and found its 10
    assert t.gpu.sync_gpu() and not len(t.gpu._mirror.dead)
    t.check(k=600)


def test_flat_mirror_grows_in_segments(monkeypatch):
    monkeypatch.setattr(gpu_keeper, "_SEGMENT_BYTES", 1000 * 16 * 4)
    monkeypatch.setattr(gpu_keeper, "_MIN_SEGMENT", 1)
    t = Twin(CollectionConfig("c", 16, "l2", "Flat").validated(), EmulatedGpuBackend(), 16, "l2", n=2500)
    t.gpu.sync_gpu()
    assert [int(p.ntotal) for p in t.gpu._mirror.parts] == [1000, 1000, 500]
    t.add(700)
    assert [int(p.ntotal) for p in t.gpu._mirror.parts] == [1000, 1000, 1000, 200]
    t.replace(100)
    t.check()
    t.check(k=200)


def test_untrained_buffer_stays_on_the_cpu_then_the_trained_index_goes_to_the_gpu():
    cfg = CollectionConfig("c", 32, "l2", "IVF16,Flat", nprobe=16).validated()
    backend = EmulatedGpuBackend()
    index = VectorIndex(cfg, backend)
    xb, xq = make_data("l2", 2000, 32)
    index.add(_labels(1000), xb[:1000])
    assert not index.gpu_needs_build and not index.sync_gpu() and backend.clones == 0
    index.add(_labels(1000, 1000), xb[1000:])
    assert index.train_if_ready() and index.gpu_needs_build and index.sync_gpu()
    cpu = VectorIndex(cfg)
    cpu.add(_labels(2000), xb)
    cpu.train_if_ready()
    np.testing.assert_array_equal(index.search(xq, 5)[1], cpu.search(xq, 5)[1])


def test_binary_and_graph_indexes_stay_on_the_cpu():
    backend = EmulatedGpuBackend()
    for cfg in (CollectionConfig("b", 64, "hamming", "BFlat").validated(),
                CollectionConfig("h", 16, "l2", "HNSW16").validated(),
                CollectionConfig("p", 16, "l2", "PCA8,Flat").validated()):
        index = VectorIndex(cfg, backend)
        assert not index.gpu_needs_build and not index.sync_gpu() and not index.on_gpu
    assert backend.clones == 0


def test_a_failed_gpu_build_falls_back_to_the_cpu(monkeypatch):
    backend = EmulatedGpuBackend()

    def no_room(index, float16=False):
        raise RuntimeError("Error: out of memory")

    monkeypatch.setattr(backend, "to_gpu", no_room)
    t = Twin(CollectionConfig("c", 16, "l2", "Flat").validated(), backend, 16, "l2", n=300)
    assert not t.gpu.sync_gpu()
    assert not t.gpu.gpu_needs_build  # not retried at once
    t.check(on_gpu=False)


# --- shards and clusters ------------------------------------------------------------------------------------------
def test_cluster_on_emulated_gpus_answers_exactly_through_writes_moves_and_restarts(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_mirror, "_MIN_REBUILD", 256)
    backend = EmulatedGpuBackend()
    cl = LocalCluster(tmp_path, shards=1, transport="inprocess", gpu=backend,
                      policy=MovePolicy(grace_s=0.05, move_buckets=16))
    acked = {}
    try:
        router = cl.router
        router.create_collection(CollectionConfig("g", dim=16, buckets=32))
        xb, _ = make_data("l2", 3000, 16, seed=4)
        ids = [f"i{i}" for i in range(2000)]
        router.upsert("g", ids, xb[:2000])
        sc = cl.placer.shards["shard-0"].collection("g")
        mirror = sc.index._mirror
        router.upsert("g", ids[:300], xb[2000:2300])  # replacements: past 256 tombstones, the mirror is rebuilt
        assert sc.index._mirror is not mirror and not len(sc.index._mirror.dead)
        router.delete("g", ids[300:400])
        acked = {u: xb[2000 + i] if i < 300 else xb[i] for i, u in enumerate(ids) if not 300 <= i < 400}
        assert sc.index.on_gpu and len(sc.index._mirror.dead) == 100
        assert_holds_exactly(router, "g", acked, 16)
        # A move: the target builds its mirror as it copies, the source drops buckets (a new flat index and its
        # mirror built beside the old ones, swapped in).
        assert cl.controller.rebalance("g", add_shards=1) > 0
        assert cl.controller.wait_moves(timeout=60)
        for shard in cl.placer.shards.values():
            assert shard.collection("g").index.on_gpu
        assert_holds_exactly(router, "g", acked, 16)
    finally:
        cl.close()
    cl = LocalCluster(tmp_path, shards=1, transport="inprocess", gpu=backend)
    try:  # reloaded from storage, mirrors built after the load
        assert all(s.collection("g").index.on_gpu for s in cl.placer.shards.values())
        assert_holds_exactly(cl.router, "g", acked, 16)
    finally:
        cl.close()


def test_gpu_memory_is_the_capacity(tmp_path):
    shard = Shard("s", tmp_path, gpu=EmulatedGpuBackend(total_bytes=64 << 20))
    assert shard.capacity_bytes == 64 << 20
    assert Shard("t", tmp_path, capacity_bytes=8 << 20, gpu=EmulatedGpuBackend(64 << 20)).capacity_bytes == 8 << 20
    assert Shard("u", tmp_path, capacity_bytes=8 << 20).capacity_bytes == 8 << 20  # CPU shard: as before

    cl = LocalCluster(tmp_path / "c", shards=1, transport="inprocess", gpu=EmulatedGpuBackend(total_bytes=4 << 20))
    try:
        router = cl.router
        router.create_collection(CollectionConfig("cap", dim=256, buckets=16))
        x = np.random.default_rng(0).normal(size=(5000, 256)).astype(np.float32)  # 5 MB on the GPU: too much
        with pytest.raises(ResourceExhausted, match="GPU"):
            router.upsert("cap", [f"a{i}" for i in range(5000)], x)
        router.upsert("cap", [f"a{i}" for i in range(2000)], x[:2000])  # 2 MB fits
        shard = cl.placer.shards["shard-0"]
        assert shard.gpu_memory_bytes() == 2000 * 256 * 4
        st = shard.stats()
        assert st["capacity_bytes"] == 4 << 20 and st["memory_bytes"] == 2000 * 256 * 4
        with pytest.raises(ResourceExhausted, match="GPU"):
            router.upsert("cap", [f"b{i}" for i in range(2500)], x[:2500])
        assert router.count("cap") == 2000
    finally:
        cl.close()
    # float16 halves the GPU bytes of a Flat collection
    cl = LocalCluster(tmp_path / "h", shards=1, transport="inprocess", gpu=EmulatedGpuBackend(total_bytes=4 << 20))
    try:
        cl.router.create_collection(CollectionConfig("half", dim=256, buckets=16, gpu_float16=True))
        cl.router.upsert("half", [f"a{i}" for i in range(5000)], x)
        assert cl.placer.shards["shard-0"].gpu_memory_bytes() == 5000 * 256 * 2
    finally:
        cl.close()


def test_device_memory_counts_when_the_backend_reports_it(tmp_path):
    shard = Shard("s", tmp_path, gpu=EmulatedGpuBackend(total_bytes=100 << 20, used_bytes=99 << 20))
    shard.check_room(1 << 20, 0)  # resident memory has no capacity here
    with pytest.raises(ResourceExhausted, match="its GPU holds 99 MiB of its 100 MiB"):
        shard.check_room(0, 2 << 20)


# --- placement ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting,cluster_gpus,shards,expected", [
    ("auto", 0, 2, 0.0),
    ("auto", 4, 2, 1.0),
    ("auto", 2, 2, 1.0),
    ("auto", 1, 2, 0.5),
    ("auto", 2, 3, 0.5),   # 2 shards per GPU: 4 places for 3 shards
    ("auto", 1, 3, 0.3333),
    (None, 8, 2, 1.0),
    (0, 4, 2, 0.0),
    (0.25, 1, 2, 0.25),
    ("2", 0, 2, 2.0),
])
def test_shard_gpus_from_cluster_resources(setting, cluster_gpus, shards, expected):
    assert shard_num_gpus(setting, cluster_gpus, shards) == expected


def test_shard_actor_options_reserve_gpus():
    from control.ray_placer import RayPlacer

    cfg = ClusterConfig(shards=2)
    assert RayPlacer(cfg, 1 << 20, cluster_gpus=2).actor_options("shard-0")["num_gpus"] == 1
    assert RayPlacer(cfg, 1 << 20, cluster_gpus=0).actor_options("shard-0")["num_gpus"] == 0
    cpu = ClusterConfig(shards=2, shard_gpus=0)
    assert RayPlacer(cpu, 1 << 20, cluster_gpus=2).actor_options("shard-1")["num_gpus"] == 0
    with pytest.raises(ValueError, match="GPUs per shard"):
        shard_num_gpus(-1, 2, 2)


def test_a_shard_given_a_gpu_without_gpu_faiss_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(gpu, "available", lambda: False)
    assert gpu.backend_for_shard(1.0) is None
    assert gpu.backend_for_shard(0) is None


# --- collection options -------------------------------------------------------------------------------------------
def test_cagra_without_cuvs_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(gpu, "has_cuvs", lambda: False)
    with pytest.raises(InvalidArgument, match="needs FAISS built with cuVS"):
        specs.check_index_spec(64, "l2", "CAGRA")
    monkeypatch.setattr(gpu, "has_cuvs", lambda: True)
    with pytest.raises(InvalidArgument, match="float vectors"):
        CollectionConfig("c", 64, "hamming", "CAGRA").validated()
    with pytest.raises(InvalidArgument, match="graph degree"):
        CollectionConfig("c", 64, "l2", "CAGRA4").validated()
    assert CollectionConfig("c", 64, "l2", "CAGRA32").validated().index == "CAGRA32"


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_cagra_mirror_with_delta_and_tombstones(monkeypatch, metric):
    monkeypatch.setattr(gpu, "has_cuvs", lambda: True)
    monkeypatch.setattr(gpu_keeper, "_CAGRA_MIN", 1000)
    backend = EmulatedGpuBackend()
    cfg = CollectionConfig("c", 16, metric, "CAGRA").validated()
    t = Twin(cfg, backend, 16, metric, n=1500)  # on a CPU shard, CAGRA is an exact flat index
    t.gpu.sync_gpu()
    assert backend.cagra_builds == 1 and t.gpu._mirror.graph
    t.replace(50)  # old copies: tombstones in the graph; new ones: in the exact delta
    t.delete(30)
    t.add(40)
    t.check()
    t.check(k=100)
    t.replace(200)
    assert t.gpu.gpu_needs_build and t.gpu.sync_gpu() and backend.cagra_builds == 2
    t.check()
    small = Twin(cfg, backend, 16, metric, n=300)  # few vectors: an exact GPU flat index, no graph
    small.gpu.sync_gpu()
    assert not small.gpu._mirror.graph and backend.cagra_builds == 2
    small.replace(10)
    small.check()


def test_gpu_float16_option():
    from router.server import config_to_spec, spec_to_config

    for spec in ("Flat", "IVF16,PQ8"):
        cfg = CollectionConfig("c", 32, "l2", spec, gpu_float16=True).validated()
        assert spec_to_config(config_to_spec(cfg)).gpu_float16
    for spec in ("HNSW16", "IVF16,Flat", "PQ8"):
        with pytest.raises(InvalidArgument, match="gpu_float16"):
            specs.check_index_spec(32, "l2", spec, gpu_float16=True)
    with pytest.raises(InvalidArgument, match="gpu_float16"):
        specs.check_index_spec(64, "hamming", "BFlat", gpu_float16=True)
    assert not spec_to_config(config_to_spec(CollectionConfig("c", 32).validated())).gpu_float16


# --- the real GPU -------------------------------------------------------------------------------------------------
@real_gpu
@pytest.mark.parametrize("spec,float16", [("Flat", False), ("IVF64,Flat", False), ("IVF64,PQ8np", False),
                                          ("Flat", True), ("IVF64,PQ8np", True)])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_real_gpu_search_equals_cpu(spec, float16, metric):
    cfg = CollectionConfig("c", 32, metric, spec, nprobe=8, gpu_float16=float16).validated()
    t = Twin(cfg, gpu.GpuBackend(), 32, metric, n=12_000)  # PQ8 trains on 39 x 256 points
    assert t.gpu.trained and t.gpu.sync_gpu() and t.gpu.on_gpu
    t.replace(100)
    t.delete(100)

    def agreement():
        D, L = t.gpu.search(t.xq, 10)
        D_ref, L_ref = t.cpu.search(t.xq, 10)
        overlap = np.mean([len(set(L[q]) & set(L_ref[q])) / 10 for q in range(len(L))])
        return overlap, np.abs(D[:, 0] - D_ref[:, 0]).max() / max(1.0, np.abs(D_ref).max())

    overlap, err = agreement()
    # float32 on the GPU: the same neighbours up to float rounding; float16: nearly the same
    assert overlap >= (0.9 if float16 else 0.98), overlap
    assert err < (1e-2 if float16 else 1e-4), err
    t.delete(300)
    assert t.gpu.sync_gpu()
    overlap, _ = agreement()
    assert overlap >= (0.9 if float16 else 0.98), overlap


@real_gpu
def test_real_gpu_memory_is_known(tmp_path):
    backend = gpu.GpuBackend()
    total, used = backend.total_bytes(), backend.used_bytes()
    assert total and total > 1 << 30 and used is not None and 0 < used < total
    assert Shard("s", tmp_path, gpu=backend).capacity_bytes == total


# --- the GPU backend's calls into faiss and nvidia-smi, with stand-ins ---------------------------------------------
def test_gpu_backend_drives_the_faiss_gpu_api(monkeypatch, tmp_path):
    made = {}

    class Resources:
        def setTempMemory(self, n):
            made["temp"] = n

    class ClonerOptions:
        useFloat16 = False
        indicesOptions = 0

    def cpu_to_gpu(res, device, index, co):
        made.update(device=device, float16=co.useFloat16, indices=co.indicesOptions)
        return faiss.clone_index(index)

    for name, value in [("StandardGpuResources", Resources), ("GpuClonerOptions", ClonerOptions),
                        ("index_cpu_to_gpu", cpu_to_gpu), ("INDICES_64_BIT", 3), ("get_num_gpus", lambda: 1)]:
        monkeypatch.setattr(faiss, name, value, raising=False)
    monkeypatch.setattr(gpu, "_resources", {})
    monkeypatch.setattr(gpu, "memory_info", lambda device=0: (16 << 30, 12 << 30))
    assert gpu.available()
    backend = gpu.backend_for_shard(0.5)  # half a GPU: half its memory, its own mirrors count as used
    assert backend.total_bytes() == 8 << 30 and backend.used_bytes() is None
    assert made["temp"] == int(0.18 * (16 << 30) * 0.5)
    assert gpu.GpuBackend(0, 1.0).used_bytes() == 4 << 30
    t = Twin(CollectionConfig("c", 16, "l2", "Flat", gpu_float16=True).validated(), backend, 16, "l2", n=500)
    assert t.gpu.sync_gpu()
    assert made["device"] == 0 and made["float16"] and made["indices"] == 3
    t.replace(20)
    t.check()


def test_gpu_memory_from_nvidia_smi(monkeypatch, tmp_path):
    import sys

    args = tmp_path / "args"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho \"$@\" > {args}\necho '81559, 1024'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML not installed: nvidia-smi answers
    assert gpu.memory_info(1) == (81559 << 20, (81559 - 1024) << 20)
    assert "--id=5" in args.read_text()  # CUDA device 1 of this process is the machine's GPU 5
