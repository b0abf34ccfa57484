"""Prometheus metrics: the catalogue of every metric lookalike exports, the gRPC server interceptors that time each
call (router and shards, sync and asyncio servers), and the HTTP(S) endpoint that serves them.

One process registry (prometheus_client's default) holds everything a process measures: in the in-process cluster
(control.local) the router and all shards share it, so every shard metric carries a ``shard`` label. State gauges
(vectors, bytes, training) are not kept here: collectors read them from the shards and the controller at scrape
time (shard.metrics, router.metrics). docs/OPERATIONS.md says what each metric means.

Uses prometheus_client, grpc and the base package (errors, security).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import socket
import ssl
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from lookalike.errors import InvalidArgument
from lookalike.security import is_loopback

# Latency buckets, seconds: sub-millisecond shard searches up to calls that wait on a training or a slow disk.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

# --- both hops -------------------------------------------------------------------------------------------------
ROUTER_REQUESTS = Counter("lookalike_router_requests", "Calls of the public API finished, by method and gRPC status "
                          "code", ["method", "code"])
ROUTER_SECONDS = Histogram("lookalike_router_request_seconds", "Time the router took to answer a public call, by "
                           "method", ["method"], buckets=LATENCY_BUCKETS)
SHARD_REQUESTS = Counter("lookalike_shard_requests", "Calls of a shard's internal API finished, by method and gRPC "
                         "status code", ["shard", "method", "code"])
SHARD_SECONDS = Histogram("lookalike_shard_request_seconds", "Time a shard took to answer an internal call, by "
                          "method", ["shard", "method"], buckets=LATENCY_BUCKETS)

# --- the router's searches -------------------------------------------------------------------------------------
SEARCH_QUERIES = Histogram("lookalike_router_search_queries", "Query vectors per Search request",
                           buckets=_COUNT_BUCKETS)
BATCH_QUERIES = Histogram("lookalike_router_batch_queries", "Query vectors per batch the router's batcher sends "
                          "to the shards (several Search requests merged)", buckets=_COUNT_BUCKETS)
FANOUT_SHARDS = Histogram("lookalike_router_fanout_shards", "Shard calls one search made (all rounds)",
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128))
PARTIAL_ANSWERS = Counter("lookalike_router_partial_answers", "Searches answered with coverage < 1 (some buckets "
                          "did not answer; allowed by the request's min_coverage)", ["collection"])

# --- shards ----------------------------------------------------------------------------------------------------
WAL_FSYNC_SECONDS = Histogram("lookalike_shard_wal_fsync_seconds", "Time of a write-ahead log append's fsync",
                              ["shard", "collection"], buckets=LATENCY_BUCKETS)
GPU_SEARCHES = Counter("lookalike_shard_gpu_searches", "Searches a shard's GPU mirror answered", ["collection"])
CPU_FALLBACKS = Counter("lookalike_shard_cpu_fallbacks", "Searches a GPU shard answered on the CPU (no mirror yet, "
                        "k or nprobe beyond the GPU's limit, or the GPU search failed)", ["collection"])
MIRROR_BUILDS = Counter("lookalike_shard_gpu_mirror_builds", "GPU mirror builds and rebuilds, by outcome (ok, "
                        "failed)", ["collection", "outcome"])


def _code_name(context, err: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio reports the status as its integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if err is None:
        return "OK"
    return "CANCELLED" if isinstance(err, (GeneratorExit, asyncio.CancelledError)) else "UNKNOWN"


class _CodeRecorder:
    """A servicer context that remembers the status code set on it: what grpc.aio gives its sync handlers has no
    ``code()``."""

    def __init__(self, context):
        self._context = context
        self._code = None

    def abort(self, code, details="", *args):
        self._code = code
        return self._context.abort(code, details, *args)

    def set_code(self, code):
        self._code = code
        return self._context.set_code(code)

    def code(self):
        return self._code

    def __getattr__(self, name):
        return getattr(self._context, name)


def _recording(context):
    try:
        context.code()
    except (AttributeError, RuntimeError):  # OpenTelemetry's wrapper of such a context raises RuntimeError
        return _CodeRecorder(context)
    return context


def _wrap(handler, observe):
    """``handler`` (a grpc.RpcMethodHandler) whose behaviour calls ``observe(context, error, seconds)`` once it
    ends; coroutines stay coroutines, async generators async generators, so grpc.aio runs them as it did."""
    kind = ("unary_unary" if handler.unary_unary else "unary_stream" if handler.unary_stream
            else "stream_unary" if handler.stream_unary else "stream_stream")
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):
        async def wrapped(request, context):
            t0, err = time.perf_counter(), None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as e:
                err = e
                raise
            finally:
                observe(context, err, time.perf_counter() - t0)
    elif inspect.iscoroutinefunction(behavior):
        async def wrapped(request, context):
            t0, err = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                err = e
                raise
            finally:
                observe(context, err, time.perf_counter() - t0)
    elif handler.response_streaming:
        def wrapped(request, context):
            context = _recording(context)
            t0, err = time.perf_counter(), None
            try:
                yield from behavior(request, context)
            except BaseException as e:
                err = e
                raise
            finally:
                observe(context, err, time.perf_counter() - t0)
    else:
        def wrapped(request, context):
            context = _recording(context)
            t0, err = time.perf_counter(), None
            try:
                return behavior(request, context)
            except BaseException as e:
                err = e
                raise
            finally:
                observe(context, err, time.perf_counter() - t0)
    return handler._replace(**{kind: wrapped})


class _Timing:
    def __init__(self, shard: str | None):
        if shard is None:
            self._count, self._seconds, self._labels = ROUTER_REQUESTS, ROUTER_SECONDS, {}
        else:
            self._count, self._seconds, self._labels = SHARD_REQUESTS, SHARD_SECONDS, {"shard": shard}
        self._cache: dict[str, tuple] = {}  # method -> (handler, its wrapped handler)

    def _observe(self, method: str, context, err, seconds: float) -> None:
        self._count.labels(method=method, code=_code_name(context, err), **self._labels).inc()
        self._seconds.labels(method=method, **self._labels).observe(seconds)

    def wrap(self, handler, details):
        """``handler`` timed; wrapped once per method while the server hands out the same handler."""
        if handler is None:
            return None
        cached = self._cache.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, functools.partial(self._observe, details.method.rpartition("/")[2]))
        self._cache[details.method] = (handler, wrapped)
        return wrapped


class ServerMetrics(_Timing, grpc.ServerInterceptor):
    """A sync server's interceptor: counts and times every call (``shard``: the shard's id; None: the router)."""

    def intercept_service(self, continuation, handler_call_details):
        return self.wrap(continuation(handler_call_details), handler_call_details)


class AioServerMetrics(_Timing, grpc.aio.ServerInterceptor):
    """:class:`ServerMetrics` for a grpc.aio server; put it first, so calls that later interceptors refuse (an
    unknown token) are counted too."""

    async def intercept_service(self, continuation, handler_call_details):
        return self.wrap(await continuation(handler_call_details), handler_call_details)


# --- the HTTP endpoint -----------------------------------------------------------------------------------------
def check_metrics_bind(host: str, tls) -> None:
    """Refuses (InvalidArgument, one sentence) to serve metrics beyond loopback without TLS and a client CA:
    ``tls`` is a lookalike.security.TLSConfig or None."""
    if not is_loopback(host) and (tls is None or not (tls.cert and tls.key and tls.ca)):
        raise InvalidArgument(f"refusing to serve metrics on {host} without TLS: give --tls-cert, --tls-key and "
                              "--tls-ca (Prometheus then scrapes with a client certificate that CA signed), or bind "
                              "metrics to 127.0.0.1")


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no line per scrape on stderr
        pass


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Prometheus' text format at ``/metrics`` (and any path but those of ``routes``) over HTTP on loopback, or
    HTTPS with client certificates (mutual TLS) beyond it; started by :func:`serve_metrics`."""

    def __init__(self, httpd, host: str):
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self.address = f"{host}:{self.port}"
        self._thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def serve_metrics(host: str, port: int, tls=None, registry: CollectorRegistry = REGISTRY,
                  routes: dict | None = None) -> MetricsServer:
    """Serves ``registry`` on ``host:port`` (0: a free port).

    Args:
        tls: lookalike.security.TLSConfig: HTTPS with its cert and key, clients must present a certificate its
            ``ca`` signed. Required beyond loopback (see :func:`check_metrics_bind`).
        routes: path -> callable returning a JSON-able value, served as application/json (e.g. ``/sd``: Prometheus'
            HTTP service discovery).

    Raises:
        InvalidArgument: beyond loopback without TLS.
        OSError: the port cannot be bound.
    """
    check_metrics_bind(host, tls)
    metrics_app = make_wsgi_app(registry)
    routes = dict(routes or {})

    def app(environ, start_response):
        route = routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            return metrics_app(environ, start_response)
        try:
            body, status = json.dumps(route()).encode(), "200 OK"
        except Exception as err:  # the control plane did not answer: Prometheus keeps its last targets
            body, status = json.dumps({"error": str(err)}).encode(), "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    bare = host.strip("[]")
    httpd = make_server(bare, port, app, _Server6 if ":" in bare else ThreadingWSGIServer, handler_class=_Quiet)
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            ctx.load_verify_locations(tls.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    return MetricsServer(httpd, host)


class OneShard(Collector):
    """The samples of ``registry`` labelled ``shard=shard_id``: what a shard of the in-process cluster serves on
    its own endpoint (all of them share the process registry)."""

    def __init__(self, shard_id: str, registry: CollectorRegistry = REGISTRY):
        self.shard_id = shard_id
        self._registry = registry

    def collect(self):
        for family in self._registry.collect():
            samples = [s for s in family.samples if s.labels.get("shard") == self.shard_id]
            if samples:
                family.samples = samples
                yield family


def shard_registry(shard_id: str) -> CollectorRegistry:
    """A registry of one in-process shard's metrics (:class:`OneShard`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OneShard(shard_id))
    return registry


MOVE_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


class Durations:
    """A histogram as plain numbers, for a process Prometheus does not scrape (the controller's actor): it sends
    :meth:`snapshot` to the router, whose collector exports it (router.metrics)."""

    def __init__(self, buckets=MOVE_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # per bucket, the last one +Inf; not cumulative
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[next((i for i, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))] += 1
            self.sum += seconds

    def snapshot(self) -> dict:
        """{"buckets": [(upper bound, cumulative count)...] ending with ("+Inf", count), "sum": seconds}."""
        with self._lock:
            out, total = [], 0
            for bound, n in zip([*map(str, self.buckets), "+Inf"], self.counts):
                total += n
                out.append((bound, total))
            return {"buckets": out, "sum": self.sum}
