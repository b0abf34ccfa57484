"""Tracing with OpenTelemetry: a span for every call a server answers (the router's public calls, the shards'
calls) and for every call the router makes to a shard, the trace carried from hop to hop in the calls' metadata
(W3C ``traceparent``), by the interceptors of opentelemetry-instrumentation-grpc.

Off unless the process's environment asks for it (:func:`setup`, with the standard ``OTEL_*`` variables); an
application that embeds lookalike may instead install its own global tracer provider. While no tracer provider is
installed, lookalike.net's factories add no interceptor: a call costs nothing more than it did without tracing.
The interceptors are chosen when a server or channel is built, so tracing is set up before them.

Uses opentelemetry-api; the SDK, the exporters and the gRPC instrumentation are imported only when tracing is on.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os

import grpc
from opentelemetry import trace

log = logging.getLogger(__name__)

# Calls that get no span: Kubernetes' probes and tools (grpcurl) would fill traces with them.
_UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def enabled() -> bool:
    """Whether a tracer provider is installed in this process (by :func:`setup`, or by an embedding application)."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def exporters_requested(environ=None) -> list[str]:
    """The span exporters the environment asks for, by their entry-point names ("otlp", "console", ...).

    ``OTEL_TRACES_EXPORTER`` (comma-separated; "none": none); without it, "otlp" when an OTLP endpoint is set
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); else none: tracing stays off (the
    OpenTelemetry default of "otlp" would send spans to localhost:4317 from every process that never asked).
    ``OTEL_SDK_DISABLED=true`` turns tracing off whatever else is set.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    if "none" in names:
        return []
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol.strip().lower().startswith("http"):  # http/protobuf: the OTLP exporter over HTTP
        names = ["otlp_proto_http" if n == "otlp" else n for n in names]
    return names


def _exporter_class(name: str):
    found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        known = sorted(e.name for e in importlib.metadata.entry_points(group="opentelemetry_traces_exporter"))
        raise ValueError(f"OTEL_TRACES_EXPORTER names the span exporter {name!r}, which no installed package "
                         f"provides (installed: {', '.join(known) or 'none'})")
    return next(iter(found)).load()


def setup(service_name: str, environ=None) -> bool:
    """Installs the global tracer provider the ``OTEL_*`` environment describes, once per process; True when
    tracing is on. Nothing happens (False) when the environment asks for no exporter (see
    :func:`exporters_requested`), and nothing more when a provider is already installed.

    The SDK reads the rest of the standard variables itself: ``OTEL_SERVICE_NAME`` (default ``service_name``) and
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_OTLP_*``
    (endpoint, headers, certificate, timeout), ``OTEL_BSP_*`` (the batching of exports), ``OTEL_PROPAGATORS``.

    Raises:
        ValueError: an exporter is named that no installed package provides (the message says which).
    """
    names = exporters_requested(environ)
    if not names:
        return False
    exporters = [_exporter_class(n) for n in names]
    if enabled():
        return True
    # Heavy (about 50 ms to import), and needed only when tracing is on.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    env = os.environ if environ is None else environ
    provider = TracerProvider(resource=Resource.create({} if env.get("OTEL_SERVICE_NAME")
                                                       else {SERVICE_NAME: service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing on: spans of %s go to %s", service_name, ", ".join(names))
    return True


def flush(timeout_s: float = 5.0) -> None:
    """Exports the spans still buffered (before a process stops); nothing when tracing is off."""
    provider = trace.get_tracer_provider()
    if enabled() and hasattr(provider, "force_flush"):
        provider.force_flush(int(timeout_s * 1000))


def annotate(**attributes) -> None:
    """Sets ``lookalike.<name>`` attributes on the current span (collection, nq, k, coverage...); nothing when no
    span records (tracing off, or a call the sampler left out)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"lookalike.{k}": v for k, v in attributes.items()})


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, as tracing backends show them; None without one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def _traced(details) -> bool:
    method = getattr(details, "method", None) or getattr(details, "full_method", "") or ""
    if isinstance(method, bytes):  # grpc.aio's client call details
        method = method.decode()
    return not method.startswith(_UNTRACED)


# --- the hooks of lookalike.net's factories --------------------------------------------------------------------
def server_interceptors() -> list:
    """Interceptors of a sync ``grpc.server``: a SERVER span per call, its parent read from the call's metadata."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor  # heavy; only when tracing is on

    return [server_interceptor(filter_=_traced)]


def aio_server_interceptors() -> list:
    """:func:`server_interceptors` for a ``grpc.aio`` server (put first: refused calls get their span too)."""
    return [_AioServerTracing()] if enabled() else []


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with a CLIENT span per call, the trace sent in its metadata; ``channel`` itself when off."""
    if not enabled():
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor  # heavy; only when tracing is on
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor(filter_=_traced))


def aio_client_interceptors() -> list:
    """Interceptors of a ``grpc.aio`` channel, as :func:`traced_channel`."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors as made  # heavy; only when tracing is on

    return made(filter_=_traced)


class _AioServerTracing(grpc.aio.ServerInterceptor):
    """The instrumentation's grpc.aio server interceptor for coroutine handlers, and its sync one for the plain
    handlers a grpc.aio server runs on its threads (the aio interceptor awaits every handler, which a plain one is
    not: its calls would fail)."""

    def __init__(self):
        from opentelemetry.instrumentation.grpc import (aio_server_interceptor,  # heavy; only when tracing is on
                                                        server_interceptor)

        self._aio = aio_server_interceptor(filter_=_traced)
        self._sync = server_interceptor(filter_=_traced)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
            async def found(_details):
                return handler

            return await self._aio.intercept_service(found, handler_call_details)
        return self._sync.intercept_service(lambda _details: handler, handler_call_details)
