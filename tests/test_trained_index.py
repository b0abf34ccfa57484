"""One trained index per collection: trained once for all shards, shared by every shard and replica, kept in
storage and loaded at restart; sharded answers equal one FAISS index with that trained quantizer."""

from __future__ import annotations

import dataclasses
import threading

import faiss
import numpy as np
import pytest
from conftest import wait_for

from lookalike.config import CollectionConfig, MovePolicy
from lookalike.ids import buckets_and_labels, order_by_distance_then_label
from control.local import LocalCluster
from shard.shard import Shard
from shard.cpu_index import VectorIndex
from shard.trained import read_template, template_dir

DIM = 32


def _data(n: int, seed: int = 0, clusters: int = 64):
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(clusters, DIM)).astype(np.float32) * 4
    xb = centroids[rng.integers(0, clusters, n)] + rng.normal(size=(n, DIM)).astype(np.float32)
    xq = centroids[rng.integers(0, clusters, 40)] + rng.normal(size=(40, DIM)).astype(np.float32)
    return xb.astype(np.float32), xq.astype(np.float32)


def _cluster(tmp_path, shards: int):
    return LocalCluster(tmp_path / "data", shards=shards, transport="inprocess",
                        policy=MovePolicy(grace_s=0.3, train_check_s=0.05))


def _load(cl, name: str, xb: np.ndarray) -> list[str]:
    ids = [f"img-{i:06d}" for i in range(len(xb))]
    for s in range(0, len(xb), 2000):
        cl.router.upsert(name, ids[s:s + 2000], xb[s:s + 2000])
    return ids


def _load_trained(cl, name: str, xb: np.ndarray, wait: bool = True) -> list[str]:
    """Collection ``name`` (IVF32,Flat, nprobe 4, 32 buckets) holding ``xb``, trained once ``wait``."""
    cl.router.create_collection(CollectionConfig(name, DIM, index="IVF32,Flat", nprobe=4, buckets=32))
    ids = _load(cl, name, xb)
    if wait:
        assert cl.controller._wait_trained(name, 30)
    return ids


def _one_faiss_index(cl, cfg: CollectionConfig, ids: list[str], xb: np.ndarray):
    """The collection's trained index as one in-process FAISS index holding every vector, labelled as the shards
    label them."""
    cfg = cl.controller.shard_map(cfg.name).collection
    index = read_template(cl.controller.data_dir, cfg, cfg.trained_version)
    _, labels = buckets_and_labels(ids, cfg.buckets)
    index.add_with_ids(xb, labels)
    return index, dict(zip(labels.tolist(), ids))


def _top_k_by_distance_then_label(index, xq, k: int, nprobe: int, larger_is_better: bool = False):
    """One FAISS index's top k, equal distances in label order (the documented tie-break): searched deep enough
    that a tie group at the k-th place is whole (PQ8x4 codes coincide often)."""
    D, L = index.search(xq, 500, params=faiss.SearchParametersIVF(nprobe=nprobe))
    order = order_by_distance_then_label(D, L, larger_is_better)
    D, L = np.take_along_axis(D, order, axis=1), np.take_along_axis(L, order, axis=1)
    assert (D[:, k - 1] != D[:, -1]).all() or (L[:, -1] < 0).all()  # the tie group at the cut is whole
    return D[:, :k], L[:, :k]


