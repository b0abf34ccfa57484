"""Typed errors of lookalike, each tied to the gRPC status code it is reported with.

Plain classes (shard, router, controller) raise these; servicers turn them into statuses in one place
(:func:`lookalike.net.abort_on_error`). Clients see the status code and the message unchanged.
"""

from __future__ import annotations

import grpc


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


def from_rpc_error(err: grpc.RpcError) -> LookalikeError:
    """The typed error for a status received from another server (so the router can pass it through)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    return error_for_code(code, err.details() if hasattr(err, "details") else str(err))
