"""A router whose control plane goes away and comes back (the Ray head restarting): health turns NOT_SERVING, the
searches of collections whose shard map it holds are still answered, calls that need the control plane get
UNAVAILABLE with a sentence, and once the control plane is back the router connects again (a new connection: the
old one stays dead, like a Ray Client session whose head restarted), logs it, and serves everything again.

The cluster is the in-process one (control.local.LocalCluster: real shards behind gRPC, a real controller); what
fails is the router's connection to that controller, as :class:`_Head` hands them out (control.link.Connection).
"""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import make_data, wait_for
from control.link import Connection, ControlPlaneLink
from control.local import LocalCluster
from lookalike.client import Client
from router.core import Router
from router.server import create_router_server


class _Session:
    """One connection's view of the controller: works until its head goes down, then never again."""

    def __init__(self, head: "_Head"):
        self._head = head
        self._generation = head.generation

    def __getattr__(self, name):
        method = getattr(self._head.controller, name)

        def call(*args, **kw):
            if self._head.down or self._generation != self._head.generation:
                raise ConnectionError("Ray Client connection lost: the server is gone")
            return method(*args, **kw)

        return call


class _Head:
    """Hands out connections to the controller; ``stop`` and ``start`` are the head going down and coming back."""

    def __init__(self, controller):
        self.controller = controller
        self.down = False
        self.generation = 0
        self.connects = 0
        self.closed = 0

    def connect(self) -> Connection:
        if self.down:
            raise ConnectionError("could not join the Ray cluster: connection refused")
        self.connects += 1
        return Connection(_Session(self), close=self._closed)

    def _closed(self) -> None:
        self.closed += 1

    def stop(self) -> None:
        self.down = True

    def start(self) -> None:
        self.generation += 1
        self.down = False


def _status(channel) -> int:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError as err:
        return err.code()


def test_router_reports_a_lost_control_plane_keeps_searching_and_reconnects(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="control.link")
    cluster = LocalCluster(tmp_path / "data", shards=2)
    head = _Head(cluster.controller)
    link = ControlPlaneLink(head.connect, "the test's head", reconnect_after_s=0.3, interval_s=0.05).start()
    router = Router(link.control, refresh_interval=0.05)
    server, port, _ = create_router_server(router, "127.0.0.1:0", health_check={"interval_s": 0.05})
    client = Client(f"127.0.0.1:{port}", timeout=30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        xb, xq = make_data("l2", 400, 16, seed=1, nq=5)
        client.create_collection("items", dim=16, buckets=8)
        client.upsert("items", [str(i) for i in range(len(xb))], xb)
        before = client.search("items", xq, k=5)
        assert wait_for(lambda: _status(channel) == SERVING, 30)

        head.stop()
        assert wait_for(lambda: _status(channel) == NOT_SERVING, 30), "health never said the control plane is lost"
        assert wait_for(lambda: not link.connected, 30), "the link never dropped the dead connection"
        assert head.closed == 1
        during = client.search("items", xq, k=5)  # from the shard map the router holds
        assert during.ids == before.ids and during.coverage == 1.0
        with pytest.raises(grpc.RpcError) as err:
            client.create_collection("other", dim=16, buckets=8)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "lost its control plane" in err.value.details(), err.value.details()
        assert any("lost the control plane at the test's head" in r.getMessage() for r in caplog.records)

        head.start()  # the head is back; the connection from before stays dead: only a new one works
        assert wait_for(lambda: _status(channel) == SERVING, 30), "the router never served again"
        assert link.reconnects == 1 and head.connects == 2
        assert any("connected to the control plane at the test's head again" in r.getMessage()
                   for r in caplog.records)
        client.create_collection("other", dim=16, buckets=8)
        client.upsert("other", ["a"], xb[:1])
        assert client.search("other", xb[:1], k=1).ids == [["a"]]
        assert client.search("items", xq, k=5).ids == before.ids
    finally:
        client.close()
        channel.close()
        server.stop(None).wait(10)
        link.close()
        router.close()
        cluster.close()


def test_a_control_plane_that_never_answered_fails_the_start():
    """The first connection's failure is the caller's (serve prints it and exits 1); the link does not hide it."""
    head = _Head(controller=None)
    head.stop()
    link = ControlPlaneLink(head.connect, "nowhere")
    with pytest.raises(ConnectionError, match="could not join"):
        link.start()


def test_a_slow_answer_is_not_a_lost_control_plane():
    """Failures shorter than reconnect_after_s keep the connection (a controller restarting on its own)."""
    calls = {"n": 0}
    gate = threading.Event()

    def probe(conn):
        calls["n"] += 1
        if calls["n"] == 3:
            raise TimeoutError("slow")
        if calls["n"] > 6:
            gate.set()

    head = _Head(controller=object())
    link = ControlPlaneLink(head.connect, "here", reconnect_after_s=60, interval_s=0.01, probe=probe).start()
    try:
        assert gate.wait(30)
        assert link.connected and head.connects == 1 and link.reconnects == 0
    finally:
        link.close()


def test_a_probe_that_hangs_counts_as_no_answer():
    """A Ray Client whose server vanished can block a call for its whole reconnection grace: the link does not wait
    for the call to fail before it calls the control plane lost."""
    stuck = threading.Event()
    head = _Head(controller=object())

    def probe(conn):
        if head.connects == 1:
            stuck.wait(60)  # the first connection's calls hang

    link = ControlPlaneLink(head.connect, "here", reconnect_after_s=0.2, interval_s=0.01, probe=probe).start()
    try:
        assert wait_for(lambda: link.reconnects == 1, 30), "a hanging control plane was never called lost"
        assert head.closed == 1 and link.connected
    finally:
        stuck.set()
        link.close()
