"""Tracing and logs: one trace from the caller through the router to the shards (OpenTelemetry, an in-memory
exporter in this process, a real in-process cluster served over gRPC); tracing off when the environment asks for
nothing; JSON logs that carry the trace id of a failed request."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

trace = pytest.importorskip("opentelemetry.trace")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from conftest import served_local_cluster  # noqa: E402

ROUTER_SEARCH = "/lookalike.v1.Lookalike/Search"
SHARD_SEARCH = "/lookalike.v1.Shard/Search"
DIM = 8


@pytest.fixture(scope="module")
def spans():
    """An in-memory exporter behind this process's global tracer provider, installed for this module's tests and
    removed after them (so that the tests after these run untraced, as they would without them)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    # OpenTelemetry sets its global provider once per process; its own tests reset it through these (private)
    # names, as opentelemetry-test-utils' reset_trace_globals does.
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture(scope="module")
def cluster(spans, tmp_path_factory):
    """A served in-process cluster (2 shards, router and shards over gRPC) built after tracing was installed, with
    a collection of 200 vectors."""
    with served_local_cluster(tmp_path_factory.mktemp("tracing"), shards=2) as (local, client):
        client.create_collection("c", dim=DIM, buckets=8)
        xb = np.random.default_rng(0).standard_normal((200, DIM)).astype("float32")
        client.upsert("c", [str(i) for i in range(200)], xb)
        yield local, client, xb


def _trace_of(exporter, trace_id: int, servers: set[str], timeout_s: float = 20.0):
    """The finished spans of one trace, once it has a SERVER span of each method in ``servers`` (a server span ends
    when its handler returns, which may be after the caller has its answer; the router's ends after those of the
    shard calls it made)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if servers <= {s.name for s in got if s.kind == trace.SpanKind.SERVER} or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def _ancestors(span, by_id) -> list:
    out = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        out.append(span)
    return out


def test_a_search_is_one_trace_from_the_caller_through_the_router_to_every_shard(spans, cluster):
    local, client, xb = cluster
    spans.clear()
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        hits = client.search("c", xb[:3], k=5)
    assert hits.coverage == 1.0
    tid = caller.get_span_context().trace_id
    got = _trace_of(spans, tid, {ROUTER_SEARCH})
    by_id = {s.context.span_id: s for s in got}
    kinds = {(s.name, s.kind) for s in got}
    assert (ROUTER_SEARCH, trace.SpanKind.CLIENT) in kinds  # the caller's channel
    [router] = [s for s in got if s.name == ROUTER_SEARCH and s.kind == trace.SpanKind.SERVER]
    assert by_id[caller.get_span_context().span_id] in _ancestors(router, by_id)
    assert router.attributes["lookalike.collection"] == "c"
    assert router.attributes["lookalike.nq"] == 3 and router.attributes["lookalike.k"] == 5
    assert router.attributes["lookalike.coverage"] == 1.0
    shard_servers = [s for s in got if s.name == SHARD_SEARCH and s.kind == trace.SpanKind.SERVER]
    shard_clients = [s for s in got if s.name == SHARD_SEARCH and s.kind == trace.SpanKind.CLIENT]
    # every shard that holds buckets was asked, each call a child of the router's span, answered in the shard's
    assert {s.attributes["lookalike.shard"] for s in shard_servers} == set(local.placer.shards)
    assert len(shard_clients) == len(shard_servers)
    for s in shard_clients:
        assert s.parent.span_id == router.context.span_id
    for s in shard_servers:
        assert router in _ancestors(s, by_id)
        assert by_id[s.parent.span_id].kind == trace.SpanKind.CLIENT
        assert s.attributes["lookalike.collection"] == "c" and s.attributes["lookalike.nq"] == 3


def test_a_write_is_one_trace_through_the_router_s_threads(spans, cluster):
    """Upsert is a plain handler of the router's asyncio server, and its shard calls go from a pool of threads."""
    local, client, xb = cluster
    spans.clear()
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        client.upsert("c", ["w1", "w2", "w3"], xb[:3])
    tid = caller.get_span_context().trace_id
    got = _trace_of(spans, tid, {"/lookalike.v1.Lookalike/Upsert"})
    by_id = {s.context.span_id: s for s in got}
    [router] = [s for s in got if s.name == "/lookalike.v1.Lookalike/Upsert" and s.kind == trace.SpanKind.SERVER]
    shard_servers = [s for s in got if s.name == "/lookalike.v1.Shard/Upsert" and s.kind == trace.SpanKind.SERVER]
    assert shard_servers
    for s in shard_servers:
        assert router in _ancestors(s, by_id)


