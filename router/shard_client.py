"""One shard-client interface, two implementations: in-process (unit tests) and gRPC (the real thing).

Both take the internal request protos. ``call`` returns a future whose ``result()`` gives the response proto or
raises a typed :class:`lookalike.errors.LookalikeError`; ``acall`` is the same call as a coroutine, for the
router's asyncio server (searches), which then waits on no thread at all. ``shard`` names the shard a call is for
(metadata ``lookalike-shard``): a process may hold several (shard.host); one client per process address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from typing import Protocol

import grpc

from lookalike.config import RPC
from lookalike.errors import (Busy, FailedPrecondition, LookalikeError, StaleShardMap, Unavailable, error_for_code,
                              from_rpc_error, retry_after_s)
from lookalike.net import create_aio_channel, create_channel
from lookalike.wire import SHARD_KEY
from protos import shard_pb2_grpc


class ShardClient(Protocol):
    def call(self, method: str, request, timeout: float | None, shard: str = "") -> "concurrent.futures.Future": ...

    async def acall(self, method: str, request, timeout: float | None, shard: str = ""): ...

    def close(self) -> None: ...


# Threads that make blocking shard calls (started on first use). A sync channel's ``future()`` starts a new
# polling thread for every call (about a millisecond each here); blocking calls on long-lived threads do not.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="shard-call")


def _deadline(timeout: float | None) -> float:
    """A shard call's timeout: the caller's, else the default deadline (a shard that hangs fails the call then)."""
    return RPC.default_deadline_s if timeout is None else timeout


def _metadata(shard: str):
    return ((SHARD_KEY, shard),) if shard else None


def _shard_error(exc: LookalikeError) -> LookalikeError:
    """A shard's FAILED_PRECONDITION always means the router's shard map is stale (see protos/shard.proto)."""
    if type(exc) is FailedPrecondition:
        return StaleShardMap(str(exc))
    return exc


class GrpcShardClient:
    def __init__(self, address: str, tls=None):
        self.address = address
        self._tls = tls  # the cluster's mutual TLS (lookalike.security)
        self._channel = create_channel(address, tls)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)
        # event loop -> its asyncio channel and stub (an aio channel belongs to one loop; the router's server has one)
        self._aio: dict[asyncio.AbstractEventLoop, tuple[grpc.aio.Channel, shard_pb2_grpc.ShardStub]] = {}

    def _error(self, err: grpc.RpcError) -> LookalikeError:
        exc = from_rpc_error(err)
        if isinstance(exc, Unavailable):
            exc = Unavailable(f"shard at {self.address} is unavailable: {err.details()}")
        return _shard_error(exc)

    def _blocking(self, method: str, request, timeout: float | None, shard: str):
        try:
            return getattr(self._stub, method)(request, timeout=_deadline(timeout), metadata=_metadata(shard))
        except grpc.RpcError as err:
            raise self._error(err) from None

    def call(self, method: str, request, timeout: float | None, shard: str = ""):
        # in the caller's context: the call's span is a child of the caller's (lookalike.tracing)
        return _POOL.submit(contextvars.copy_context().run, self._blocking, method, request, timeout, shard)

    def _aio_stub(self) -> shard_pb2_grpc.ShardStub:
        """The stub on the running loop's asyncio channel, made on first use."""
        loop = asyncio.get_running_loop()
        entry = self._aio.get(loop)
        if entry is None:
            for old in [lp for lp in list(self._aio) if lp.is_closed()]:
                self._aio.pop(old, None)
            channel = create_aio_channel(self.address, self._tls)
            entry = self._aio[loop] = (channel, shard_pb2_grpc.ShardStub(channel))
        return entry[1]

    async def acall(self, method: str, request, timeout: float | None, shard: str = ""):
        try:
            return await getattr(self._aio_stub(), method)(request, timeout=_deadline(timeout),
                                                           metadata=_metadata(shard))
        except grpc.RpcError as err:
            raise self._error(err) from None

    def close(self) -> None:
        self._channel.close()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, (channel, _) in list(self._aio.items()):
            if loop is current:
                loop.create_task(channel.close())
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(channel.close(), loop)
        self._aio.clear()


class _LocalContext:
    """The slice of grpc.ServicerContext the servicers use, raising typed errors instead of aborting an RPC."""

    def __init__(self):
        self._trailers = ()

    def set_trailing_metadata(self, metadata):
        self._trailers = tuple(metadata)

    def abort(self, code, details):
        wait = retry_after_s(self._trailers) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        raise Busy(details, wait) if wait is not None else _shard_error(error_for_code(code, details))

    def is_active(self):
        return True

    def time_remaining(self):
        return None


class InProcessShardClient:
    """Calls a ShardServicer in this process (no network), through the same servicer code as gRPC."""

    def __init__(self, servicer):
        self._servicer = servicer
        self.address = f"inprocess:{servicer.shard.shard_id}"

    def call(self, method: str, request, timeout: float | None, shard: str = ""):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(getattr(self._servicer, method)(request, _LocalContext()))
        except LookalikeError as err:
            fut.set_exception(err)
        return fut

    async def acall(self, method: str, request, timeout: float | None, shard: str = ""):
        # On a thread, as a real call would be: the shard's work must not hold up the caller's event loop.
        done = await asyncio.wrap_future(_POOL.submit(self.call, method, request, timeout))
        return done.result()  # self.call returns a finished future: its response, or it raises the typed error

    def close(self) -> None:
        pass
