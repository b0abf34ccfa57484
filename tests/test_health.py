"""Health that tells the truth, deadlines and isolation (docs/OPERATIONS.md, "Health, deadlines and concurrency
bounds"): the router's health follows its control plane while cached maps keep searches answered, nothing blocks
the router's event loop on the control plane, shards report their storage and collections, refuse calls whose
caller is gone, keep threads for searches while writes are held up, and servers bound their concurrent calls."""

import collections
import concurrent.futures
import os
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import wait_for
from control.local import LocalCluster
from lookalike.client import Client
from lookalike.config import CollectionConfig
from lookalike.health import LIVENESS
from lookalike.net import create_channel
from lookalike.wire import vectors_to_proto
from protos import shard_pb2, shard_pb2_grpc
from router.core import Router
from router.server import SERVICE_NAME, create_router_server
from router.shard_client import GrpcShardClient
from router.search import answer_ids
from shard.server import SERVICE_NAME as SHARD_SERVICE, create_shard_server
from shard.shard import Shard

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST_CHECKS = {"interval_s": 0.05, "timeout_s": 0.3}


class StoppableControl:
    """A control plane whose calls block while ``answering`` is clear: the controller stops answering (a hung Ray
    GCS, a partition). ``blocked`` counts the calls waiting now, ``waiting`` them by method."""

    def __init__(self, inner):
        self._inner = inner
        self.answering = threading.Event()
        self.answering.set()
        self.blocked = 0
        self.waiting = collections.Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name):
        method = getattr(self._inner, name)

        def call(*args, **kw):
            with self._lock:
                self.blocked += 1
                self.waiting[name] += 1
            try:
                self.answering.wait()
            finally:
                with self._lock:
                    self.blocked -= 1
                    self.waiting[name] -= 1
            return method(*args, **kw)

        return call


def _status(channel, service: str = ""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                      timeout=5).status


@pytest.fixture
def stoppable(tmp_path, request):
    """(cluster, control, client, server): a router over a LocalCluster's shards whose control plane can stop;
    indirect parameter: the router's max_concurrent_rpcs."""
    cluster = LocalCluster(tmp_path, shards=2)
    control = StoppableControl(cluster.controller)
    router = Router(control, GrpcShardClient, refresh_interval=0.05)
    server, port, _ = create_router_server(router, "127.0.0.1:0", health_check=FAST_CHECKS,
                                           max_concurrent_rpcs=getattr(request, "param", 1000))
    client = Client(f"127.0.0.1:{port}", timeout=30)
    try:
        yield cluster, control, client, server
    finally:
        control.answering.set()
        client.close()
        server.stop(None).wait(10)
        router.close()
        cluster.close()


def test_router_not_serving_while_the_control_plane_is_gone_and_cached_searches_answer(stoppable):
    cluster, control, client, _server = stoppable
    xb = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    client.create_collection("c", dim=8, buckets=16)
    client.upsert("c", [str(i) for i in range(len(xb))], xb)
    assert client.search("c", xb[:3], k=1).ids == [["0"], ["1"], ["2"]]  # the map is cached now
    ch = client._channel
    assert _status(ch) == SERVING and _status(ch, SERVICE_NAME) == SERVING and _status(ch, LIVENESS) == SERVING

    control.answering.clear()  # the control plane stops answering
    assert wait_for(lambda: _status(ch) == NOT_SERVING, timeout=10), "health still SERVING without a control plane"
    assert _status(ch, SERVICE_NAME) == NOT_SERVING
    assert _status(ch, LIVENESS) == SERVING  # liveness: do not restart a router that only waits
    # Searches of the cached collection are answered while calls to the control plane hang.
    for _ in range(3):
        assert client.search("c", xb[5:6], k=1, timeout=10).ids == [["5"]]
        assert control.blocked > 0, "the control plane was answering: the test proves nothing"

    control.answering.set()
    assert wait_for(lambda: _status(ch) == SERVING, timeout=10), "health did not come back with the control plane"
    assert _status(ch, SERVICE_NAME) == SERVING


def test_a_map_fetched_from_a_hung_control_plane_does_not_block_other_searches(stoppable):
    cluster, control, client, _server = stoppable
    xb = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
    for name in ("cached", "uncached"):
        client.create_collection(name, dim=8, buckets=8)
        client.upsert(name, [str(i) for i in range(len(xb))], xb)
        client.search(name, xb[:1], k=1)
    control.answering.clear()
    cluster_router = _server.servicer.router
    cluster_router.invalidate("uncached")  # its next search asks the (hung) control plane for its map

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(client.search, "uncached", xb[:1], 1, timeout=30)
        describing = pool.submit(client.describe_collection, "uncached")  # a plain handler, on the server's threads
        assert wait_for(lambda: control.waiting["shard_map"] >= 2, timeout=10)
        # The router's event loop is free: a search of the cached collection is answered meanwhile.
        for _ in range(3):
            assert client.search("cached", xb[7:8], k=1, timeout=10).ids == [["7"]]
        assert not waiting.done() and not describing.done(), "answered without the map"
        control.answering.set()
        assert waiting.result(timeout=30).ids == [["0"]]
        assert describing.result(timeout=30).count == len(xb)


