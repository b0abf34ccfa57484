"""The one factory for gRPC servers and the one for channels, so TLS, authentication and tracing (lookalike.tracing:
nothing while it is off) are added in one place.

Every server gets grpc.health.v1 and server reflection (which serves the protos with their comments:
``grpcurl describe`` shows them); servicer methods wrap their body with :func:`abort_on_error` to turn typed
errors into statuses.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import inspect
import logging
import threading
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from lookalike import tracing
from lookalike.balancing import balancing_options, connection_age_options, target_hosts
from lookalike.config import LIMITS, RPC
from lookalike.errors import Busy, InvalidArgument, LookalikeError, retry_trailers
from lookalike.logs import log_failed
from lookalike.security import AioTokenMetadata, TokenMetadata, is_loopback

log = logging.getLogger(__name__)

_OPTIONS = [
    ("grpc.max_send_message_length", LIMITS.max_message_bytes),
    ("grpc.max_receive_message_length", LIMITS.max_message_bytes),
    ("grpc.so_reuseport", 0),
]
# Keepalive (lookalike.config.RpcPolicy): channels ping idle connections and drop those that do not answer; servers
# accept those pings, and ping idle clients to drop the vanished ones.
_CHANNEL_OPTIONS = _OPTIONS + [("grpc.keepalive_time_ms", int(RPC.keepalive_time_s * 1000)),
                               ("grpc.keepalive_timeout_ms", int(RPC.keepalive_timeout_s * 1000)),
                               ("grpc.http2.max_pings_without_data", 0)]
_SERVER_OPTIONS = _OPTIONS + [("grpc.keepalive_time_ms", int(2 * RPC.keepalive_time_s * 1000)),
                              ("grpc.keepalive_timeout_ms", int(RPC.keepalive_timeout_s * 1000)),
                              ("grpc.http2.min_recv_ping_interval_without_data_ms",
                               int(RPC.min_ping_interval_s * 1000)),
                              ("grpc.http2.min_ping_interval_without_data_ms", int(RPC.min_ping_interval_s * 1000)),
                              ("grpc.http2.max_ping_strikes", 2)]


def _bind(server, address: str, tls) -> int:
    """Adds the listening port: TLS with ``tls`` (a lookalike.security.TLSConfig), plaintext when None."""
    port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    return port


def create_server(address: str, register, service_names: list[str], max_workers: int = 16, tls=None,
                  interceptors=(), max_concurrent_rpcs: int | None = RPC.max_concurrent_rpcs,
                  connection_age: tuple[float, float | None] = (0.0, None)):
    """Builds and starts a gRPC server with health and reflection.

    Args:
        address: "host:port"; port 0 picks a free port.
        register: callable(server) that adds the application servicers.
        service_names: full names of the services added (for health and reflection).
        max_workers: threads serving calls.
        tls: lookalike.security.TLSConfig to serve TLS (mutual when its ``client_auth``); None: plaintext.
        interceptors: grpc.ServerInterceptors (e.g. lookalike.metrics.ServerMetrics).
        max_concurrent_rpcs: calls it runs or queues at once; beyond, they get RESOURCE_EXHAUSTED (None: no bound).
        connection_age: (max age, grace) of client connections, seconds (:func:`connection_age_options`; 0: none).

    Returns:
        (server, port, health_servicer): the started server, the bound port, and the health servicer whose
        status starts NOT_SERVING for every service; call ``set_serving`` when ready.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=_SERVER_OPTIONS + connection_age_options(*connection_age),
                         maximum_concurrent_rpcs=max_concurrent_rpcs,
                         interceptors=[*tracing.server_interceptors(), *interceptors] or None)  # the span first
    register(server)
    health_servicer = _add_health_and_reflection(server, service_names)
    port = _bind(server, address, tls)
    server.start()
    return server, port, health_servicer


