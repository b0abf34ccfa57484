"""What the status and listing calls report (counts, epochs, per-collection buckets), the start-up log of a
restarted cluster, and the request fields that name a collection (`collection`, and the deprecated `name`)."""

import logging

import grpc
import pytest

from conftest import make_data, served_local_cluster
from protos import lookalike_pb2

SIZES = {"small": (300, 16), "big": (1200, 32)}  # collection -> (items, buckets)


def _fill(client, dim=8):
    for name, (n, buckets) in SIZES.items():
        client.create_collection(name, dim=dim, metric="l2", buckets=buckets)
        xb, _ = make_data("l2", n, dim, seed=n)
        client.upsert(name, [f"{name}-{i}" for i in range(n)], xb)


def _check_counts(client):
    """ListCollections, ClusterStatus and DescribeCollection agree on every collection's count and epoch."""
    described = {name: client.describe_collection(name) for name in SIZES}
    listed = {c.spec.name: c for c in client.list_collections()}
    status = client.status()
    in_status = {c.spec.name: c for c in status.collections}
    for name, (n, buckets) in SIZES.items():
        assert described[name].count == n
        assert listed[name].count == n, f"ListCollections counts {listed[name].count} items of {name}, not {n}"
        assert in_status[name].count == n, f"ClusterStatus counts {in_status[name].count} items of {name}, not {n}"
        assert listed[name].epoch > 0 and in_status[name].epoch > 0
        assert in_status[name].training.message  # still filled in, from one controller call
        # bucket counts are per collection: the shards' shares of one collection add up to its buckets
        assert sum(c.buckets for s in status.shards for c in s.collections if c.collection == name) == buckets
        assert sum(c.vectors for s in status.shards for c in s.collections if c.collection == name) == n
    for s in status.shards:
        assert [c.collection for c in s.collections] == list(SIZES)
        assert s.buckets == 0 and s.joining == 0  # deprecated: not a sum over collections of different buckets
        assert s.vectors == sum(c.vectors for c in s.collections)
    return status


class _CountingClient:
    """A shard client that counts the Stats calls it makes (see test_one_fan_out_whatever_the_collections)."""

    calls: list = []

    def __init__(self, address):
        from router.shard_client import GrpcShardClient

        self._inner = GrpcShardClient(address)

    def call(self, method, request, timeout, shard=""):
        if method == "Stats":
            self.calls.append(method)
        return self._inner.call(method, request, timeout, shard)

    async def acall(self, method, request, timeout, shard=""):
        return await self._inner.acall(method, request, timeout, shard)

    def close(self):
        self._inner.close()


def test_list_and_status_count_like_describe_with_one_fan_out(tmp_path):
    from lookalike.config import CollectionConfig
    from control.local import LocalCluster
    from lookalike.client import Client
    from router.core import Router
    from router.server import create_router_server

    cluster = LocalCluster(tmp_path, shards=3)
    router = Router(cluster.controller, _CountingClient, refresh_interval=0.1)
    server, port, _ = create_router_server(router, "127.0.0.1:0")
    client = Client(f"127.0.0.1:{port}", timeout=30)
    try:
        _fill(client)
        _check_counts(client)
        for i in range(6):  # more collections than shards: still one Stats call per shard
            router.create_collection(CollectionConfig(f"empty{i}", 8, "l2", buckets=4))
        _CountingClient.calls.clear()
        listed = client.list_collections()
        assert len(_CountingClient.calls) == 3, "ListCollections asks each shard once, not once per collection"
        assert {c.spec.name: c.count for c in listed} == {**{n: s[0] for n, s in SIZES.items()},
                                                          **{f"empty{i}": 0 for i in range(6)}}
        _CountingClient.calls.clear()
        client.status()
        assert len(_CountingClient.calls) == 3, "ClusterStatus asks each shard once, not once per collection"
    finally:
        client.close()
        server.stop(None)
        router.close()
        cluster.close()


