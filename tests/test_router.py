"""Router over real gRPC shards in this process (no Ray): sharded answers equal one exact index, writes,
and every bad input gets its status code while the server keeps serving."""

import asyncio
import threading

import grpc
import numpy as np
import pytest

from conftest import assert_same_as_exact, exact_knn, make_data, served_local_cluster
from control.local import LocalCluster
from lookalike.wire import vectors_to_proto
from protos import lookalike_pb2

METRICS = ["l2", "ip", "cosine", "hamming"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_local_cluster(tmp_path_factory.mktemp("router"), shards=3, timeout=30) as served:
        yield served


@pytest.mark.parametrize("transport", ["inprocess", "grpc"])
@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("metric", METRICS)
def test_sharded_equals_exact(tmp_path, transport, shards, metric):
    dim = 64 if metric == "hamming" else 24
    xb, xq = make_data(metric, 3000, dim, seed=shards)
    cluster = LocalCluster(tmp_path, shards=shards, transport=transport)
    try:
        from lookalike.config import CollectionConfig
        cluster.router.create_collection(CollectionConfig("c", dim, metric, buckets=64))
        cluster.router.upsert("c", [str(i) for i in range(len(xb))], xb)
        res = cluster.router.search("c", xq, 10)
        assert res.coverage == 1.0
        assert_same_as_exact(metric, res.ids, res.D, xb, xq, 10)
        # the event-loop driver (what the public server runs) gives the same answer
        res_async = asyncio.run(cluster.router.search_async("c", xq, 10))
        assert res_async.coverage == 1.0 and np.array_equal(res_async.D, res.D)
        assert_same_as_exact(metric, res_async.ids, res_async.D, xb, xq, 10)  # ties (hamming) in any order
    finally:
        cluster.close()


def test_upsert_replaces_delete_removes_get_returns(served):
    _, client = served
    client.create_collection("items", dim=8, metric="l2", buckets=16)
    x = np.eye(8, dtype=np.float32)
    client.upsert("items", ["a", "b", "c"], x[:3], payloads=[{"uri": "a.jpg"}, {"uri": "b.jpg"}, {}])
    client.upsert("items", ["a"], x[5:6], payloads=[{"uri": "a2.jpg"}])  # replace vector and payload
    ids, vecs, payloads = client.get("items", ["a", "zz", "b"])
    assert ids == ["a", "b"]
    np.testing.assert_array_equal(vecs, x[[5, 1]])
    assert payloads == [{"uri": "a2.jpg"}, {"uri": "b.jpg"}]
    hits = client.search("items", x[5:6], k=3, include_payloads=True)
    assert hits.ids[0][0] == "a" and hits.D[0, 0] == 0 and hits.payloads[0][0] == {"uri": "a2.jpg"}
    assert client.delete("items", ["b", "nope"]) == (1, 1)
    hits = client.search("items", x[1:2], k=5)
    assert "b" not in hits.ids[0] and len(hits.ids[0]) == 2  # fewer items than k: shorter answer
    assert client.describe_collection("items").count == 2
    client.drop_collection("items")
    assert "items" not in [c.spec.name for c in client.list_collections()]


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_bad_input_gets_clear_status(served):
    _, client = served
    client.create_collection("bad", dim=4, metric="l2", buckets=8)
    client.create_collection("bits", dim=64, metric="hamming", buckets=8)
    client.create_collection("cos", dim=4, metric="cosine", buckets=8)
    client.upsert("bad", ["keep"], np.ones((1, 4), np.float32))
    q = np.zeros((1, 4), np.float32)
    IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = {
        "wrong dimension": (lambda: client.upsert("bad", ["x"], np.ones((1, 5), np.float32)), IA, "dimension 4"),
        "wrong query dimension": (lambda: client.search("bad", np.ones((1, 3), np.float32)), IA, "dimension"),
        "NaN": (lambda: client.upsert("bad", ["x"], np.array([[1, np.nan, 0, 0]], np.float32)), IA, "NaN"),
        "Inf query": (lambda: client.search("bad", np.array([[np.inf, 0, 0, 0]], np.float32)), IA, "Inf"),
        "k zero": (lambda: client.search("bad", q, k=0), IA, "k must be"),
        "k too big": (lambda: client.search("bad", q, k=5000), IA, "k must be"),
        "empty batch": (lambda: client.upsert("bad", [], np.zeros((0, 4), np.float32)), IA, "no ids"),
        "empty query batch": (lambda: client.search("bad", np.zeros((0, 4), np.float32)), IA, "no queries"),
        "ids vs vectors": (lambda: client.upsert("bad", ["x", "y"], np.ones((1, 4), np.float32)), IA, "one vector"),
        "unknown collection": (lambda: client.search("nope", q), NF, "does not exist"),
        "duplicate collection": (lambda: client.create_collection("bad", dim=4), grpc.StatusCode.ALREADY_EXISTS,
                                 "already exists"),
        "bad name": (lambda: client.create_collection("no spaces", dim=4), IA, "name"),
        "bad dim": (lambda: client.create_collection("z", dim=0), IA, "dim"),
        "empty id": (lambda: client.upsert("bad", [""], np.ones((1, 4), np.float32)), IA, "empty"),
        "long id": (lambda: client.upsert("bad", ["x" * 300], np.ones((1, 4), np.float32)), IA, "256 bytes"),
        "repeated id": (lambda: client.upsert("bad", ["x", "x"], np.ones((2, 4), np.float32)), IA, "more than once"),
        "big payload": (lambda: client.upsert("bad", ["x"], np.ones((1, 4), np.float32), [{"p": "y" * 20000}]),
                        IA, "payload"),
        "float into hamming": (lambda: client.upsert("bits", ["x"], np.ones((1, 8), np.float32)), IA, "UINT8"),
        "wrong code size": (lambda: client.upsert("bits", ["x"], np.ones((1, 4), np.uint8)), IA, "bits"),
        "zero cosine": (lambda: client.upsert("cos", ["x"], np.zeros((1, 4), np.float32)), IA, "zeros"),
        "min coverage": (lambda: client.search("bad", q, min_coverage=1.5), IA, "min_coverage"),
    }
    for name, (fn, code, words) in cases.items():
        got, details = _code(fn)
        assert got == code, f"{name}: {got} {details}"
        assert words in details, f"{name}: {details!r}"
    # malformed packed bytes, straight through the stub
    req = lookalike_pb2.SearchRequest(collection="bad", k=1)
    req.queries.CopyFrom(vectors_to_proto(q))
    req.queries.data = req.queries.data[:-3]
    got, details = _code(lambda: client.stub.Search(req))
    assert got == IA and "bytes" in details
    # a message over the size limit (64 MiB)
    big = np.zeros((17 * 1024 * 1024 // 4, 4), np.float32)
    got, _ = _code(lambda: client.upsert("bad", [str(i) for i in range(len(big))], big))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    # still serving, nothing acknowledged lost
    assert client.get("bad", ["keep"])[0] == ["keep"]
    assert client.search("bad", np.ones((1, 4), np.float32), k=1).ids == [["keep"]]


def test_dropped_collection_in_use(served):
    cluster, client = served
    client.create_collection("gone", dim=4, buckets=8)
    client.upsert("gone", ["a"], np.ones((1, 4), np.float32))
    stale_map = cluster.router.shard_map("gone")
    client.drop_collection("gone")
    # a router still holding the old map: the shards answer NOT_FOUND, not garbage
    cluster.router.shards._maps["gone"] = stale_map
    got, details = _code(lambda: client.search("gone", np.ones((1, 4), np.float32)))
    assert got == grpc.StatusCode.NOT_FOUND and "gone" in details
    cluster.router.invalidate("gone")
    got, _ = _code(lambda: client.upsert("gone", ["b"], np.ones((1, 4), np.float32)))
    assert got == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, client = served
    health = health_pb2_grpc.HealthStub(client._channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="lookalike.v1.Lookalike")).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(client._channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = [s.name for s in resp.list_services_response.service]
    assert "lookalike.v1.Lookalike" in names and "grpc.health.v1.Health" in names


def test_shard_down_reports_coverage(tmp_path):
    from lookalike.config import CollectionConfig
    from lookalike.errors import Unavailable

    cluster = LocalCluster(tmp_path, shards=2)
    try:
        xb, xq = make_data("l2", 1000, 8)
        cluster.router.create_collection(CollectionConfig("cov", 8, buckets=32))
        cluster.router.upsert("cov", [str(i) for i in range(1000)], xb)
        cluster.placer.stop_shard("shard-1")
        partial = cluster.router.search("cov", xq, 5, min_coverage=0.5)
        assert partial.coverage == 0.5
        from lookalike.ids import buckets_of
        owners = cluster.router.shard_map("cov").owners
        assert all(owners[b][0] == "shard-0" for ids in partial.ids for b in buckets_of(ids, 32).tolist())
        with pytest.raises(Unavailable, match="16 of 32 buckets"):
            cluster.router.search("cov", xq, 5)
        # the same through the event-loop driver, whose calls go over grpc.aio channels
        assert asyncio.run(cluster.router.search_async("cov", xq, 5, min_coverage=0.5)).ids == partial.ids
        with pytest.raises(Unavailable, match="16 of 32 buckets"):
            asyncio.run(cluster.router.search_async("cov", xq, 5))
        cluster.placer.ensure_shard("shard-1")  # back, reloaded from storage
        assert cluster.router.search("cov", xq, 5).coverage == 1.0
        assert cluster.router.count("cov") == 1000
    finally:
        cluster.close()


def test_shard_is_not_serving_until_loaded(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lookalike.net import create_channel, set_serving
    from protos import shard_pb2, shard_pb2_grpc
    from shard.shard import Shard
    from shard.server import SERVICE_NAME, create_shard_server

    shard = Shard("s", tmp_path)
    server, port, _, health = create_shard_server(shard, "127.0.0.1:0")
    try:
        with create_channel(f"127.0.0.1:{port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            assert check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                shard_pb2_grpc.ShardStub(ch).Search(shard_pb2.ShardSearchRequest(collection="c", k=1))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            shard.serving = True
            set_serving(health, [SERVICE_NAME])
            assert check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


def test_stream_error_keeps_the_batches_before_it(served):
    _, client = served
    client.create_collection("stream", dim=4, buckets=8)
    good = np.ones((10, 4), np.float32)
    batches = [([f"a{i}" for i in range(10)], good), ([f"b{i}" for i in range(10)], good),
               (["bad"], np.array([[np.nan, 0, 0, 0]], np.float32)), ([f"c{i}" for i in range(10)], good)]
    got, details = _code(lambda: client.upsert_stream("stream", iter(batches)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in details
    ids, _, _ = client.get("stream", ["a0", "b9", "bad", "c0"], include_vectors=False)
    assert ids == ["a0", "b9"]


def test_searches_run_during_writes_and_training(tmp_path):
    """Readers never see an error or a half-applied write while writers upsert, delete and the IVF trains."""
    import threading

    from lookalike.config import CollectionConfig

    cluster = LocalCluster(tmp_path, shards=2, transport="inprocess")
    try:
        xb, xq = make_data("l2", 6000, 16, seed=4)
        cluster.router.create_collection(CollectionConfig("live", 16, index="IVF16,Flat", nprobe=16, buckets=16))
        errors, stop = [], threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    res = cluster.router.search("live", xq[:5], 5)
                    assert all(len(set(ids)) == len(ids) for ids in res.ids)
                except Exception as err:  # collected, the test fails below
                    errors.append(err)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(0, 6000, 500):  # the collection passes 1000 vectors: training happens meanwhile
            cluster.router.upsert("live", [str(j) for j in range(i, i + 500)], xb[i:i + 500])
            cluster.router.delete("live", [str(j) for j in range(i, i + 50)])
        assert cluster.controller._wait_trained("live", 30)  # the readers go on while the shards move into it
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert all(c.trained for _, st in cluster.router.shard_stats() for c in st.collections)
        alive = np.array([j for j in range(6000) if j % 500 >= 50])
        res = cluster.router.search("live", xq, 10)  # nprobe == nlist: exact
        _, I = exact_knn("l2", xb[alive], xq, 10)
        assert res.ids == [[str(alive[i]) for i in row] for row in I]
    finally:
        cluster.close()


def test_search_follows_a_restarted_shard_to_its_new_address(tmp_path):
    from lookalike.config import CollectionConfig

    cluster = LocalCluster(tmp_path, shards=2, refresh_interval=3600)  # the router will not notice by itself
    try:
        xb, xq = make_data("l2", 500, 8)
        cluster.router.create_collection(CollectionConfig("c", 8, buckets=16))
        cluster.router.upsert("c", [str(i) for i in range(500)], xb)
        stale = cluster.router.shard_map("c")
        cluster.placer.stop_shard("shard-1")
        cluster.placer.ensure_shard("shard-1")  # back from storage, on another port
        assert cluster.controller.shard_map("c").shards["shard-1"].address != stale.shards["shard-1"].address
        res = cluster.router.search("c", xq, 5)  # asks the old address, fails, re-reads the map, asks the new one
        assert res.coverage == 1.0
        _, I = exact_knn("l2", xb, xq, 5)
        assert res.ids == [[str(i) for i in row] for row in I]
    finally:
        cluster.close()


def test_async_searches_from_two_event_loops_at_once(tmp_path):
    """Each event loop gets its own asyncio channel to a shard (an aio channel belongs to one loop): two loops
    searching concurrently both get exact answers, each shard client holds a channel per loop, and closing the
    router lets go of them."""
    from lookalike.config import CollectionConfig

    cluster = LocalCluster(tmp_path, shards=2)
    try:
        xb, xq = make_data("l2", 2000, 16, seed=5)
        cluster.router.create_collection(CollectionConfig("two", 16, buckets=32))
        cluster.router.upsert("two", [str(i) for i in range(len(xb))], xb)
        want = cluster.router.search("two", xq, 10)
        got, errors = {}, []
        both_searching = threading.Barrier(2, timeout=30)

        def worker(n: int) -> None:
            async def many():
                first = await cluster.router.search_async("two", xq, 10)
                # both loops hold their channels before either finishes
                await asyncio.get_running_loop().run_in_executor(None, both_searching.wait)
                return [first] + [await cluster.router.search_async("two", xq, 10) for _ in range(19)]
            try:
                got[n] = asyncio.run(many())
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert all(r.ids == want.ids for n in range(2) for r in got[n])
        clients = list(cluster.router.shards._clients.values())
        assert len(clients) == 2 and all(len(c._aio) == 2 for c in clients)  # a channel per shard and loop
    finally:
        cluster.close()
    assert all(not c._aio for c in clients)