@pytest.mark.parametrize("spec,n", [("IVF32,Flat", 6000), ("IVF16,PQ8x4", 6000), ("IVF16,PQ8x4fs", 6000)])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_shards_with_one_trained_index_answer_as_one_faiss_index(tmp_path, shards, spec, n):
    cl = _cluster(tmp_path, shards)
    try:
        cfg = CollectionConfig("w", DIM, index=spec, nprobe=4, buckets=64).validated()
        cl.router.create_collection(cfg)
        xb, xq = _data(n)
        ids = _load(cl, "w", xb)
        assert cl.controller._wait_trained("w", 30), cl.router.training_status("w")
        st = cl.router.training_status("w")
        assert st["state"] == "trained" and st["version"] == 1 and st["shards_ready"] == st["shards"] == shards
        one, by_label = _one_faiss_index(cl, cfg, ids, xb)
        D1, L1 = _top_k_by_distance_then_label(one, xq, 10, nprobe=4)
        res = cl.router.search("w", xq, k=10, nprobe=4)
        assert res.ids == [[by_label[lab] for lab in row if lab >= 0] for row in L1.tolist()]
        np.testing.assert_allclose(res.D, D1, rtol=1e-5, atol=1e-4)
        # the same query, again and again: the same ids in the same order
        assert all(cl.router.search("w", xq[:5], k=10, nprobe=4).ids == res.ids[:5] for _ in range(20))
        # and nprobe means what it means for one index: all lists probed is exact
        exact = faiss.knn(xq, xb, 10)[1] if spec.endswith("Flat") else None
        if exact is not None:
            full = cl.router.search("w", xq, k=10, nprobe=32)
            assert full.ids == [[ids[i] for i in row] for row in exact.tolist()]
    finally:
        cl.close()


def test_replicas_give_identical_answers(tmp_path):
    cl = _cluster(tmp_path, 3)
    try:
        cl.router.create_collection(CollectionConfig("r", DIM, index="IVF16,PQ8x4", nprobe=3, buckets=32,
                                                     replication=2))
        xb, xq = _data(5000, seed=3)
        _load(cl, "r", xb)
        assert cl.controller._wait_trained("r", 30)
        answers = {tuple(map(tuple, cl.router.search("r", xq, k=10).ids)) for _ in range(20)}  # replicas rotate
        assert len(answers) == 1
        # every shard holds replicas of other shards' buckets, and each answers for all it holds: the same
        # vectors give the same codes and distances on each of them
        versions = {c.trained_version for _, s in cl.router.shard_stats() for c in s.collections}
        assert versions == {1}
    finally:
        cl.close()


def test_untrained_collection_searches_exactly_and_says_so(tmp_path):
    cl = _cluster(tmp_path, 2)
    try:
        cl.router.create_collection(CollectionConfig("u", DIM, index="IVF64,Flat", nprobe=1, buckets=16))
        xb, xq = _data(1500)
        ids = _load(cl, "u", xb)
        assert wait_for(lambda: cl.router.training_status("u")["vectors"] == 1500, 10)
        st = cl.router.training_status("u")
        assert st["state"] == "untrained" and st["vectors_needed"] == 39 * 64 and st["version"] == 0
        assert st["message"] == "untrained: 1,500 of 2,496 vectors needed; searches are exact"
        exact = faiss.knn(xq, xb, 10)[1]
        assert cl.router.search("u", xq, k=10, nprobe=1).ids == [[ids[i] for i in row] for row in exact.tolist()]
    finally:
        cl.close()


class _Count:
    def __init__(self):
        self.n = 0


def test_restart_loads_the_trained_version_without_training(tmp_path, monkeypatch):
    cl = _cluster(tmp_path, 2)
    xb, xq = _data(6000, seed=1)
    try:
        cl.router.create_collection(CollectionConfig("s", DIM, index="IVF32,PQ8x4", nprobe=4, buckets=32))
        _load(cl, "s", xb)
        assert cl.controller._wait_trained("s", 30)
        before = cl.router.search("s", xq, k=10)
    finally:
        cl.close()
    trainings = _Count()
    real = VectorIndex.train_template

    def counting(self, x, gpu=None):
        trainings.n += 1
        return real(self, x, gpu)

    monkeypatch.setattr(VectorIndex, "train_template", counting)
    cl = _cluster(tmp_path, 2)
    try:
        st = cl.router.training_status("s")
        assert st["version"] == 1
        stats = [c for _, s in cl.router.shard_stats() for c in s.collections]
        assert {c.trained_version for c in stats} == {1} and all(c.trained for c in stats)
        after = cl.router.search("s", xq, k=10)
        assert after.ids == before.ids
        np.testing.assert_array_equal(after.D, before.D)
        cl.controller.check_training()
        assert trainings.n == 0
    finally:
        cl.close()


