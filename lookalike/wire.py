"""Conversions between numpy arrays and protobuf messages, with validation at the boundary.

Kept in one place so servicers and the client never hand-roll them.
"""

from __future__ import annotations

import numpy as np

from lookalike.config import LIMITS, CollectionConfig
from lookalike.errors import InvalidArgument
from lookalike.payloads import canonical
from protos import common_pb2

# gRPC metadata of a call to a shard process: the shard it is for (a process may hold several: shard.host).
SHARD_KEY = "lookalike-shard"

_DTYPES = {common_pb2.Vectors.FLOAT32: np.dtype("<f4"), common_pb2.Vectors.UINT8: np.dtype("u1")}


def vectors_to_proto(x: np.ndarray) -> common_pb2.Vectors:
    """A (n, d) float32 or uint8 array as a packed ``Vectors`` message."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.dtype == np.uint8:
        dtype = common_pb2.Vectors.UINT8
    else:
        x = x.astype("<f4", copy=False)
        dtype = common_pb2.Vectors.FLOAT32
    x = np.ascontiguousarray(x)
    return common_pb2.Vectors(data=x.tobytes(), rows=x.shape[0], dim=x.shape[1], dtype=dtype)


def vectors_from_proto_raw(msg: common_pb2.Vectors) -> np.ndarray:
    """The array in a ``Vectors`` message, shape (rows, dim), without collection checks.

    Raises:
        InvalidArgument: unknown dtype or a data length that does not match rows * dim.
    """
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(f"unknown vector dtype {msg.dtype}")
    expected = msg.rows * msg.dim * dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"vector data is {len(msg.data)} bytes but rows={msg.rows} x dim={msg.dim} of "
            f"{'float32' if dtype.itemsize == 4 else 'uint8'} needs {expected}")
    return np.frombuffer(msg.data, dtype=dtype).reshape(msg.rows, msg.dim)


# ||a - b||^2 <= 4 max(||a||^2, ||b||^2) and |a . b| <= ||a|| ||b||: with every squared length at most FLT_MAX / 4 no
# distance between two vectors overflows float32. Past it, distances are inf, and FAISS's k-means (IVF training,
# `lookalike cluster`) aborts the whole process on the assignments that gives.
MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4


def squared_norms_in_range(x: np.ndarray) -> np.ndarray:
    """Rows of float vectors x (shape (n, d)) whose squared length is at most MAX_SQUARED_NORM (False for a row
    with NaN or Inf), shape (n,) bool."""
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    return sq <= MAX_SQUARED_NORM


def vectors_from_proto(msg: common_pb2.Vectors, coll: CollectionConfig, what: str = "vectors",
                       max_rows: int = LIMITS.max_batch) -> np.ndarray:
    """The vectors of a request, checked against the collection.

    Returns:
        shape (n, dim) float32, or (n, dim/8) uint8 for hamming collections; read-only view of the message.

    Raises:
        InvalidArgument: no rows, too many rows, wrong dtype or dimension, NaN/Inf, a row so long that distances
            to it overflow (see MAX_SQUARED_NORM), or a zero vector for cosine.
    """
    if msg.rows == 0:
        raise InvalidArgument(f"the request has no {what}: send at least one row")
    if msg.rows > max_rows:
        raise InvalidArgument(f"the request has {msg.rows} {what}; at most {max_rows} per request")
    if coll.binary:
        if msg.dtype != common_pb2.Vectors.UINT8:
            raise InvalidArgument(
                f"collection {coll.name!r} holds binary codes (hamming): send {what} as UINT8 bytes, not float32")
        if msg.dim != coll.dim // 8:
            raise InvalidArgument(
                f"collection {coll.name!r} has {coll.dim}-bit codes ({coll.dim // 8} bytes) but the {what} have "
                f"{msg.dim} bytes ({msg.dim * 8} bits)")
        return vectors_from_proto_raw(msg)
    if msg.dtype != common_pb2.Vectors.FLOAT32:
        raise InvalidArgument(f"collection {coll.name!r} holds float32 vectors: send {what} as FLOAT32")
    if msg.dim != coll.dim:
        raise InvalidArgument(f"collection {coll.name!r} has dimension {coll.dim} but the {what} have dimension {msg.dim}")
    x = vectors_from_proto_raw(msg)
    ok = squared_norms_in_range(x)  # also false for a row holding NaN or Inf
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        if not np.isfinite(x[row]).all():
            raise InvalidArgument(f"{what} row {row} contains NaN or Inf; every component must be a finite number")
        raise InvalidArgument(
            f"{what} row {row} is too long: its squared length passes {MAX_SQUARED_NORM:.3g}, past which distances "
            "overflow float32; scale the vectors down (a length of at most 9.2e18)")
    if coll.metric == "cosine":
        zero = ~x.any(axis=1)
        if zero.any():
            raise InvalidArgument(
                f"{what} row {int(np.flatnonzero(zero)[0])} is all zeros; cosine similarity needs a non-zero vector")
    return x


def payloads_from_proto(payloads, n: int, schema: dict[str, str] | None = None,
                        ids: list[str] | None = None) -> list[bytes | None]:
    """Serialized payloads aligned with n items (None where empty), in their stored form (lookalike.payloads.canonical,
    with the collection's declared ``schema``).

    Raises:
        InvalidArgument: a count that is neither 0 nor n, a payload over the size limit, or one that does not fit
            its declared types (naming the item, from ``ids``, and the field).
    """
    check_payloads(payloads, n)
    if len(payloads) == 0:
        return [None] * n
    ids = ids or [""] * n
    return [canonical(p, schema, uid).SerializeToString(deterministic=True) if p.fields or p.values else None
            for p, uid in zip(payloads, ids)]


def check_payloads(payloads, n: int) -> None:
    """Raises InvalidArgument for a payload count that is neither 0 nor n, or a payload over the size limit."""
    if len(payloads) not in (0, n):
        raise InvalidArgument(f"the request has {n} ids but {len(payloads)} payloads: send none or one per id")
    for i, p in enumerate(payloads):
        size = p.ByteSize()
        if size > LIMITS.max_payload_bytes:
            raise InvalidArgument(
                f"payload of item {i} is {size} bytes; payloads are at most {LIMITS.max_payload_bytes} bytes")


_EMPTY = common_pb2.Payload()


def payload_from_bytes(b: bytes | None) -> common_pb2.Payload:
    if not b:
        return _EMPTY
    return common_pb2.Payload.FromString(b)


def check_k(k: int, max_k: int = LIMITS.max_k) -> None:
    """Raises InvalidArgument unless 1 <= k <= max_k."""
    if not 1 <= k <= max_k:
        raise InvalidArgument(f"k must be between 1 and {max_k}, got {k}")