def create_health_server(address: str):
    """A plaintext server of grpc.health.v1 alone, for probes that cannot speak TLS (Kubernetes' gRPC probes):
    it tells whether the process serves, and nothing else. Returns (server, port, health_servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-health"),
                         options=_OPTIONS)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = _bind(server, address, None)
    server.start()
    return server, port, health_servicer


@functools.cache
def commented_files() -> dict[str, bytes]:
    """Our .proto files as serialized FileDescriptorProtos with their comments (source info), by file name
    ("protos/lookalike.proto"), from ``protos/descriptors.binpb`` (written by ``python -m tools.genproto``
    next to the generated code, from the same protoc run)."""
    data = importlib.resources.files("protos").joinpath("descriptors.binpb").read_bytes()
    return {f.name: f.SerializeToString() for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}


class _CommentedFiles:
    """Reflection answers that carry the comments of our protos. The library's servicer rebuilds each file from
    the descriptor pool of the generated code, which keeps no comments (``CopyToProto`` drops source info), so the
    two lookups that answer with files are overridden to send the commented files where we have them. They are
    the library's private methods: tests/test_clients.py checks that the comments still arrive."""

    def _files_response(self, descriptor, request):
        files, todo = {}, [descriptor]
        while todo:
            d = todo.pop()
            if d.name not in files:
                commented = commented_files().get(d.name)
                if commented is None:
                    proto = descriptor_pb2.FileDescriptorProto()
                    d.CopyToProto(proto)
                    commented = proto.SerializeToString()
                files[d.name] = commented
                todo.extend(d.dependencies)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=list(files.values())),
            original_request=request)

    def _file_by_filename(self, request, filename):
        try:
            return self._files_response(self._pool.FindFileByName(filename), request)
        except KeyError:
            return super()._file_by_filename(request, filename)

    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            return self._files_response(self._pool.FindFileContainingSymbol(fully_qualified_name), request)
        except KeyError:
            pass
        # The protocol's symbols include methods ("pkg.Service.Method", what `grpcurl describe` asks for one),
        # which the descriptor pool does not find by name: look the method up in its service.
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            found = self._pool.FindServiceByName(service)
        except KeyError:
            found = None
        if found is not None and method in found.methods_by_name:
            return self._files_response(found.file, request)
        return super()._file_containing_symbol(request, fully_qualified_name)


class _ReflectionServicer(_CommentedFiles, reflection.ReflectionServicer):
    pass


class _AioReflectionServicer(_CommentedFiles, reflection.aio.ReflectionServicer):
    pass


