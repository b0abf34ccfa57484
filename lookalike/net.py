"""The one factory for gRPC servers and the one for channels, so TLS and authentication are added in one place.

Every server gets grpc.health.v1 and server reflection; servicer methods wrap their body with
:func:`abort_on_error` to turn typed errors into statuses.
"""

from __future__ import annotations

import functools
import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lookalike.config import LIMITS
from lookalike.errors import LookalikeError

log = logging.getLogger(__name__)

_OPTIONS = [
    ("grpc.max_send_message_length", LIMITS.max_message_bytes),
    ("grpc.max_receive_message_length", LIMITS.max_message_bytes),
    ("grpc.so_reuseport", 0),
]


def create_server(address: str, register, service_names: list[str], max_workers: int = 16):
    """Builds and starts a gRPC server with health and reflection.

    Args:
        address: "host:port"; port 0 picks a free port.
        register: callable(server) that adds the application servicers.
        service_names: full names of the services added (for health and reflection).
        max_workers: threads serving calls.

    Returns:
        (server, port, health_servicer): the started server, the bound port, and the health servicer whose
        status starts NOT_SERVING for every service; call ``set_serving`` when ready.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=_OPTIONS)
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    server.start()
    return server, port, health_servicer


def set_serving(health_servicer, service_names: list[str], serving: bool = True) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        health_servicer.set(name, status)


def create_channel(target: str) -> grpc.Channel:
    """A channel to a lookalike server (router or shard) with the project's message limits."""
    return grpc.insecure_channel(target, options=_OPTIONS)


def create_aio_channel(target: str) -> grpc.aio.Channel:
    """An asyncio channel to a lookalike server, with the same options as :func:`create_channel`."""
    return grpc.aio.insecure_channel(target, options=_OPTIONS)


def wait_for_serving(target: str, timeout: float = 30.0, service: str = "") -> None:
    """Blocks until the server at ``target`` reports SERVING on health, or raises TimeoutError."""
    import time

    deadline = time.monotonic() + timeout
    with create_channel(target) as ch:
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


def abort_on_error(method):
    """Servicer-method decorator: typed errors become their status with the message; anything else INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except LookalikeError as err:
            context.abort(err.code, str(err))
        except grpc.RpcError:
            raise
        except Exception as err:  # a bug: report it, keep serving
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")

    return wrapper
