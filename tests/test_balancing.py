"""Calls spread over routers: the client balances calls over every address its target names (round_robin), and
the public server's max_connection_age makes long-lived clients reconnect, so that a router added behind the name
(the autoscaler's) gets calls without a single call failing (lookalike.balancing; docs/DEPLOY.md "Load balancing").

The servers are lookalike.net's factories with a one-method service that answers with the caller's address (its
peer): which server answered, and over which connection. The name is resolved by a DNS server of the test's own
(dnslib), which the client's resolver asks (``dns://127.0.0.1:PORT/name:port``), so its answer can change as
Kubernetes' headless Service's does when a router pod becomes ready.
"""

from __future__ import annotations

import collections
import os
import threading
import time

import grpc
import pytest

from lookalike.balancing import balancing_options, connection_age_options, target_hosts
from lookalike.client import Client
from lookalike.net import create_aio_server, create_server

dnslib = pytest.importorskip("dnslib")
from dnslib import server as dns_server  # noqa: E402: after the skip

_METHOD = "/lookalike.test.Peer/Who"


class _Server:
    """A gRPC server (lookalike.net.create_server) whose one method answers with the caller's address, counting the
    calls and the client connections (peers) it saw."""

    def __init__(self, address: str, connection_age=(0.0, None), aio: bool = False):
        self.calls = 0
        self.peers: set[str] = set()
        self._lock = threading.Lock()

        def who(request, context):
            with self._lock:
                self.calls += 1
                self.peers.add(context.peer())
            return context.peer().encode()

        def register(server):
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "lookalike.test.Peer", {"Who": grpc.unary_unary_rpc_method_handler(who)}),))

        factory = create_aio_server if aio else create_server
        self.server, self.port, _ = factory(address, register, ["lookalike.test.Peer"],
                                            connection_age=connection_age)

    def stop(self) -> None:
        done = self.server.stop(None)
        if hasattr(done, "wait"):
            done.wait(10)


def _who(client: Client) -> bytes:
    return client._channel.unary_unary(_METHOD)(b"", timeout=10)