def test_a_damaged_trained_index_is_reported_searches_stay_exact_and_training_again_fixes_it(tmp_path):
    cl = _cluster(tmp_path, 2)
    xb, xq = _data(6000, seed=2)
    try:
        cl.router.create_collection(CollectionConfig("d", DIM, index="IVF32,Flat", nprobe=1, buckets=32))
        ids = _load(cl, "d", xb)
        assert cl.controller._wait_trained("d", 30)
        before = cl.router.search("d", xq, k=10, nprobe=1)
    finally:
        cl.close()
    path = template_dir(tmp_path / "data", "d") / "v1.index"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    def damaged(cluster):
        return [d for _, s in cluster.router.shard_stats() for c in s.collections for d in c.damaged]

    cl = _cluster(tmp_path, 2)  # the shards' index checkpoints hold the trained index: they serve it
    try:
        assert damaged(cl) and all("trained index v1 of 'd'" in d and "is damaged" in d for d in damaged(cl))
        assert cl.router.search("d", xq, k=10, nprobe=1).ids == before.ids
    finally:
        cl.close()
    for p in (tmp_path / "data" / "shards").glob("*/d/ckpt-*"):
        p.unlink()
    cl = _cluster(tmp_path, 2)  # no checkpoint either: exact from the buffer until trained again
    try:
        assert damaged(cl)
        exact = faiss.knn(xq, xb, 10)[1]
        assert cl.router.search("d", xq, k=10, nprobe=1).ids == [[ids[i] for i in row] for row in exact.tolist()]
        assert cl.router.train("d") == 2
        assert wait_for(lambda: cl.router.training_status("d")["version"] == 2, 30)
        assert cl.controller._wait_trained("d", 30)
        assert not damaged(cl)
    finally:
        cl.close()


def test_training_again_makes_a_new_version_while_searches_go_on(tmp_path):
    cl = _cluster(tmp_path, 2)
    xb, xq = _data(6000, seed=4)
    errors: list[Exception] = []
    stop = threading.Event()
    try:
        cl.router.create_collection(CollectionConfig("t", DIM, index="IVF32,Flat", nprobe=32, buckets=32))
        ids = _load(cl, "t", xb)
        assert cl.controller._wait_trained("t", 30)
        exact = [[ids[i] for i in row] for row in faiss.knn(xq, xb, 5)[1].tolist()]

        def search():
            while not stop.is_set():
                try:
                    if cl.router.search("t", xq, k=5).ids != exact:  # nprobe = nlist: exact in either version
                        errors.append(AssertionError("a search differed from the exact answer"))
                except Exception as err:  # noqa: BLE001
                    errors.append(err)

        t = threading.Thread(target=search)
        t.start()
        assert cl.router.train("t") == 2
        assert wait_for(lambda: cl.router.training_status("t")["version"] == 2, 30)
        assert cl.controller._wait_trained("t", 30)
        stop.set()
        t.join()
        assert not errors, errors[:3]
        assert {c.trained_version for _, s in cl.router.shard_stats() for c in s.collections} == {2}
        assert sorted(p.name for p in template_dir(tmp_path / "data", "t").glob("*.index")) == ["v1.index",
                                                                                                "v2.index"]
    finally:
        stop.set()
        cl.close()


