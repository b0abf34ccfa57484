"""Ids: user ids (strings) to buckets and to internal int64 labels.

An item's bucket is a stable hash of its id modulo the bucket count. Its internal label carries the bucket in the
high bits (``bucket << LABEL_SHIFT``), so one bucket's vectors are one contiguous label range, removable from a
FAISS index with a single ``IDSelectorRange``; the low bits are another part of the same hash, so the same item
has the same label on every shard that holds it (the router de-duplicates on labels). Two ids of one bucket that
hash alike are told apart by probing the next labels (see shard.idtable.IdTable).
"""

from __future__ import annotations

import hashlib

import numpy as np

from lookalike.config import LIMITS
from lookalike.errors import InvalidArgument

LABEL_SHIFT = 40
LABEL_MASK = (1 << LABEL_SHIFT) - 1


def hash64(uid: str) -> int:
    """64-bit stable hash of an id (BLAKE2b); the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest(), "little")


def buckets_and_labels(uids: list[str], n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Buckets (shape (n,), int64) and home labels (shape (n,), int64) of a list of ids."""
    h = np.fromiter((hash64(u) for u in uids), dtype=np.uint64, count=len(uids))
    buckets = (h % np.uint64(n_buckets)).astype(np.int64)
    labels = (buckets << LABEL_SHIFT) | ((h >> np.uint64(24)) & np.uint64(LABEL_MASK)).astype(np.int64)
    return buckets, labels


def buckets_of(uids: list[str], n_buckets: int) -> np.ndarray:
    return buckets_and_labels(uids, n_buckets)[0]


def bucket_of_labels(labels: np.ndarray) -> np.ndarray:
    return labels >> LABEL_SHIFT


def check_ids(uids, max_batch: int = LIMITS.max_batch, unique: bool = True) -> list[str]:
    """Validates a batch of ids.

    Raises:
        InvalidArgument: empty batch, too many ids, an empty or too long id, or a repeated id.
    """
    uids = list(uids)
    if not uids:
        raise InvalidArgument("the request has no ids: send at least one")
    if len(uids) > max_batch:
        raise InvalidArgument(f"the request has {len(uids)} ids; at most {max_batch} per request")
    for u in uids:
        if not u:
            raise InvalidArgument("ids must not be empty")
        if "\x00" in u:
            raise InvalidArgument(f"id {u[:40]!r} contains a NUL character; ids are text without NUL")
        if len(u) > LIMITS.max_id_bytes // 4 and len(u.encode("utf-8")) > LIMITS.max_id_bytes:
            raise InvalidArgument(
                f"id {u[:40]!r}... is {len(u.encode('utf-8'))} bytes; ids are at most {LIMITS.max_id_bytes} bytes")
    if unique and len(set(uids)) != len(uids):
        seen, dup = set(), None
        for u in uids:
            if u in seen:
                dup = u
                break
            seen.add(u)
        raise InvalidArgument(f"id {dup!r} appears more than once in the request")
    return uids


_NO_LABEL = np.iinfo(np.int64).max


def order_by_distance_then_label(D: np.ndarray, L: np.ndarray, larger_is_better: bool) -> np.ndarray:
    """Per row, the column order best first, equal distances by increasing label, padding (label -1) last.

    Args:
        D: shape (nq, n) distances; L: shape (nq, n) int64 labels, -1 for padding.
    """
    pad = L < 0
    key = np.where(pad, np.inf, -D.astype(np.float64) if larger_is_better else D.astype(np.float64))
    return np.lexsort((np.where(pad, _NO_LABEL, L), key), axis=1)
