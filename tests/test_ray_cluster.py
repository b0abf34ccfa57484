"""The real thing: controller and shard actors on Ray, gRPC everywhere. One Ray instance for the session."""

import os
import signal

import numpy as np
import psutil
import pytest

from conftest import assert_same_as_exact, exact_knn, make_data, wait_for
from shard.osutil import bundled_jemalloc

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_sharded_equals_exact_every_metric(ray_cluster_factory, shards):
    cluster = ray_cluster_factory(shards)
    client = cluster.client
    for metric in ["l2", "ip", "cosine", "hamming"]:
        dim = 128 if metric == "hamming" else 32
        xb, xq = make_data(metric, 4000, dim, seed=7)
        client.create_collection(metric, dim=dim, metric=metric, buckets=128)
        client.upsert_stream(metric, ((([str(i) for i in range(j, j + 1000)]), xb[j:j + 1000])
                                      for j in range(0, len(xb), 1000)))
        hits = client.search(metric, xq, k=10)
        assert hits.coverage == 1.0
        assert_same_as_exact(metric, hits.ids, hits.D, xb, xq, 10)
    st = client.status()
    assert len(st.shards) == shards and all(s.serving for s in st.shards)
    assert sum(s.vectors for s in st.shards) == 4 * 4000


@pytest.mark.parametrize("spec,params", [("IVF32,Flat", {"nprobe": 8}), ("HNSW32", {"ef_search": 64})])
def test_approximate_recall(ray_cluster_factory, spec, params):
    cluster = ray_cluster_factory(2)
    xb, xq = make_data("l2", 20000, 32, seed=3, nq=200)
    cluster.client.create_collection("a", dim=32, metric="l2", index=spec, buckets=64)
    cluster.client.upsert_stream("a", (([str(i) for i in range(j, j + 2000)], xb[j:j + 2000])
                                       for j in range(0, len(xb), 2000)))
    # the collection's one trained index (20k vectors, over its 39-per-list threshold), used by both shards: this
    # measures the real index, trained by the controller through the Ray shard actors
    def trained():
        t = cluster.client.describe_collection("a").training
        return t.state in (t.TRAINED, t.NOT_NEEDED) and t.shards_ready == t.shards
    assert wait_for(trained, 60), cluster.client.describe_collection("a").training.message
    assert all(c.trained for _, st in cluster.router.shard_stats() for c in st.collections if c.name == "a")
    hits = cluster.client.search("a", xq, k=10, **params)
    _, I_ref = exact_knn("l2", xb, xq, 10)
    recall = np.mean([len(set(hits.ids[q]) & {str(i) for i in I_ref[q]}) / 10 for q in range(len(xq))])
    assert recall >= 0.95, f"recall@10 {recall:.3f} for {spec}"


_wait = wait_for


def test_kill_9_of_a_shard_loses_nothing(ray_cluster_factory):
    import ray

    cluster = ray_cluster_factory(2)
    client = cluster.client
    xb, xq = make_data("l2", 3000, 16, seed=11)
    client.create_collection("d", dim=16, metric="l2", buckets=32)
    client.upsert("d", [str(i) for i in range(2000)], xb[:2000])
    client.delete("d", ["0", "1"])
    pids = ray.get(cluster.handle.shard_pids.remote())
    os.kill(pids["shard-0"], signal.SIGKILL)
    # writes during the restart wait for the shard to come back (the router retries until the deadline)
    client.upsert("d", [str(i) for i in range(2000, 3000)], xb[2000:3000])
    assert _wait(lambda: all(s.serving for s in client.status().shards))
    assert ray.get(cluster.handle.shard_pids.remote())["shard-0"] != pids["shard-0"]
    hits = client.search("d", xq, k=10)
    assert hits.coverage == 1.0
    alive = np.arange(2, 3000)
    _, I = exact_knn("l2", xb[alive], xq, 10)
    assert hits.ids == [[str(alive[i]) for i in row] for row in I]
    assert client.describe_collection("d").count == 2998


