"""The records a shard's storage holds (protos/storage.proto), as Python values: a log record (``WalRecord``: an
upsert, a delete, or a RESET of buckets) and a bucket snapshot (``BucketSnapshot``), both read back as a
:class:`Batch`; parsing checks that a record holds together.

Uses numpy, protobuf, the base package (ids, wire) and protos only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from lookalike.errors import InvalidArgument
from lookalike.ids import buckets_of
from lookalike.wire import vectors_from_proto_raw, vectors_to_proto
from protos import storage_pb2

UPSERT = storage_pb2.WalRecord.UPSERT
DELETE = storage_pb2.WalRecord.DELETE
RESET = storage_pb2.WalRecord.RESET
LOAD_BATCH = 16384  # items in a batch of snapshot items read back (see coalesce)


@dataclass
class Batch:
    """One replayed write: ``vectors`` shape (n, cols) and ``payloads`` (serialized Payload or None) for upserts;
    ``buckets`` for a RESET (which has no ids)."""

    op: int
    ids: list[str]
    vectors: np.ndarray | None = None
    payloads: list[bytes | None] | None = None
    buckets: list[int] | None = None


class Invalid(Exception):
    """A frame whose checksum matches but whose record does not parse or is inconsistent. ``end``: where the
    frame ends (its length is trustworthy, so reading goes on there; set by shard.frames)."""

    end = 0


def _concat(batches: list[Batch]) -> Batch:
    """One UPSERT batch of several (of disjoint ids)."""
    if len(batches) == 1:
        return batches[0]
    return Batch(UPSERT, [u for b in batches for u in b.ids], np.concatenate([b.vectors for b in batches]),
                 [p for b in batches for p in b.payloads])


def coalesce(batches, limit: int) -> Iterator[Batch]:
    """UPSERT batches of disjoint ids joined into batches of about ``limit`` items (fewer, cheaper applies)."""
    pending: list[Batch] = []
    items = 0
    for batch in batches:
        pending.append(batch)
        items += len(batch.ids)
        if items >= limit:
            yield _concat(pending)
            pending, items = [], 0
    if pending:
        yield _concat(pending)


def keep_buckets(batch: Batch, buckets: set[int], n_buckets: int) -> Batch:
    """The part of a batch that concerns ``buckets`` (a RESET keeps the buckets it names among them)."""
    if batch.op == RESET:
        return Batch(RESET, [], buckets=[b for b in batch.buckets if b in buckets])
    keep = np.isin(buckets_of(batch.ids, n_buckets), np.fromiter(buckets, dtype=np.int64))
    if keep.all():
        return batch
    idx = np.flatnonzero(keep)
    return Batch(batch.op, [batch.ids[i] for i in idx],
                 batch.vectors[idx] if batch.vectors is not None else None,
                 [batch.payloads[i] for i in idx] if batch.payloads is not None else None)


# --- to and from protobuf -------------------------------------------------------------------------------------
def payloads_to_proto(payloads: list[bytes | None] | None) -> list[bytes]:
    if not payloads or all(p is None for p in payloads):
        return []
    return [p or b"" for p in payloads]


def _payloads_from_proto(msgs, n: int) -> list[bytes | None]:
    if len(msgs) == 0:
        return [None] * n
    return [m or None for m in msgs]


def log_record(op: int, ids: list[str], vectors: np.ndarray | None = None,
               payloads: list[bytes | None] | None = None):
    """The WalRecord of an upsert (with ``vectors`` and ``payloads``) or a delete."""
    rec = storage_pb2.WalRecord(op=op, ids=ids)
    if op == UPSERT:
        rec.vectors.CopyFrom(vectors_to_proto(vectors))
        rec.payloads.extend(payloads_to_proto(payloads))
    return rec


def reset_record(buckets):
    """The WalRecord that empties ``buckets``."""
    return storage_pb2.WalRecord(op=RESET, buckets=sorted(int(b) for b in buckets))


def snapshot_message(bucket: int, ids: list[str], rows: np.ndarray, payloads: list[bytes | None]):
    """The BucketSnapshot of a bucket's items."""
    snap = storage_pb2.BucketSnapshot(bucket=bucket, ids=ids)
    snap.vectors.CopyFrom(vectors_to_proto(rows))
    snap.payloads.extend(payloads_to_proto(payloads))
    return snap


def _vectors(msg, n: int) -> np.ndarray:
    try:
        x = vectors_from_proto_raw(msg)
    except InvalidArgument as err:
        raise Invalid(f"bad vectors ({err})") from None
    if len(x) != n:
        raise Invalid(f"{n} ids but {len(x)} vectors")
    return x


def _payloads(msgs, n: int) -> list[bytes | None]:
    if len(msgs) not in (0, n):
        raise Invalid(f"{n} ids but {len(msgs)} payloads")
    return _payloads_from_proto(msgs, n)


def parse_record(body: bytes) -> Batch:
    """A WAL frame's body as a Batch; raises Invalid if it does not parse or does not hold together."""
    try:
        rec = storage_pb2.WalRecord.FromString(body)
    except DecodeError as err:
        raise Invalid(f"record does not parse ({err})") from None
    ids = list(rec.ids)
    if rec.op == UPSERT:
        return Batch(UPSERT, ids, _vectors(rec.vectors, len(ids)), _payloads(rec.payloads, len(ids)))
    if rec.op == RESET:
        return Batch(RESET, [], buckets=list(rec.buckets))
    if rec.op == DELETE:
        return Batch(DELETE, ids)
    raise Invalid(f"unknown operation {rec.op}")


def parse_snapshot(body: bytes) -> tuple[int, Batch]:
    """(bucket, items) of a snapshot frame's body; raises Invalid if it does not parse or hold together."""
    try:
        snap = storage_pb2.BucketSnapshot.FromString(body)
    except DecodeError as err:
        raise Invalid(f"snapshot does not parse ({err})") from None
    ids = list(snap.ids)
    return snap.bucket, Batch(UPSERT, ids, _vectors(snap.vectors, len(ids)), _payloads(snap.payloads, len(ids)))