def test_a_shard_down_while_the_control_plane_is_away_gives_partial_answers_in_time(stoppable):
    cluster, control, client, server = stoppable
    xb = np.random.default_rng(3).standard_normal((400, 8)).astype(np.float32)
    client.create_collection("p", dim=8, buckets=16)
    client.upsert("p", [str(i) for i in range(len(xb))], xb)
    assert client.search("p", xb[:1], k=1).coverage == 1.0
    control.answering.clear()
    # shard-1 stops without the controller's knowing (it is not answering anyway): the cached map still names it
    cluster.placer.servers["shard-1"][0].stop(None)
    for _ in range(2):  # and the map stays cached for the next search
        hits = client.search("p", xb[:1], k=1, min_coverage=0.5, timeout=3)
        assert hits.coverage == 0.5
        assert control.waiting["shard_map"] >= 1, "the control plane was answering: the test proves nothing"
    with pytest.raises(grpc.RpcError) as err:  # full coverage cannot be had: said within the deadline
        client.search("p", xb[:1], k=1, timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "coverage 0.500" in err.value.details()


@pytest.mark.parametrize("stoppable", [2], indirect=True)
def test_the_router_bounds_its_concurrent_calls(stoppable):
    cluster, control, client, _server = stoppable
    control.answering.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # two calls held up by the control plane (DescribeCollection asks it for a map it has not cached)
        held = [pool.submit(client.describe_collection, f"c{i}") for i in range(2)]
        assert wait_for(lambda: control.waiting["shard_map"] == 2, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            client.list_collections()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        control.answering.set()
        for h in held:
            with pytest.raises(grpc.RpcError) as err:  # no such collections: answered once the control plane is back
                h.result(timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _shard_with_collection(root, name="c", n=100, dim=4, **server_kw):
    shard = Shard("s0", root)
    cfg = CollectionConfig(name, dim, "l2", buckets=4)
    shard.open_collection(cfg, range(4))
    x = np.random.default_rng(2).standard_normal((n, dim)).astype(np.float32)
    shard.collection(name).upsert([str(i) for i in range(n)], x, [None] * n)
    shard.serving = True
    server, port, servicer, health = create_shard_server(shard, "127.0.0.1:0", health_check=FAST_CHECKS,
                                                         **server_kw)
    return shard, server, port, servicer, x


def _search_request(x, name="c", k=1):
    req = shard_pb2.ShardSearchRequest(collection=name, k=k)
    req.queries.CopyFrom(vectors_to_proto(x))
    return req


def _upsert_request(i, dim=4, name="c"):
    req = shard_pb2.ShardUpsertRequest(collection=name, ids=[f"w{i}"])
    req.vectors.CopyFrom(vectors_to_proto(np.ones((1, dim), np.float32)))
    return req


def test_held_up_writes_leave_threads_to_searches(tmp_path):
    shard, server, port, servicer, x = _shard_with_collection(tmp_path, max_workers=4)
    sc = shard.collection("c")
    release = threading.Event()
    appending = threading.Event()
    append = sc.store.append

    def slow_append(*args, **kw):  # a storage whose fsync hangs
        appending.set()
        release.wait()
        return append(*args, **kw)

    sc.store.append = slow_append
    try:
        with create_channel(f"127.0.0.1:{port}") as ch:
            stub = shard_pb2_grpc.ShardStub(ch)
            writes = [stub.Upsert.future(_upsert_request(i), timeout=60) for i in range(8)]
            assert appending.wait(10)
            # More writes than the gate holds: those beyond it are refused at once, with a sentence.
            assert wait_for(lambda: sum(w.done() for w in writes) >= 8 - 3, timeout=10)
            refused = [w for w in writes if w.done()]
            assert all(w.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry with backoff" in w.details()
                       for w in refused)
            # The shard answers searches while the held-up writes still wait.
            for q in range(3):
                resp = stub.Search(_search_request(x[q:q + 1]), timeout=10)
                assert answer_ids(resp) == [str(q)]
            assert not release.is_set() and sum(not w.done() for w in writes) == 3
            release.set()
            assert all(w.result(timeout=30).count == 1 for w in writes if w not in refused)
    finally:
        release.set()
        servicer.health_checker.stop()
        server.stop(None)
        shard.close()


class _Context:
    """A servicer context whose caller is gone, or whose deadline passed."""

    def __init__(self, active=True, remaining=None):
        self._active, self._remaining = active, remaining
        self.aborted = None

    def is_active(self):
        return self._active

    def time_remaining(self):
        return self._remaining

    def abort(self, code, details):
        self.aborted = (code, details)
        raise grpc.RpcError(details)


@pytest.mark.parametrize("context, code", [(_Context(remaining=0.0), grpc.StatusCode.DEADLINE_EXCEEDED),
                                           (_Context(active=False), grpc.StatusCode.CANCELLED)])
def test_shard_runs_no_search_or_write_whose_caller_is_gone(tmp_path, context, code):
    shard, server, _port, servicer, x = _shard_with_collection(tmp_path)
    sc = shard.collection("c")
    ran = []
    search, upsert = sc.search, sc.upsert
    sc.search = lambda *a, **kw: ran.append("search") or search(*a, **kw)
    sc.upsert = lambda *a, **kw: ran.append("upsert") or upsert(*a, **kw)
    try:
        for method, req in (("Search", _search_request(x[:1])), ("Upsert", _upsert_request(0))):
            with pytest.raises(grpc.RpcError):
                getattr(servicer, method)(req, context)
            assert context.aborted[0] == code and "was not run" in context.aborted[1]
        assert ran == [] and len(sc.table) == len(x)
    finally:
        servicer.health_checker.stop()
        server.stop(None)
        shard.close()


def test_servers_bound_their_concurrent_calls(tmp_path):
    shard, server, port, servicer, x = _shard_with_collection(tmp_path, max_workers=8, max_concurrent_rpcs=2)
    sc = shard.collection("c")
    release, entered = threading.Event(), threading.Semaphore(0)
    search = sc.search

    def held(*args, **kw):
        entered.release()
        release.wait(30)
        return search(*args, **kw)

    sc.search = held
    try:
        with create_channel(f"127.0.0.1:{port}") as ch:
            stub = shard_pb2_grpc.ShardStub(ch)
            running = [stub.Search.future(_search_request(x[:1]), timeout=60) for _ in range(2)]
            assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stub.Search(_search_request(x[:1]), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert all(answer_ids(r.result(timeout=10)) == ["0"] for r in running)
    finally:
        release.set()
        servicer.health_checker.stop()
        server.stop(None)
        shard.close()


def test_shard_health_reports_failing_storage_and_quarantined_collections(tmp_path):
    shard, server, port, servicer, _x = _shard_with_collection(tmp_path)
    probe_file = shard.root / ".health-probe"
    try:
        with create_channel(f"127.0.0.1:{port}") as ch:
            assert wait_for(lambda: _status(ch) == SERVING, timeout=10)
            assert _status(ch, f"{SHARD_SERVICE}/c") == SERVING
            # Its storage stops taking durable writes (here: the probe's file cannot be opened for writing).
            os.replace(probe_file, tmp_path / "aside") if probe_file.exists() else None
            probe_file.mkdir()
            assert wait_for(lambda: _status(ch) == NOT_SERVING, timeout=10)
            assert _status(ch, SHARD_SERVICE) == NOT_SERVING and _status(ch, LIVENESS) == SERVING
            assert "fails a durable write" in servicer.health_checker.problem
            probe_file.rmdir()
            assert wait_for(lambda: _status(ch) == SERVING, timeout=10)
            # A collection it cannot serve is reported under its own name; the shard serves the others.
            shard._quarantine("c", "a test says so")
            assert wait_for(lambda: _status(ch, f"{SHARD_SERVICE}/c") == NOT_SERVING, timeout=10)
            assert _status(ch) == SERVING
    finally:
        servicer.health_checker.stop()
        server.stop(None)
        shard.close()


def test_shard_calls_without_a_deadline_get_the_default(tmp_path, monkeypatch):
    import router.shard_client as shard_client
    from lookalike.config import RpcPolicy
    from lookalike.errors import DeadlineExceeded

    shard, server, port, servicer, x = _shard_with_collection(tmp_path)
    release = threading.Event()
    search = shard.collection("c").search
    shard.collection("c").search = lambda *a, **kw: release.wait(30) and search(*a, **kw)
    monkeypatch.setattr(shard_client, "RPC", RpcPolicy(default_deadline_s=0.5))
    client = GrpcShardClient(f"127.0.0.1:{port}")
    try:
        fut = client.call("Search", _search_request(x[:1]), None)  # the caller set no deadline
        with pytest.raises(DeadlineExceeded):
            fut.result(timeout=10)
    finally:
        release.set()
        client.close()
        servicer.health_checker.stop()
        server.stop(None)
        shard.close()


def test_channels_and_servers_keep_connections_alive():
    from lookalike import net

    channel = dict(net._CHANNEL_OPTIONS)
    server = dict(net._SERVER_OPTIONS)
    assert channel["grpc.keepalive_time_ms"] > 0 and channel["grpc.keepalive_timeout_ms"] > 0
    # servers accept the channels' pings (else they answer GOAWAY too_many_pings)
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= channel["grpc.keepalive_time_ms"]