def test_a_restart_after_training_again_loads_the_new_versions_checkpoint_not_the_whole_storage(tmp_path):
    # Moving the shards into a new version logs nothing: their checkpoint must still be written again, or every
    # later start finds only the old version's, refuses it and replays the whole storage (at 2M vectors on 8
    # shards of one process, 94 s instead of about one).
    cl = _cluster(tmp_path, 2)
    xb, xq = _data(6000, seed=7)
    try:
        _load_trained(cl, "r", xb)
        version = cl.router.train("r")  # nothing is written after this
        assert version >= 2 and wait_for(lambda: cl.router.training_status("r")["version"] == version, 30)
        assert cl.controller._wait_trained("r", 30)
        before = cl.router.search("r", xq, k=10)
    finally:
        cl.close()
    cl = _cluster(tmp_path, 2)
    try:
        stats = [c for _, s in cl.router.shard_stats() for c in s.collections]
        assert len(stats) == 2 and {c.trained_version for c in stats} == {version}
        assert all(c.loaded_from_checkpoint and c.replayed_records == 0 for c in stats), stats
        after = cl.router.search("r", xq, k=10)
        assert after.ids == before.ids
        np.testing.assert_array_equal(after.D, before.D)
    finally:
        cl.close()


@pytest.mark.parametrize("again", [False, True], ids=["first training", "trained again"])
def test_a_restart_behind_the_collections_trained_version_loads_its_checkpoint_and_moves_on(tmp_path, monkeypatch,
                                                                                          again):
    # Stopped after the collection was trained (again) but before the shards moved into the new version: each
    # starts from its checkpoint of the version it held and moves on after, as a live shard does; it does not
    # replay its whole storage into the new version before it answers.
    cl = _cluster(tmp_path, 2)
    xb, xq = _data(6000, seed=8)
    with monkeypatch.context() as m:
        try:
            ids = _load_trained(cl, "b", xb, wait=again)
            m.setattr(Shard, "use_trained", lambda self, coll: (_ for _ in ()).throw(RuntimeError("stopped first")))
            want = cl.router.train("b") if again else 1
            assert wait_for(lambda: cl.router.training_status("b")["version"] >= want, 30)
        finally:
            cl.close()  # the shards still unable to move into the new version
    cl = _cluster(tmp_path, 2)
    try:
        stats = [c for _, s in cl.router.shard_stats() for c in s.collections]
        assert all(c.loaded_from_checkpoint and c.replayed_records == 0 for c in stats), stats
        assert cl.controller._wait_trained("b", 30)
        cfg = cl.controller.shard_map("b").collection  # trained again meanwhile if it grew after the first training
        stats = [c for _, s in cl.router.shard_stats() for c in s.collections]
        assert cfg.trained_version >= want and {c.trained_version for c in stats} == {cfg.trained_version}
        index, names = _one_faiss_index(cl, cfg, ids, xb)
        _, L = _top_k_by_distance_then_label(index, xq, 10, 4)
        assert cl.router.search("b", xq, k=10, nprobe=4).ids == [[names[x] for x in row] for row in L.tolist()]
    finally:
        cl.close()


def test_a_shard_opening_a_trained_collection_starts_from_the_template(tmp_path):
    cl = _cluster(tmp_path, 1)
    xb, _ = _data(3000, seed=5)
    try:
        cl.router.create_collection(CollectionConfig("o", DIM, index="IVF16,Flat", nprobe=2, buckets=8))
        _load(cl, "o", xb)
        assert cl.controller._wait_trained("o", 30)
        cfg = cl.controller.shard_map("o").collection
    finally:
        cl.close()
    shard = Shard("shard-x", tmp_path / "data")
    shard.open_collection(cfg, [])  # no items here: its index is the trained template, empty
    sc = shard.collection("o")
    assert sc.index.trained and sc.index.trained_version == 1 and sc.index.ntotal == 0
    shard.close()


