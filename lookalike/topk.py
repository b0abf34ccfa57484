"""The one merge of per-shard top-k lists: best first, ties broken by label, copies of a label kept once.

Ties are broken by label (the int64 an id hashes to, the same on every shard and replica: see lookalike.ids), not
by the order the shards answered in: the same query on the same data returns the same ids in the same order
whichever shards or replicas answer. Each shard does the same inside its own top-k (shard.cpu_index
``VectorIndex.search``), so a tie group cut at the k-th place is cut the same way everywhere.

The router merges the answers of the shard processes it called (router.search); a process holding several shards
(shard.host) merges theirs first, the same way. Uses lookalike.ids.
"""

from __future__ import annotations

import numpy as np

from lookalike.ids import order_by_distance_then_label


def merge_topk(D: np.ndarray, L: np.ndarray, larger_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merges S shards' top-k lists into one top-k per query.

    Args:
        D: shape (S, nq, k) float32 distances (padding: the worst float).
        L: shape (S, nq, k) int64 labels, -1 for padding. The same item has the same label on every shard;
            copies (a bucket held twice during a move) are kept once, at their best place.
        larger_is_better: True for similarities (ip, cosine), False for distances (l2, hamming).

    Returns:
        (D, I): shape (nq, k) merged distances, and shape (nq, k) int64 indexes into the flattened (S, nq, k)
        inputs (-1 where there are fewer than k results). Equal distances come in increasing label order.
    """
    S, nq, k = D.shape
    flat_i = np.arange(S * nq * k, dtype=np.int64).reshape(S, nq, k).transpose(1, 0, 2).reshape(nq, S * k)
    rows_d = D.transpose(1, 0, 2).reshape(nq, S * k)
    rows_l = L.transpose(1, 0, 2).reshape(nq, S * k)
    order = order_by_distance_then_label(rows_d, rows_l, larger_is_better)
    od = np.take_along_axis(rows_d, order, axis=1)
    ol = np.take_along_axis(rows_l, order, axis=1)
    oi = np.take_along_axis(flat_i, order, axis=1)
    keep = ol >= 0
    if S > 1:  # a label's later copies (in rank order) are dropped
        by_label = np.argsort(ol, axis=1, kind="stable")
        sl = np.take_along_axis(ol, by_label, axis=1)
        dup_sorted = np.zeros(sl.shape, dtype=bool)
        dup_sorted[:, 1:] = (sl[:, 1:] == sl[:, :-1]) & (sl[:, 1:] >= 0)
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, by_label, dup_sorted, axis=1)
        keep &= ~dup
    first = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, first, axis=1)
    worst = np.float32(-np.finfo(np.float32).max if larger_is_better else np.finfo(np.float32).max)
    Dm = np.where(kept, np.take_along_axis(od, first, axis=1), worst).astype(np.float32, copy=False)
    Im = np.where(kept, np.take_along_axis(oi, first, axis=1), -1)
    return Dm, Im
