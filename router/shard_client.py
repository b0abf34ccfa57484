"""One shard-client interface, two implementations: in-process (unit tests) and gRPC (the real thing).

Both take the internal request protos and return a future whose ``result()`` gives the response proto or
raises a typed :class:`lookalike.errors.LookalikeError`.
"""

from __future__ import annotations

import concurrent.futures
from typing import Protocol

import grpc

from lookalike.errors import (FailedPrecondition, LookalikeError, StaleShardMap, Unavailable, error_for_code,
                              from_rpc_error)
from lookalike.net import create_channel
from protos import shard_pb2_grpc


class ShardClient(Protocol):
    def call(self, method: str, request, timeout: float | None) -> "concurrent.futures.Future": ...

    def close(self) -> None: ...


# Threads that make blocking shard calls (started on first use). A sync channel's ``future()`` starts a new
# polling thread for every call (about a millisecond each here); blocking calls on long-lived threads do not.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="shard-call")


def _shard_error(exc: LookalikeError) -> LookalikeError:
    """A shard's FAILED_PRECONDITION always means the router's shard map is stale (see protos/shard.proto)."""
    if type(exc) is FailedPrecondition:
        return StaleShardMap(str(exc))
    return exc


class GrpcShardClient:
    def __init__(self, address: str, tls=None):
        self.address = address
        self._channel = create_channel(address, tls)  # tls: the cluster's mutual TLS (lookalike.security)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)

    def _blocking(self, method: str, request, timeout: float | None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as err:
            exc = from_rpc_error(err)
            if isinstance(exc, Unavailable):
                exc = Unavailable(f"shard at {self.address} is unavailable: {err.details()}")
            raise _shard_error(exc) from None

    def call(self, method: str, request, timeout: float | None):
        return _POOL.submit(self._blocking, method, request, timeout)

    def close(self) -> None:
        self._channel.close()


class _LocalContext:
    """The slice of grpc.ServicerContext the servicers use, raising typed errors instead of aborting an RPC."""

    def abort(self, code, details):
        raise _shard_error(error_for_code(code, details))

    def is_active(self):
        return True

    def time_remaining(self):
        return None


class InProcessShardClient:
    """Calls a ShardServicer in this process (no network), through the same servicer code as gRPC."""

    def __init__(self, servicer):
        self._servicer = servicer
        self.address = f"inprocess:{servicer.shard.shard_id}"

    def call(self, method: str, request, timeout: float | None):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(getattr(self._servicer, method)(request, _LocalContext()))
        except LookalikeError as err:
            fut.set_exception(err)
        return fut

    def close(self) -> None:
        pass