def test_the_api_and_the_cli_tell_where_training_stands(tmp_path):
    import json

    from conftest import run_cli, served_local_cluster

    with served_local_cluster(tmp_path / "data", shards=2) as (cluster, client):
        client.create_collection("c", DIM, "l2", "IVF16,Flat", 16)
        info = client.describe_collection("c")
        assert info.training.state == info.training.UNTRAINED and info.training.vectors_needed == 1000
        target = client.target
        xb, _ = _data(1200, seed=6)
        client.upsert("c", [f"i{i}" for i in range(1200)], xb)
        assert cluster.controller._wait_trained("c", 30)
        info = client.describe_collection("c")
        assert info.training.state == info.training.TRAINED and info.training.version == 1
        assert info.training.message == "trained v1 on 1,200 vectors; 2 of 2 shards use it"
        out = run_cli("train", "c", "--timeout", "60", target=target)
        assert out.returncode == 0, out.stderr
        assert "training c (IVF16,Flat) as version 2" in out.stdout
        described = json.loads(run_cli("collection", "describe", "c", target=target).stdout)
        assert described["training"]["version"] == "2" and described["training"]["state"] == "TRAINED"
        assert "index: trained v2" in run_cli("status", target=target).stdout
        client.create_collection("flat", DIM)
        bad = run_cli("train", "flat", target=target)
        assert bad.returncode != 0 and "needs no training" in bad.stderr


def test_a_gpu_shard_trains_the_coarse_kmeans_on_its_gpu_and_searches_a_mirror_of_the_trained_index(tmp_path):
    from lookalike.gpu import EmulatedGpuBackend

    backend = EmulatedGpuBackend()
    calls = []
    real = backend.to_gpu

    def to_gpu(index, float16=False):
        calls.append(type(faiss.downcast_index(index)).__name__)
        return real(index, float16)

    backend.to_gpu = to_gpu
    cl = LocalCluster(tmp_path / "data", shards=2, transport="inprocess", gpu=backend,
                      policy=MovePolicy(grace_s=0.3, train_check_s=0.05))
    try:
        cfg = CollectionConfig("g", DIM, index="IVF16,Flat", nprobe=4, buckets=16).validated()
        cl.router.create_collection(cfg)
        xb, xq = _data(3000, seed=7)
        ids = _load(cl, "g", xb)
        assert cl.controller._wait_trained("g", 30)
        assert calls[0] == "IndexFlatL2"  # the k-means' assignment index went to the "GPU" first
        assert all(cl.placer._shard(s).collection("g").index.on_gpu for s in ("shard-0", "shard-1"))
        one, by_label = _one_faiss_index(cl, cfg, ids, xb)
        D1, L1 = _top_k_by_distance_then_label(one, xq, 10, nprobe=4)
        assert cl.router.search("g", xq, k=10).ids == [[by_label[lab] for lab in row] for row in L1.tolist()]
    finally:
        cl.close()


def test_the_router_chooses_the_lists_once_and_the_answer_stays_that_of_one_index(tmp_path, monkeypatch):
    used, modes = [], set()
    real = faiss.IndexIVFFlat.search_preassigned_c

    def counting(self, n, *args):
        used.append(n)
        modes.add(self.parallel_mode)  # 3: the batch split over the shard's threads (FAISS's default 0: one)
        return real(self, n, *args)

    monkeypatch.setattr(faiss.IndexIVFFlat, "search_preassigned_c", counting)
    cl = _cluster(tmp_path, 3)
    try:
        cfg = CollectionConfig("q", DIM, index="IVF32,Flat", nprobe=4, buckets=32, metric="cosine").validated()
        cl.router.create_collection(cfg)
        xb, xq = _data(5000, seed=8)
        ids = _load(cl, "q", xb)
        assert cl.controller._wait_trained("q", 30)
        trained = cl.controller.shard_map("q").collection
        cl.router.search("q", xq, k=10)  # the first search asks a shard for the centroids, in the background
        assert wait_for(lambda: cl.router._coarse.ready(trained) is not None, 10)
        used.clear()
        res = cl.router.search("q", xq, k=10, nprobe=5)
        assert used and sum(used) >= 3 * len(xq)  # every shard searched the lists the router chose
        assert modes == {3}
        one, by_label = _one_faiss_index(cl, trained, ids, _normalized(xb))
        D1, L1 = _top_k_by_distance_then_label(one, _normalized(xq), 10, nprobe=5, larger_is_better=True)
        assert res.ids == [[by_label[lab] for lab in row] for row in L1.tolist()]
        np.testing.assert_allclose(res.D, D1, rtol=1e-5, atol=1e-5)
    finally:
        cl.close()