def _add_health_and_reflection(server, service_names: list[str], health_servicer=None):
    if health_servicer is None:
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(getattr(health_servicer, "servicer", health_servicer), server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    servicer = (_AioReflectionServicer if isinstance(server, grpc.aio.Server) else _ReflectionServicer)(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    return health_servicer


class _AioHealth:
    """The asyncio health servicer (its Watch streams hold no thread), with the sync ``set`` of the other one."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.servicer = health.aio.HealthServicer()
        self._loop = loop

    def set(self, service: str, status) -> None:
        coro = self.servicer.set(service, status)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:  # on the server's loop (while it starts): schedule it
            self._loop.create_task(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)


class AioServer:
    """A ``grpc.aio`` server on its own event-loop thread, started and stopped from ordinary threads like a sync
    server. Its coroutine handlers run on ``loop``; its plain (sync) handlers on a thread pool."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, pool: futures.Executor):
        self.loop = loop
        self._thread = thread
        self.server: grpc.aio.Server | None = None
        self.executors: list[futures.Executor] = [pool]  # shut down once stopped
        self.on_stop: list = []  # called first by stop (a health checker's stop)
        self._stopped: threading.Event | None = None

    def stop(self, grace: float | None) -> threading.Event:
        """Stops serving (calls in flight get ``grace`` seconds); returns an Event set once stopped."""
        if self._stopped is not None:
            return self._stopped
        self._stopped = done = threading.Event()
        for hook in self.on_stop:
            hook()

        stopping = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)

        def finish() -> None:  # not on the loop's thread: it joins that thread
            try:
                stopping.result()
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout=10)
                for ex in self.executors:
                    ex.shutdown(wait=False)
                done.set()

        threading.Thread(target=finish, name="grpc-aio-stop", daemon=True).start()
        return done

    def run(self, coro, timeout: float | None = None):
        """Runs a coroutine on the server's loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class _Undecodable:
    """What a request deserializer returns for bytes that are not the request message (see _decoding)."""

    def __init__(self, err: Exception):
        self.message = f"the request is not a valid protobuf message of this method: {err}"


def _tolerant(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as err:  # DecodeError, and invalid UTF-8 in a string field (also a DecodeError)
            return _Undecodable(err)

    return deserialize


def _decoding(handler):
    """``handler`` with a tolerant deserializer: requests that do not parse get INVALID_ARGUMENT with a sentence,
    where grpc.aio would answer UNKNOWN ("Unexpected DecodeError") or the handler meet the error mid-stream
    (INTERNAL). For unary requests (sync or coroutine handlers, unary or async-generator answers) and sync request
    streams; other handlers are returned as they are."""
    if handler is None or handler.request_deserializer is None:
        return handler
    kw = {"request_deserializer": _tolerant(handler.request_deserializer),
          "response_serializer": handler.response_serializer}
    if not handler.request_streaming:
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if handler.response_streaming:
            if not inspect.isasyncgenfunction(behavior):
                return handler

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for item in behavior(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, **kw)
        if inspect.iscoroutinefunction(behavior):
            async def unary_async(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_async, **kw)

        def unary(request, context):
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming or inspect.iscoroutinefunction(handler.stream_unary):
        return handler
    behavior = handler.stream_unary

    def checked(requests):
        for request in requests:
            if isinstance(request, _Undecodable):
                raise InvalidArgument(request.message)
            yield request

    def stream_unary(requests, context):
        return behavior(checked(requests), context)  # abort_on_error turns InvalidArgument into the status

    return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)


class _DecodingGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner):
        self._inner = inner
        self._cache: dict[str, object] = {}

    def service(self, details):
        handler = self._cache.get(details.method)
        if handler is None:
            handler = _decoding(self._inner.service(details))
            if handler is not None:
                self._cache[details.method] = handler
        return handler


class _Registering:
    """The server as an application's ``register`` sees it: the method handlers it adds are wrapped once, here, by
    :func:`_decoding` (no per-call interceptor). Health and reflection are added to the server itself."""

    def __init__(self, server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers):
        self._server.add_generic_rpc_handlers(tuple(_DecodingGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service, handlers):
        self._server.add_registered_method_handlers(service, {n: _decoding(h) for n, h in handlers.items()})

    def __getattr__(self, name):
        return getattr(self._server, name)


def create_aio_server(address: str, register, service_names: list[str], max_workers: int = 32, tls=None,
                      interceptors=(), max_concurrent_rpcs: int | None = RPC.max_concurrent_rpcs,
                      connection_age: tuple[float, float | None] = (0.0, None)):
    """Like :func:`create_server`, for a server whose hot handlers are coroutines (``async def``): it runs on an
    asyncio event loop in a thread of its own; plain handlers (and health) run on ``max_workers`` threads.
    ``register(server)`` is called on that loop; ``interceptors`` are grpc.aio server interceptors (the
    public server's lookalike.security.AuthInterceptor); ``connection_age``: as for :func:`create_server`.
    Returns (AioServer, port, health_servicer)."""
    options = _SERVER_OPTIONS + connection_age_options(*connection_age)  # raises before a thread starts
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True)
    thread.start()
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc")
    handle = AioServer(loop, thread, pool)

    async def start():
        interceptors_ = [*tracing.aio_server_interceptors(), *interceptors] or None  # the trace's span first
        server = grpc.aio.server(migration_thread_pool=pool, options=options, interceptors=interceptors_,
                                 maximum_concurrent_rpcs=max_concurrent_rpcs)
        register(_Registering(server))
        health_servicer = _add_health_and_reflection(server, service_names, _AioHealth(loop))
        port = _bind(server, address, tls)
        await server.start()
        return server, port, health_servicer

    try:
        handle.server, port, health_servicer = handle.run(start(), timeout=30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        raise
    return handle, port, health_servicer


def set_serving(health_servicer, service_names: list[str], serving: bool = True) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        health_servicer.set(name, status)


def _plain_token_ok(target: str, token) -> None:
    if token and not all(is_loopback(h) for h in target_hosts(target)):
        raise ValueError(f"refusing to send a bearer token in plaintext to {target}: use TLS (--tls-ca)")


def create_channel(target: str, tls=None, token: str | None = None, load_balancing: str = "auto") -> grpc.Channel:
    """A channel to a lookalike server (router or shard) with the project's message limits.

    Args:
        target: "host:port", or a gRPC target with a resolver ("dns:///router-headless:50051").
        tls: lookalike.security.TLSConfig (its ``ca`` verifies the server; its cert and key are this client's in
            mutual TLS); None: plaintext.
        token: a bearer token sent with every call (in plaintext only to a loopback address).
        load_balancing: see :func:`balancing_options`.
    """
    options = _CHANNEL_OPTIONS + balancing_options(target, load_balancing)
    # The token goes as call metadata added by an interceptor, not as call credentials: gRPC runs a credentials
    # plugin on a thread of its own for every call (about 9 ms a call here, bench/security_bench.py).
    if tls is None:
        _plain_token_ok(target, token)
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, tls.channel_credentials(), options=options + tls.channel_options())
    channel = tracing.traced_channel(channel)
    return grpc.intercept_channel(channel, TokenMetadata(token)) if token else channel


def create_aio_channel(target: str, tls=None, token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to a lookalike server, with the same options as :func:`create_channel`."""
    icpt = [*tracing.aio_client_interceptors(), *([AioTokenMetadata(token)] if token else [])] or None
    if tls is None:
        _plain_token_ok(target, token)
        return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=icpt)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=_CHANNEL_OPTIONS + tls.channel_options(),
                                   interceptors=icpt)