def test_health_checks_make_no_spans(spans, cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, client, _ = cluster
    spans.clear()
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        assert health_pb2_grpc.HealthStub(client._channel).Check(health_pb2.HealthCheckRequest(),
                                                                 timeout=10).status == 1
        client.list_collections()
    got = _trace_of(spans, caller.get_span_context().trace_id, {"/lookalike.v1.Lookalike/ListCollections"})
    assert "/lookalike.v1.Lookalike/ListCollections" in {s.name for s in got}
    assert not [s for s in got if "Health" in s.name]


def test_traced_calls_pass_the_token_check_and_refused_ones_are_traced_too(spans, cluster, tmp_path):
    """Tracing's interceptor and lookalike.security's AuthInterceptor on one server: a call with a token is answered
    and traced to the shards; one without is refused (UNAUTHENTICATED), its span saying so; a stream too."""
    import grpc

    from lookalike.client import Client
    from lookalike.security import AuthInterceptor, TokenTable, new_token, token_hash
    from router.server import create_router_server

    local, _, xb = cluster
    token = new_token()
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "svc", "scopes": ["read", "write"],
                                            "sha256": token_hash(token)[7:]}]}))
    server, port, _ = create_router_server(local.router, "127.0.0.1:0", auth=AuthInterceptor(TokenTable(str(path))))
    try:
        with Client(f"127.0.0.1:{port}", timeout=10, token=token) as good, Client(f"127.0.0.1:{port}", timeout=10) as bad:
            spans.clear()
            tracer = trace.get_tracer("test")
            with tracer.start_as_current_span("with-token") as ok:
                assert good.search("c", xb[:1], k=3).coverage == 1.0
                assert good.upsert_stream("c", iter([(["s1"], xb[:1])])) == 1
            with tracer.start_as_current_span("without") as refused:
                with pytest.raises(grpc.RpcError) as err:
                    bad.search("c", xb[:1], k=3)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)
    answered = {ROUTER_SEARCH, SHARD_SEARCH, "/lookalike.v1.Lookalike/UpsertStream", "/lookalike.v1.Shard/Upsert"}
    got = _trace_of(spans, ok.get_span_context().trace_id, answered)
    assert answered <= {s.name for s in got if s.kind == trace.SpanKind.SERVER}
    no = _trace_of(spans, refused.get_span_context().trace_id, {ROUTER_SEARCH})
    [router] = [s for s in no if s.name == ROUTER_SEARCH and s.kind == trace.SpanKind.SERVER]
    assert router.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert not [s for s in no if s.name == SHARD_SEARCH]


@pytest.fixture
def json_log():
    """This process's log records as JSON lines in a buffer (lookalike.logs), the root logger restored after."""
    from lookalike import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    logs.configure(logging.INFO, "json", stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_a_failed_search_is_logged_as_json_with_its_trace_id(spans, cluster, json_log, monkeypatch):
    import grpc

    local, client, xb = cluster
    sc = next(iter(local.placer.shards.values())).collection("c")

    def broken(*args, **kwargs):
        raise RuntimeError("the index is broken")

    monkeypatch.setattr(type(sc), "search", broken)
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        with pytest.raises(grpc.RpcError) as err:
            client.search("c", xb[:2], k=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no shard answered
    tid = trace.format_trace_id(caller.get_span_context().trace_id)
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]  # every line is one JSON object
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    failed = [r for r in records if r.get("trace_id") == tid]
    # the shards' bug, with its traceback, and the router's failed call: all under the caller's trace
    assert any(r["level"] == "ERROR" and "the index is broken" in r.get("exception", "") for r in failed), records
    assert any(r["level"] == "WARNING" and r["message"].startswith("Search failed: UNAVAILABLE") for r in failed), \
        records
    assert all(len(r["span_id"]) == 16 for r in failed)


def test_serve_log_format_json_configures_json_lines(monkeypatch, capfd):
    """`lookalike serve --log-format json`: the CLI logs JSON lines, Ray's own lines too (the command itself
    stubbed: no Ray cluster here)."""
    from tools import cli
    from tools.cli import serve

    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    saved = root.handlers[:], root.level
    ray_saved = ray_logger.handlers[:], ray_logger.propagate

    def fake_serve(args):
        from ray._private.ray_logging import setup_logger

        setup_logger(logging.INFO, "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")  # ray.init's
        ray_logger.info("Started a local Ray instance.")
        logging.getLogger("lookalike").info("serving %s", args.log_format)
        return 0

    monkeypatch.setattr(serve, "cmd_serve", fake_serve)
    monkeypatch.delenv("LOOKALIKE_LOG_FORMAT", raising=False)
    try:
        assert cli.main(["serve", "--log-format", "json"]) == 0
        lines = capfd.readouterr().err.splitlines()
        monkeypatch.setenv("LOOKALIKE_LOG_FORMAT", "yaml")
        assert cli.main(["serve"]) == 2
        refused = capfd.readouterr().err
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        ray_logger.handlers[:], ray_logger.propagate = ray_saved
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"level": "INFO", "logger": "ray", "message": "Started a local Ray instance."}.items() <= records[-2].items()
    assert {"level": "INFO", "logger": "lookalike", "message": "serving json"}.items() <= records[-1].items()
    assert refused.startswith("error: the log format must be one of text, json, not 'yaml'")
    assert len(refused.splitlines()) == 1