def _normalized(x):
    x = x.copy()
    faiss.normalize_L2(x)
    return x


def test_a_shard_ignores_lists_chosen_for_another_version_and_refuses_lists_out_of_range(tmp_path):
    from lookalike.errors import InvalidArgument

    cl = _cluster(tmp_path, 1)
    try:
        cl.router.create_collection(CollectionConfig("v", DIM, index="IVF16,Flat", nprobe=16, buckets=8))
        xb, xq = _data(3000, seed=9)
        ids = _load(cl, "v", xb)
        assert cl.controller._wait_trained("v", 30)
        sc = cl.placer._shard("shard-0").collection("v")
        exact = [[ids[i] for i in row] for row in faiss.knn(xq[:2], xb, 3)[1].tolist()]
        wrong = np.zeros(2 * 16, dtype=np.int64)  # list 0 only, as a different version would choose
        _, _, got, _ = sc.search(xq[:2], 3, 16, coarse=(7, 16, wrong, np.zeros(32, np.float32)))
        assert [got[:3], got[3:]] == exact  # ignored: all 16 lists probed
        with pytest.raises(InvalidArgument, match="outside"):
            sc.search(xq[:2], 3, 16, coarse=(1, 16, wrong + 16, np.zeros(32, np.float32)))
        with pytest.raises(InvalidArgument, match="coarse assignment of"):
            sc.search(xq[:2], 3, 16, coarse=(1, 16, wrong[:5], np.zeros(5, np.float32)))
    finally:
        cl.close()


def test_a_collection_created_again_under_its_name_never_reuses_a_trained_version(tmp_path):
    cl = _cluster(tmp_path, 2)
    try:
        for round_, seed in ((1, 10), (2, 11)):
            cfg = CollectionConfig("x", DIM, index="IVF16,Flat", nprobe=2, buckets=16).validated()
            cl.router.create_collection(cfg)
            xb, xq = _data(3000, seed=seed)
            ids = _load(cl, "x", xb)
            assert cl.controller._wait_trained("x", 30)
            trained = cl.controller.shard_map("x").collection
            assert trained.trained_version == round_  # the cluster's counter: the second "x" gets 2, not 1 again
            cl.router.search("x", xq, k=10)
            assert wait_for(lambda: cl.router._coarse.ready(trained) is not None, 10)
            one, by_label = _one_faiss_index(cl, trained, ids, xb)
            D1, L1 = _top_k_by_distance_then_label(one, xq, 10, nprobe=2)
            assert cl.router.search("x", xq, k=10).ids == [[by_label[lab] for lab in row] for row in L1.tolist()]
            cl.router.drop_collection("x")
    finally:
        cl.close()


def test_a_training_asked_for_while_one_runs_comes_after_it(tmp_path, monkeypatch):
    """`lookalike train` right after a load, while the collection's first training runs: the request used to be
    dropped when that training ended, and `train` waited forever for its version."""
    cl = _cluster(tmp_path, 2)
    xb, _ = _data(3000, seed=6)
    placer = cl.controller._placer
    real = placer.train_collection
    started, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(placer, "train_collection", held)
    try:
        cl.router.create_collection(CollectionConfig("q", DIM, index="IVF32,Flat", buckets=32))
        _load(cl, "q", xb)
        assert started.wait(30)  # v1 under way
        assert cl.router.train("q") == 2
        assert "training v1" in cl.router.training_status("q")["message"]
        assert "v2 asked for, starting after it" in cl.router.training_status("q")["message"]
        release.set()
        assert wait_for(lambda: cl.router.training_status("q")["version"] == 2, 30)
        assert cl.controller._wait_trained("q", 30)
    finally:
        release.set()
        cl.close()