def test_full_restart_brings_everything_back(ray_cluster_factory, tmp_path):
    data = tmp_path / "restart"
    first = ray_cluster_factory(2, data_dir=data)
    xb, xq = make_data("cosine", 2000, 16, seed=2)
    first.client.create_collection("r", dim=16, metric="cosine", index="HNSW16", buckets=16)
    first.client.upsert("r", [str(i) for i in range(2000)], xb,
                        payloads=[{"uri": f"img/{i}.jpg"} for i in range(2000)])
    first.client.delete("r", ["5"])
    before = first.client.search("r", xq, k=5, ef_search=128)
    first.stop()
    second = ray_cluster_factory(3, data_dir=data)  # storage holds a 2-shard cluster: it is kept
    assert [c.spec.name for c in second.client.list_collections()] == ["r"]
    assert len(second.client.status().shards) == 2
    after = second.client.search("r", xq, k=5, ef_search=128)
    assert after.ids == before.ids
    ids, _, payloads = second.client.get("r", ["5", "6"], include_vectors=False)
    assert ids == ["6"] and payloads == [{"uri": "img/6.jpg"}]
    assert second.client.describe_collection("r").count == 1999


def test_controller_restart_finds_its_shards(ray_cluster_factory):
    import ray

    cluster = ray_cluster_factory(2)
    xb, xq = make_data("l2", 1000, 8, seed=1)
    cluster.client.create_collection("c", dim=8, buckets=16)
    cluster.client.upsert("c", [str(i) for i in range(1000)], xb)
    epoch = cluster.control.epoch()
    controller_pid = ray.get(cluster.handle.pid.remote())
    os.kill(controller_pid, signal.SIGKILL)
    # Ray restarts the controller; it reads cluster.json, finds the running shards and learns their addresses
    assert _wait(lambda: _epoch_after(cluster, epoch) and all(s.address for s in cluster.control.shards()))
    cluster.router.invalidate()
    _, I = exact_knn("l2", xb, xq, 5)
    assert cluster.client.search("c", xq, k=5).ids == [[str(i) for i in row] for row in I]


def _epoch_after(cluster, epoch):
    try:
        return cluster.control.epoch() > epoch
    except Exception:
        return False


def test_encoder_actor_pool(ray_session, tmp_path):
    from control.local import LocalCluster
    from control.ray_encoders import RayEncoderPool
    from lookalike.client import Client
    from router.core import Router
    from router.encoding import LocalEncoderPool
    from router.server import create_router_server
    from test_encoder import picture, to_bytes

    pool = RayEncoderPool(2, num_gpus=0, num_cpus=0.5)
    try:
        images = [to_bytes(picture(i)) for i in range(4)] + [b"junk"]
        vecs, reasons = pool.encode_many("phash", images)
        want, want_reasons = LocalEncoderPool().encode_many("phash", images)
        np.testing.assert_array_equal(vecs, want)
        assert reasons == want_reasons and "not an image" in reasons[-1]
        with pytest.raises(ValueError, match="unknown encoder"):
            pool.encode_many("nope", images[:1])
        # the router encodes through the pool
        cluster = LocalCluster(tmp_path, shards=1)
        router = Router(cluster.controller, encoders=pool)
        server, port, _ = create_router_server(router, "127.0.0.1:0")
        client = Client(f"127.0.0.1:{port}")
        try:
            client.create_collection("imgs", encoder="phash", buckets=8)
            assert client.upsert_images("imgs", [(f"p{i}", images[i]) for i in range(4)]) == (4, [])
            assert client.search_by_image("imgs", [images[2]], k=1).ids == [["p2"]]
        finally:
            client.close()
            server.stop(None)
            router.close()
            cluster.close()
    finally:
        pool.close()