def wait_for_serving(target: str, timeout: float = 30.0, service: str = "", tls=None) -> None:
    """Blocks until the server at ``target`` reports SERVING on health, or raises TimeoutError."""
    import time

    deadline = time.monotonic() + timeout
    with create_channel(target, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{target} did not report SERVING within {timeout:.0f}s")
            try:
                # Watch streams status changes, so no polling loop with sleeps.
                for resp in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=remaining):
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _trailers(err: LookalikeError) -> tuple:
    """The trailing metadata an error is answered with: a retry hint for :class:`lookalike.errors.Busy`."""
    return retry_trailers(err.code, str(err), err.retry_after_s) if isinstance(err, Busy) else ()


async def _abort_async(context, method, err: Exception) -> None:
    """Ends a grpc.aio call the way :func:`abort_on_error` does; re-raises what is not an error to report."""
    if isinstance(err, LookalikeError):
        log_failed(log, method.__name__, err.code, err)
        await context.abort(err.code, str(err), trailing_metadata=_trailers(err))
    if isinstance(err, DecodeError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a message inside the request does not parse: {err}")
    if isinstance(err, (grpc.RpcError, asyncio.CancelledError)):
        raise err
    log.exception("internal error in %s", method.__name__, exc_info=err)  # a bug: report it, keep serving
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")


def abort_on_error_async(method):
    """:func:`abort_on_error` for grpc.aio handlers: coroutines, and async generators (server streams; a sync
    stream handler that aborts hangs grpc.aio's stream)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as err:
                await _abort_async(context, method, err)

        return stream

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as err:
            await _abort_async(context, method, err)

    return wrapper


def abort_on_error(method):
    """Servicer-method decorator: typed errors become their status with the message; anything else INTERNAL. The
    server's failures (lookalike.logs.SERVER_ERRORS) are logged, with the call's trace id when it is traced."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except LookalikeError as err:
            log_failed(log, method.__name__, err.code, err)
            if isinstance(err, Busy):
                context.set_trailing_metadata(_trailers(err))
            context.abort(err.code, str(err))
        except DecodeError as err:  # bytes inside a request that should hold a message (a payload)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a message inside the request does not parse: {err}")
        except grpc.RpcError:
            raise
        except Exception as err:  # a bug: report it, keep serving
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")

    return wrapper