def test_the_router_quantizes_on_one_openmp_thread_and_gives_the_thread_its_setting_back():
    """OpenMP's idle workers spin after a parallel search and take CPU from the shards beside the router (see
    router.coarse): the router's coarse quantization runs on one thread, and leaves the thread's setting as it was."""
    from router.coarse import CoarseQuantizers, _Quantizer

    seen = []

    class Recording(faiss.IndexFlatL2):
        def search(self, x, k, **kw):
            seen.append(faiss.omp_get_max_threads())
            return super().search(x, k, **kw)

    index = Recording(8)
    index.add(np.random.default_rng(0).random((16, 8), dtype=np.float32))
    cfg = CollectionConfig(name="c", dim=8, index="IVF16,Flat", nprobe=4)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        got = CoarseQuantizers.assign(_Quantizer(1, index), cfg, np.zeros((3, 8), np.float32), 0)
        assert seen == [1] and faiss.omp_get_max_threads() == 2
        assert np.frombuffer(got.lists, dtype="<i8").shape == (12,) and got.nprobe == 4
    finally:
        faiss.omp_set_num_threads(before)


def _shard_and_a_new_version(tmp_path, n: int, seed: int):
    """A shard holding collection "m" (IVF16,Flat, 8 buckets) trained on the first half of ``n + n // 2`` vectors
    and holding the first ``n`` as ``i0``...; a second trained index of it, and its config at the next version.
    Returns (shard, its collection, the vectors, queries, ids, the second template, the moved config)."""
    from conftest import trained_config

    xb, xq = _data(n + n // 2, seed=seed)
    shard_ = Shard("s0", tmp_path)
    cfg = CollectionConfig("m", DIM, index="IVF16,Flat", nprobe=16, buckets=8).validated()
    shard_.open_collection(trained_config(tmp_path, cfg, xb[:n // 2 + n // 4]), range(8))
    sc = shard_.collection("m")
    ids = [f"i{j}" for j in range(n)]
    sc.upsert(ids, xb[:n], [None] * n)
    template = VectorIndex(sc.coll).train_template(xb[n // 2:n + n // 4])
    return shard_, sc, xb, xq, ids, template, dataclasses.replace(sc.coll, trained_version=sc.coll.trained_version + 1)


def test_a_move_into_a_new_trained_version_lets_writes_go_on_and_keeps_every_one(tmp_path, monkeypatch):
    """Moving a shard's items into a new trained version held its writes for the whole move (at 10M x 128 on 8
    shards: 163-185 s for 630k vectors a shard). The move now fills the new index a part at a time while writes
    go on and apply to both indexes; it ends holding what the table holds, each item's last vector, without the
    buckets given away meanwhile."""
    import shard.training as tr

    shard_, sc, xb, xq, ids, template, moved = _shard_and_a_new_version(tmp_path, 4000, seed=5)
    monkeypatch.setattr(tr, "_ENCODE_BATCH", 1000)
    monkeypatch.setattr(tr, "_ADD_BATCH", 300)
    first, resume, real_read = threading.Event(), threading.Event(), tr.read_buckets

    def read_buckets(*args):  # the move stops after its first part, until the writes below are done
        for i, batch in enumerate(real_read(*args)):
            if i == 1:
                first.set()
                resume.wait(30)
            yield batch

    monkeypatch.setattr(tr, "read_buckets", read_buckets)
    move = threading.Thread(target=tr.adopt_trained, args=(sc, moved, faiss.clone_index(template)))
    move.start()
    try:
        assert first.wait(30)
        writes = threading.Thread(target=lambda: (
            sc.upsert([f"n{j}" for j in range(300)], xb[4000:4300], [None] * 300),  # new items
            sc.upsert(ids[:100], xb[5000:5100], [None] * 100),  # new vectors for filled items and others
            sc.upsert(ids[3900:], xb[5100:5200], [None] * 100),
            sc.delete(ids[100:200]),
            sc.drop_buckets([0], 1)))  # a bucket given away (a move's source), filled before the pause
        writes.start()
        writes.join(10)
        assert not writes.is_alive(), "the writes waited for the move"
    finally:
        resume.set()
        move.join(60)
    assert sc.index.trained_version == moved.trained_version and sc.adopting is None
    final_ids = ids[:100] + ids[200:3900] + ids[3900:] + [f"n{j}" for j in range(300)]
    final_x = np.concatenate([xb[5000:5100], xb[200:3900], xb[5100:5200], xb[4000:4300]])
    buckets, home = buckets_and_labels(final_ids, 8)
    kept = buckets != 0
    final_ids, final_x, home = [u for u, k in zip(final_ids, kept) if k], final_x[kept], home[kept]
    assert sc.index.ntotal == len(sc.table) == len(final_ids) > 3000
    one = faiss.clone_index(template)
    one.add_with_ids(final_x, sc.table.find(home, final_ids))
    D, L = sc.index.search(xq, 10, nprobe=16)
    D1, L1 = _top_k_by_distance_then_label(one, xq, 10, nprobe=16)
    np.testing.assert_array_equal(L, L1)
    np.testing.assert_allclose(D, D1, rtol=1e-5)
    shard_.close()


def test_a_move_that_fails_midway_leaves_the_old_index_serving_and_can_be_done_again(tmp_path, monkeypatch):
    """A move whose read of storage fails after a part (a compaction kept changing the files) stops: the old index
    keeps serving, writes no longer go to the half-filled one, and the next move starts over."""
    import shard.training as tr
    from shard.bucket_reader import StoreChanged

    shard_, sc, xb, _, _, template, moved = _shard_and_a_new_version(tmp_path, 2000, seed=6)
    monkeypatch.setattr(tr, "_ENCODE_BATCH", 500)
    real_read = tr.read_buckets

    def failing(*args):
        for i, batch in enumerate(real_read(*args)):
            if i == 1:
                raise StoreChanged("kept being compacted")
            yield batch

    monkeypatch.setattr(tr, "read_buckets", failing)
    with pytest.raises(StoreChanged):
        tr.adopt_trained(sc, moved, faiss.clone_index(template))
    assert sc.adopting is None and sc.index.trained_version == moved.trained_version - 1
    sc.upsert(["late"], xb[2000:2001], [None])
    monkeypatch.setattr(tr, "read_buckets", real_read)
    assert tr.adopt_trained(sc, moved, faiss.clone_index(template))
    assert sc.index.trained_version == moved.trained_version and sc.index.ntotal == len(sc.table) == 2001
    D, _ = sc.index.search(xb[2000:2001], 1, nprobe=16)
    assert D[0, 0] < 1e-4
    shard_.close()


def test_a_move_whose_storage_gives_fewer_items_than_the_shard_holds_is_refused(tmp_path, monkeypatch):
    """The reader of storage skips parts it cannot read (a damaged snapshot, damaged log frames). A move filled from
    it would swap in an index without those items, which the shard still lists: they would never be found again.
    The move is refused instead, with a sentence, and the old index keeps serving every item."""
    import shard.training as tr
    from lookalike.errors import FailedPrecondition

    shard_, sc, xb, _, ids, template, moved = _shard_and_a_new_version(tmp_path, 2000, seed=7)
    real_read = tr.read_buckets

    def skipping(*args):  # the first item of the first part unreadable
        for i, batch in enumerate(real_read(*args)):
            if i == 0:
                batch = dataclasses.replace(batch, ids=batch.ids[1:], vectors=batch.vectors[1:],
                                            payloads=batch.payloads[1:])
            yield batch

    monkeypatch.setattr(tr, "read_buckets", skipping)
    with pytest.raises(FailedPrecondition, match="gave 1999 of the 2000 items"):
        tr.adopt_trained(sc, moved, faiss.clone_index(template))
    assert sc.adopting is None and sc.index.trained_version == moved.trained_version - 1
    assert sc.index.ntotal == len(sc.table) == 2000
    shard_.close()