class _Resolver:
    """A DNS server on loopback answering A records for one name from a list the test changes."""

    def __init__(self, name: str):
        self.name = name
        self.addresses: list[str] = []
        outer = self

        class Answer(dns_server.BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                qname = request.q.qname
                if str(qname).rstrip(".") == outer.name and request.q.qtype == dnslib.QTYPE.A:
                    for a in list(outer.addresses):
                        reply.add_answer(dnslib.RR(qname, dnslib.QTYPE.A, rdata=dnslib.A(a), ttl=1))
                return reply

        self.udp = dns_server.DNSServer(Answer(), port=0, address="127.0.0.1", logger=_Quiet())
        self.port = self.udp.server.server_address[1]
        self.tcp = dns_server.DNSServer(Answer(), port=self.port, address="127.0.0.1", tcp=True, logger=_Quiet())
        self.udp.start_thread()
        self.tcp.start_thread()

    def stop(self) -> None:
        self.udp.stop()
        self.tcp.stop()


class _Quiet(dns_server.DNSLogger):
    def __init__(self):
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")


def _until(cond, what: str, limit_s: float = 60.0, step=None) -> None:
    """Runs ``step`` until ``cond()`` holds; fails after ``limit_s`` (a bound on a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        if step is not None:
            step()
        else:
            time.sleep(0.05)


def test_round_robin_spreads_calls_over_every_server_the_target_names():
    a, b = _Server("127.0.0.1:0"), _Server("127.0.0.1:0")
    try:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with Client(target) as client:  # "auto": a target with a resolver scheme gets round_robin
            for _ in range(40):
                _who(client)
        assert a.calls + b.calls == 40
        assert a.calls >= 10 and b.calls >= 10, (a.calls, b.calls)
        # pick_first, gRPC's default for a plain host:port, sends them all over one connection to one server
        before = (a.calls, b.calls)
        with Client(target, load_balancing="pick_first") as client:
            for _ in range(20):
                _who(client)
        assert sorted([a.calls - before[0], b.calls - before[1]]) == [0, 20]
    finally:
        a.stop()
        b.stop()


def test_a_server_added_behind_the_name_gets_calls_once_the_old_connection_ages_out():
    """Kubernetes' headless Service as a client sees it: one router, then a second one ready behind the same name.
    The first router's connections reach their max age (GOAWAY): the client re-resolves, finds both and spreads
    its calls, and no call fails meanwhile. (gRPC re-resolves at most every 30 s: the test waits that long.)"""
    if os.environ.get("GRPC_DNS_RESOLVER", "ares") != "ares":
        pytest.skip("only gRPC's c-ares resolver asks a given DNS server (dns://HOST:PORT/name)")
    resolver = _Resolver("routers.lookalike.test")
    a = _Server("127.0.0.1:0", connection_age=(1.0, None), aio=True)  # the router's server is the asyncio one
    b = None
    try:
        resolver.addresses = ["127.0.0.1"]
        target = f"dns://127.0.0.1:{resolver.port}/routers.lookalike.test:{a.port}"
        with Client(target) as client:
            for _ in range(5):
                _who(client)
            assert a.calls == 5
            try:  # the second router: same port, another address (all of 127/8 is loopback)
                b = _Server(f"127.0.0.2:{a.port}", connection_age=(1.0, None), aio=True)
            except (OSError, RuntimeError) as err:
                pytest.skip(f"cannot bind 127.0.0.2:{a.port} here: {err}")
            resolver.addresses = ["127.0.0.1", "127.0.0.2"]
            calls = collections.Counter()

            def call():
                calls[_who(client) is not None] += 1  # a failed call raises: the test fails on it
                time.sleep(0.02)

            _until(lambda: b.calls > 0, "the added server received a call", step=call)
            assert len(a.peers) >= 2, "the first server's connection was never renewed"
            before = b.calls
            for _ in range(20):
                call()
            assert b.calls > before and a.calls > 5, "calls are spread over both servers"
    finally:
        a.stop()
        if b is not None:
            b.stop()
        resolver.stop()


def test_max_connection_age_renews_connections_without_failing_calls():
    a = _Server("127.0.0.1:0", connection_age=(1.0, 5.0))
    try:
        with Client(f"127.0.0.1:{a.port}") as client:
            _until(lambda: len(a.peers) >= 3, "three connections in turn", step=lambda: (_who(client),
                                                                                       time.sleep(0.02)))
    finally:
        a.stop()


def test_connection_age_options_are_bounded():
    assert connection_age_options(0) == []
    assert connection_age_options(300, None) == [("grpc.max_connection_age_ms", 300_000)]
    assert connection_age_options(300, 30) == [("grpc.max_connection_age_ms", 300_000),
                                               ("grpc.max_connection_age_grace_ms", 30_000)]
    for age, grace in [(0.5, None), (10 ** 6, None), (60, -1), (60, 10 ** 9)]:
        with pytest.raises(ValueError, match="seconds"):
            connection_age_options(age, grace)
    with pytest.raises(ValueError, match="seconds"):
        create_server("127.0.0.1:0", lambda s: None, [], connection_age=(0.1, None))


def test_balancing_policy_and_the_hosts_of_a_target():
    assert balancing_options("localhost:50051") == []
    assert "round_robin" in balancing_options("dns:///lookalike-router-headless:50051")[0][1]
    assert "pick_first" in balancing_options("dns:///r:1", "pick_first")[0][1]
    with pytest.raises(ValueError, match="load balancing"):
        balancing_options("r:1", "random")
    assert target_hosts("dns:///r.ns.svc:50051") == ["r.ns.svc"]
    assert target_hosts("dns://10.0.0.10:53/r:50051") == ["r"]
    assert target_hosts("ipv4:127.0.0.1:1,127.0.0.2:2") == ["127.0.0.1", "127.0.0.2"]
    assert target_hosts("ipv6:[::1]:1") == ["[::1]"]
    # a bearer token in plaintext only to loopback, whichever way the target is written
    Client("dns:///localhost:50051", token="t").close()
    with pytest.raises(ValueError, match="plaintext"):
        Client("dns:///routers.example:50051", token="t")
    with pytest.raises(ValueError, match="plaintext"):
        Client("ipv4:127.0.0.1:1,10.0.0.1:2", token="t")
