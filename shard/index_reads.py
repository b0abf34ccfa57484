"""Reads of a VectorIndex (shard.cpu_index) that do not change it: searches whose equal distances come in label
order, and the stored vectors of labels.

Ties: FAISS returns equal distances (pHash duplicates) in the order it met them, which depends on where a vector
sits in a shard's index. :func:`search_tie_ordered` orders them by label and, where a group of equal distances
crosses the k-th place, searches deeper to keep the group's smallest labels, so every shard or replica holding the
same vectors answers the same.

Uses faiss, numpy and the base package (lookalike.ids) only.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from lookalike.ids import order_by_distance_then_label

# A group of equal distances (pHash duplicates) crossing the k-th place is searched up to this many results deep
# to find its smallest labels; past that, the cut follows FAISS's order.
_MAX_TIE_FETCH = 4096


def tie_order(D: np.ndarray, L: np.ndarray, larger_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows re-ordered so that equal distances come in increasing label order."""
    if D.shape[1] < 2:
        return D, L
    tied = np.flatnonzero(((D[:, 1:] == D[:, :-1]) & (L[:, 1:] >= 0)).any(axis=1))
    if len(tied):
        D, L = D.copy(), L.copy()
        order = order_by_distance_then_label(D[tied], L[tied], larger_is_better)
        D[tied] = np.take_along_axis(D[tied], order, axis=1)
        L[tied] = np.take_along_axis(L[tied], order, axis=1)
    return D, L


def search_tie_ordered(search: Callable, xq: np.ndarray, k: int, n: int, larger_is_better: bool,
                       coarse=None) -> tuple[np.ndarray, np.ndarray]:
    """The top k of ``search(xq, k, coarse)`` (an index of ``n`` live vectors) with ties in label order, and a
    group of equal distances cut at the k-th place keeping its smallest labels (up to ``_MAX_TIE_FETCH`` results
    deep). ``coarse``: (lists, distances) of the queries' IVF lists, or None; passed on row by row."""
    if k >= n:  # every live vector fits: nothing is cut at the k-th place
        D, L = search(xq, k, coarse)
        return tie_order(D, L, larger_is_better)
    # One more than asked shows whether a group of equal distances crosses the cut; such rows look further.
    D, L = search(xq, k + 1, coarse)
    rows = np.flatnonzero((L[:, k] >= 0) & (D[:, k] == D[:, k - 1]))
    D, L = tie_order(D[:, :k], L[:, :k], larger_is_better)
    kk = k + 1
    while len(rows) and kk < min(n, _MAX_TIE_FETCH):
        kk = min(n, _MAX_TIE_FETCH, max(4 * kk, 64))
        D2, L2 = search(xq[rows], kk, None if coarse is None else (coarse[0][rows], coarse[1][rows]))
        D2o, L2o = tie_order(D2, L2, larger_is_better)
        D[rows], L[rows] = D2o[:, :k], L2o[:, :k]
        rows = rows[(L2[:, -1] >= 0) & (D2[:, -1] == D2[:, k - 1])]
    return D, L


def reconstruct_keys(index, keys: np.ndarray, cols: int, binary: bool) -> np.ndarray:
    """The vectors FAISS ``index`` holds under ``keys`` (its own ids), shape (len(keys), cols)."""
    if len(keys) == 0:
        return np.empty((0, cols), dtype=np.uint8 if binary else np.float32)
    return np.stack([index.reconstruct(int(key)) for key in keys])


def reconstruct_idmap(idmap, labels: np.ndarray, cols: int, binary: bool) -> np.ndarray:
    """The vectors of ``labels`` (all present) in an ``IndexIDMap`` (or its binary kind)."""
    id_map = faiss.rev_swig_ptr(idmap.id_map.data(), idmap.id_map.size())  # position -> label, no copy
    if not len(labels):
        return reconstruct_keys(idmap.index, labels, cols, binary)
    # Only the positions whose label lies in the labels' range are sorted: for a page of one bucket (its labels
    # share their high bits) that is the bucket, not the whole index.
    near = np.flatnonzero((id_map >= labels.min()) & (id_map <= labels.max()))
    order = np.argsort(id_map[near], kind="stable")
    pos = near[order[np.searchsorted(id_map[near], labels, sorter=order)]]
    return reconstruct_keys(idmap.index, pos, cols, binary)


def reconstruct_ivf(main, ivf, labels: np.ndarray, dim: int, binary: bool) -> np.ndarray:
    """Reconstructs from the lists of ``ivf`` (inside ``main``), found by scanning every list's ids (there is no
    direct map): O(vectors), for the few callers that want the index's own (possibly lossy) copy; Get and Scan
    read storage."""
    if not len(labels):
        return reconstruct_keys(main, labels, dim // 8 if binary else dim, binary)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    ids = np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(i), int(s)) for i, s in enumerate(sizes) if s]
                         or [np.empty(0, dtype=np.int64)])
    order = np.argsort(ids, kind="stable")
    at = order[np.minimum(np.searchsorted(ids, labels, sorter=order), max(len(ids) - 1, 0))]
    assert len(ids) and (ids[at] == labels).all(), "reconstruct of labels not in the index"
    list_no = np.repeat(np.arange(ivf.nlist, dtype=np.int64), sizes)[at]
    offset = at - (np.cumsum(sizes) - sizes)[list_no]
    cols = dim // 8 if binary else ivf.d
    out = np.empty((len(labels), cols), dtype=np.uint8 if binary else np.float32)
    for row, (lst, off) in enumerate(zip(list_no.tolist(), offset.tolist())):
        ivf.reconstruct_from_offset(lst, off, faiss.swig_ptr(out[row]))
    if isinstance(main, faiss.IndexPreTransform):  # back through PCA / OPQ
        x = np.empty((len(labels), dim), dtype=np.float32)
        main.reverse_chain(len(labels), faiss.swig_ptr(out), faiss.swig_ptr(x))
        out = x
    return out