def test_request_field_collection_and_deprecated_name(tmp_path):
    with served_local_cluster(tmp_path, shards=2) as (_, client):
        _fill(client)
        L, stub = lookalike_pb2, client.stub
        assert stub.DescribeCollection(L.DescribeCollectionRequest(collection="small")).count == 300
        assert stub.DescribeCollection(L.DescribeCollectionRequest(name="small")).count == 300  # still accepted
        assert stub.DescribeCollection(L.DescribeCollectionRequest(collection="big", name="big")).count == 1200
        for call in [lambda: stub.DescribeCollection(L.DescribeCollectionRequest(collection="small", name="big")),
                     lambda: stub.DropCollection(L.DropCollectionRequest(collection="small", name="big")),
                     lambda: stub.Rebalance(L.RebalanceRequest(collection="small", name="big"))]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "two collections" in err.value.details() and "deprecated" in err.value.details()
        for call in [lambda: stub.DescribeCollection(L.DescribeCollectionRequest()),
                     lambda: stub.DropCollection(L.DropCollectionRequest())]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "the request names no collection"
        with pytest.raises(grpc.RpcError) as err:
            stub.Rebalance(L.RebalanceRequest(collection="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Rebalance(L.RebalanceRequest(collection="small")).shards == 2
        assert {c.spec.name for c in client.list_collections()} == {"small", "big"}  # nothing dropped above
        stub.DropCollection(L.DropCollectionRequest(collection="small"))
        stub.DropCollection(L.DropCollectionRequest(name="big"))
        assert client.list_collections() == []


def test_python_client_sends_the_collection_field(tmp_path):
    """lookalike.client.Client names the collection in `collection`, never in the deprecated `name`."""
    from lookalike.client import Client

    sent = []

    class Recorder(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            sent.append(request)
            return continuation(details, request)

    with served_local_cluster(tmp_path, shards=1) as (_, plain):
        client = Client(plain.target, timeout=30)
        client.stub = type(client.stub)(grpc.intercept_channel(client._channel, Recorder()))
        client.create_collection("c", dim=4, buckets=4)
        client.describe_collection("c")
        client.rebalance("c")
        client.drop_collection("c")
        client.close()
    named = [r for r in sent if hasattr(r, "name")]
    assert [type(r).__name__ for r in named] == ["DescribeCollectionRequest", "RebalanceRequest",
                                                  "DropCollectionRequest"]
    assert all(r.collection == "c" and not r.name for r in named)


@pytest.mark.slow
def test_ray_cluster_status_counts_and_restart_log(ray_cluster_factory, tmp_path, caplog):
    """On Ray: the counts of `lookalike status --json` (ClusterStatus) and of ListCollections are the real ones;
    a restart on storage holding more shards than asked for logs the shards it really starts."""
    data = tmp_path / "restart"
    first = ray_cluster_factory(3, data_dir=data)
    _fill(first.client)
    _check_counts(first.client)
    first.stop()
    with caplog.at_level(logging.INFO, logger="control.ray_cluster"):
        second = ray_cluster_factory(2, data_dir=data)
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting")]
    assert started == [f"starting the 3 shards of the cluster in storage {data} (not the 2 asked for: that number "
                       "only applies to new storage; `lookalike rebalance NAME --add-shards N` adds shards)"]
    status = _check_counts(second.client)
    assert len(status.shards) == 3


def test_startup_message_and_shards_phrase():
    from control.ray_cluster import shards_phrase, startup_message
    from lookalike.shardmap import ShardInfo

    assert shards_phrase(1) == "1 shard" and shards_phrase(3) == "3 shards"
    assert shards_phrase([ShardInfo("a", serving=True)]) == "1 shard"
    assert shards_phrase([ShardInfo("a", serving=True), ShardInfo("b")]) == "2 shards (1 not serving yet)"
    assert startup_message(2, 2, 0, "/d") == "starting 2 shards on new storage /d"
    assert startup_message(1, 1, 1, "/d") == "starting the 1 shard of the cluster in storage /d"
    assert startup_message(3, 2, 3, "/d").startswith("starting the 3 shards of the cluster in storage /d (not the 2")