def test_a_graceful_stop_checkpoints_and_the_restart_loads_the_indexes_without_rebuilding(ray_cluster_factory,
                                                                                           tmp_path):
    """Stopping the cluster closes every shard first (each collection writes its index checkpoint); the next
    start on the same storage loads them and replays nothing."""
    data = tmp_path / "ckpt"
    cluster = ray_cluster_factory(2, data_dir=data)
    xb, xq = make_data("l2", 3000, 16, seed=21)
    cluster.client.create_collection("h", dim=16, metric="l2", index="HNSW16", buckets=8)
    cluster.client.upsert("h", [str(i) for i in range(3000)], xb)
    before = cluster.client.search("h", xq, k=5, ef_search=64)
    cluster.stop()
    again = ray_cluster_factory(2, data_dir=data)
    assert wait_for(lambda: all(st is not None and st.serving for _, st in again.router.shard_stats()), 60)
    stats = [c for _, st in again.router.shard_stats() for c in st.collections if c.name == "h"]
    assert len(stats) == 2 and all(c.loaded_from_checkpoint and c.replayed_records == 0 for c in stats), stats
    assert again.client.search("h", xq, k=5, ef_search=64).ids == before.ids


@pytest.mark.parametrize("cpus", [0.5, 1, 3])
def test_a_shard_searches_with_as_many_faiss_threads_as_its_ray_cpus(cpus):
    """OpenMP's thread count set in one thread does not carry to others: a shard's gRPC threads, which run the
    searches, would use every core of the node beside the other shards. The actor's environment sets it for all."""
    import subprocess
    import sys

    from lookalike.config import ClusterConfig
    from control.ray_placer import RayPlacer

    env_vars = RayPlacer(ClusterConfig(shard_num_cpus=cpus), 1 << 20, cluster_gpus=0).actor_options("shard-0")[
        "runtime_env"]["env_vars"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = ("import threading, faiss\n"
            "out = []\n"
            "t = threading.Thread(target=lambda: out.append(faiss.omp_get_max_threads())); t.start(); t.join()\n"
            "print(out[0])")
    got = subprocess.run([sys.executable, "-c", code], env={**env, **env_vars}, capture_output=True, text=True,
                         check=True).stdout
    assert int(got) == max(1, int(cpus))


def test_shards_sharing_processes_answer_exactly_and_come_back_together_after_a_kill_9(ray_cluster_factory):
    import ray

    cluster = ray_cluster_factory(4, per_process=2)
    client = cluster.client
    xb, xq = make_data("l2", 3000, 16, seed=12)
    client.create_collection("h", dim=16, metric="l2", buckets=32)
    client.upsert("h", [str(i) for i in range(2000)], xb[:2000])
    pids = ray.get(cluster.handle.shard_pids.remote())
    # shard-0 and shard-2 share process 0, shard-1 and shard-3 process 1: two processes, two addresses
    assert pids["shard-0"] == pids["shard-2"] != pids["shard-1"] == pids["shard-3"]
    # a process of several shards allocates with the jemalloc Ray ships (shard.osutil.host_process_env)
    jemalloc = bundled_jemalloc()
    assert jemalloc and all(jemalloc in open(f"/proc/{p}/maps").read() for p in set(pids.values()))
    status = client.status()
    assert len({s.address for s in status.shards}) == 2 and all(s.serving for s in status.shards)
    # each shard reports its part of its process's memory: the parts add up to the processes
    rss = sum(psutil.Process(p).memory_info().rss for p in set(pids.values()))
    assert 0.8 * rss < sum(s.memory_bytes for s in status.shards) < 1.2 * rss
    _, I = exact_knn("l2", xb[:2000], xq, 10)
    assert client.search("h", xq, k=10).ids == [[str(i) for i in row] for row in I]
    os.kill(pids["shard-1"], signal.SIGKILL)
    # writes during the restart wait for its two shards to come back (the router retries until the deadline)
    client.upsert("h", [str(i) for i in range(2000, 3000)], xb[2000:3000])
    assert _wait(lambda: all(s.serving for s in client.status().shards))
    after = ray.get(cluster.handle.shard_pids.remote())
    assert after["shard-1"] == after["shard-3"] != pids["shard-1"] and after["shard-0"] == pids["shard-0"]
    hits = client.search("h", xq, k=10)
    _, I = exact_knn("l2", xb, xq, 10)
    assert hits.coverage == 1.0 and hits.ids == [[str(i) for i in row] for row in I]
    assert client.describe_collection("h").count == 3000
