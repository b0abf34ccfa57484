"""The one merge of per-shard top-k lists: FAISS's merge_knn_results, with de-duplication by label."""

from __future__ import annotations

import faiss
import numpy as np


def merge_topk(D: np.ndarray, L: np.ndarray, larger_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merges S shards' sorted top-k lists into one top-k per query.

    Args:
        D: shape (S, nq, k) float32 distances, each row sorted best first (padding: the worst float).
        L: shape (S, nq, k) int64 labels, -1 for padding. The same item has the same label on every shard;
            copies (a bucket held twice during a move) are kept once.
        larger_is_better: True for similarities (ip, cosine), False for distances (l2, hamming).

    Returns:
        (D, I): shape (nq, k) merged distances, and shape (nq, k) int64 indexes into the flattened (S, nq, k)
        inputs (-1 where there are fewer than k results).
    """
    S, nq, k = D.shape
    flat = np.arange(S * nq * k, dtype=np.int64).reshape(S, nq, k)
    I = np.where(L >= 0, flat, -1)
    if S > 1:
        D, I = _drop_copies(D, L, I, larger_is_better)
    Dm, Im = faiss.merge_knn_results(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I),
                                     keep_max=larger_is_better)
    return Dm, Im


def _drop_copies(D, L, I, larger_is_better):
    """Turns every copy of a label after its first occurrence (per query) into padding, keeping rows sorted."""
    S, nq, k = L.shape
    per_query = L.transpose(1, 0, 2).reshape(nq, S * k)
    order = np.argsort(per_query, axis=1, kind="stable")
    srt = np.take_along_axis(per_query, order, axis=1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if not dup_sorted.any():
        return D, I
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    dup = dup.reshape(nq, S, k).transpose(1, 0, 2)
    worst = np.float32(-np.finfo(np.float32).max if larger_is_better else np.finfo(np.float32).max)
    D = np.where(dup, worst, D)
    I = np.where(dup, -1, I)
    # padding moved into the middle of a row: re-sort each row best first (stable keeps ties in shard order)
    key = -D if larger_is_better else D
    o = np.argsort(key, axis=2, kind="stable")
    return np.take_along_axis(D, o, axis=2), np.take_along_axis(I, o, axis=2)