_CHILD = """
import json, sys
from opentelemetry import trace
from lookalike import tracing
on = tracing.setup("lookalike-router")
with trace.get_tracer("t").start_as_current_span("probe"):
    pass
tracing.flush()
print(json.dumps({"on": on, "enabled": tracing.enabled(), "provider": type(trace.get_tracer_provider()).__name__,
                  "server": len(tracing.server_interceptors()), "aio_server": len(tracing.aio_server_interceptors()),
                  "aio_client": len(tracing.aio_client_interceptors())}))
"""


def _child(**env) -> tuple[dict, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_tracing_is_off_without_the_otel_environment():
    state, printed = _child()
    assert state == {"on": False, "enabled": False, "provider": "ProxyTracerProvider", "server": 0,
                     "aio_server": 0, "aio_client": 0}
    assert printed == ""


def test_otel_traces_exporter_console_turns_it_on():
    state, printed = _child(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="search-test")
    assert state == {"on": True, "enabled": True, "provider": "TracerProvider", "server": 1, "aio_server": 1,
                     "aio_client": 4}
    span = json.loads(printed)  # the console exporter prints each span as JSON
    assert span["name"] == "probe" and span["resource"]["attributes"]["service.name"] == "search-test"


def test_an_otlp_endpoint_turns_it_on_and_spans_reach_the_collector():
    """OTEL_EXPORTER_OTLP_ENDPOINT alone: spans go over OTLP/gRPC to the collector there (here: a collector's
    TraceService in this process)."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        state, _ = _child(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert state["on"] and state["server"] == 1
    spans = [(rs.resource, span) for req in received for rs in req.resource_spans for ss in rs.scope_spans
             for span in ss.spans]
    assert [span.name for _, span in spans] == ["probe"]
    attrs = {a.key: a.value.string_value for a in spans[0][0].attributes}
    assert attrs["service.name"] == "lookalike-router"


def test_exporters_requested_reads_the_standard_variables():
    from lookalike.tracing import exporters_requested

    assert exporters_requested({}) == []
    assert exporters_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == []
    assert exporters_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == ["otlp"]
    assert exporters_requested({"OTEL_TRACES_EXPORTER": "otlp,console",
                                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == ["otlp_proto_http", "console"]
    assert exporters_requested({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) == []


def test_a_batch_runs_in_its_first_caller_s_trace():
    """Searches that gather while another batch runs are sent when it ends: their shard calls belong to their own
    trace (the first caller's of the batch), not to the trace of the batch that just ended."""
    import asyncio
    import concurrent.futures

    from router.batcher import SearchBatcher
    from router.search import SearchResult

    seen = []

    async def main():
        release = asyncio.Event()

        async def search(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout):
            seen.append(trace.get_current_span().get_span_context().trace_id)
            if len(seen) == 1:
                await release.wait()  # the first batch runs until the second search has gathered
            return SearchResult(D=np.zeros((len(xq), k), np.float32), ids=[[] for _ in xq], payloads=None,
                                coverage=1.0, epoch=1)

        def in_trace(trace_id: int):
            return trace.use_span(trace.NonRecordingSpan(trace.SpanContext(trace_id, 1, is_remote=False)))

        async def caller(batcher, trace_id):
            with in_trace(trace_id):
                return await batcher.search("c", np.zeros((1, 4), np.float32), 3)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            batcher = SearchBatcher(search, pool, max_wait_s=10.0, max_inflight=1)
            first = asyncio.ensure_future(caller(batcher, 1))
            await asyncio.sleep(0)  # the first search runs (a lone search goes at once)
            second = asyncio.ensure_future(caller(batcher, 2))
            await asyncio.sleep(0)  # the second gathers: one batch is running
            assert seen == [1]
            release.set()
            await asyncio.gather(first, second)
            return batcher.batches

    assert asyncio.run(main()) == 2  # the second went when the first ended
    assert seen == [1, 2]


def test_serve_refuses_an_exporter_no_package_provides(tmp_path, monkeypatch, capfd):
    """A typo in OTEL_TRACES_EXPORTER is one line and exit status 2, before anything starts."""
    from tools import cli
    from tools.cli import serve

    def no_ray(*args, **kwargs):
        raise AssertionError("serve went on to start Ray")

    monkeypatch.setattr(serve.ray, "init", no_ray)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaegr")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        status = cli.main(["serve", "--data", str(tmp_path / "data"), "--port", "0"])
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capfd.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("error: OTEL_TRACES_EXPORTER names the span exporter 'jaegr', which no installed "
                              "package provides (installed: "), err
    assert not (tmp_path / "data").exists()  # refused before the storage was touched
