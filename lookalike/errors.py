"""Typed errors of lookalike, each tied to the gRPC status code it is reported with.

Plain classes (shard, router, controller) raise these; servicers turn them into statuses in one place
(:func:`lookalike.net.abort_on_error`). Clients see the status code and the message unchanged.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2


class LookalikeError(Exception):
    """Base class; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(LookalikeError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LookalikeError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message; we want the sentence as written
        return str(self.args[0]) if self.args else ""


class AlreadyExists(LookalikeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LookalikeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LookalikeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Busy(ResourceExhausted):
    """A refusal that passes: the server holds as much of this kind of work as it takes (a shard's write gate), and
    the same call a moment later may succeed. Sent as RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer (see
    :func:`retry_trailers`); a RESOURCE_EXHAUSTED without one (a full disk, a shard at its capacity) does not pass.

    Args:
        retry_after_s: how long to wait before trying again.
    """

    def __init__(self, message: str, retry_after_s: float = 0.05):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(LookalikeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LookalikeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LookalikeError):
    """The caller cancelled the call, or went away, before it was done."""

    code = grpc.StatusCode.CANCELLED


class StaleShardMap(FailedPrecondition):
    """A shard was asked to write a bucket it does not own: the caller's shard map is out of date."""


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted, Unavailable,
                DeadlineExceeded, Cancelled)
}


def error_for_code(code: grpc.StatusCode, message: str) -> LookalikeError:
    """The typed error for a status code (LookalikeError carrying the code for codes without a class)."""
    cls = _BY_CODE.get(code, LookalikeError)
    exc = cls(message)
    if cls is LookalikeError:
        exc.code = code
    return exc


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def error_for_number(code: int, message: str) -> LookalikeError:
    """:func:`error_for_code` for a status code sent as its number (a shard's failure within a multi-shard answer);
    UNKNOWN for a number gRPC does not have."""
    return error_for_code(_CODES.get(code, grpc.StatusCode.UNKNOWN), message)


def from_rpc_error(err: grpc.RpcError) -> LookalikeError:
    """The typed error for a status received from another server (so the router can pass it through): :class:`Busy`
    for a RESOURCE_EXHAUSTED that carries a ``retry-after-ms`` trailer."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        wait = retry_after_s(err.trailing_metadata() if hasattr(err, "trailing_metadata") else None)
        if wait is not None:
            return Busy(details, wait)
    return error_for_code(code, details)


def retry_after_s(metadata) -> float | None:
    """The ``retry-after-ms`` of trailing metadata, in seconds; None without one (or a malformed one)."""
    for key, value in metadata or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, int(value) / 1000)
            except (TypeError, ValueError):
                return None
    return None


def retry_trailers(code: grpc.StatusCode, message: str, wait_s: float):
    """Trailing metadata of a RESOURCE_EXHAUSTED answer that passes: ``retry-after-ms`` and a google.rpc.Status with
    RetryInfo (what grpc-status's ``rpc_status.from_call`` and other gRPC clients read)."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(wait_s * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    st = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (("retry-after-ms", str(max(1, int(wait_s * 1000)))), ("grpc-status-details-bin", st.SerializeToString()))
