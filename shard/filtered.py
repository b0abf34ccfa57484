"""Filtered search over a :class:`shard.cpu_index.VectorIndex`: the exact top k among a set of labels (the items a
filter matched, from shard.payload_index), with a plan picked by the filter's selectivity (docs/API.md, "The filter
planner"):

- ``empty``: nothing matches;
- ``exact``: few match (at most EXACT_MAX_MATCHES, or under EXACT_MAX_FRACTION of the items): their vectors are
  taken from the index (flat storage, a graph's flat storage, binary codes) and compared with the queries one by one;
- ``selector``: flat indexes and the untrained buffer search with a FAISS ``IDSelectorBatch`` (exact);
- ``selector-ivf nprobe=P``: IVF indexes search with the selector and nprobe raised to nprobe / selectivity (all
  lists below EXACT_MAX_FRACTION: every matching code is compared);
- ``selector-hnsw ef=E``: graphs search with an ``IDSelectorBitmap`` over their positions and efSearch raised to
  efSearch / selectivity, up to MAX_EF_SEARCH; unless comparing the matches costs less (EXACT_BY_COST): the search
  visits about E x the graph's neighbours per node at its base layer, and gathering and comparing a match costs
  about EXACT_MATCH_COST of those visits (measured: 1M x 128 HNSW32 on 4 shards, bench/filter_bench.py: 2,500
  matches a shard answered 32 QPS as selector-hnsw ef=4096 and 88 QPS exact; 25,000 matches 81 QPS as
  selector-hnsw ef=636 and 18 QPS exact).

Answers are tie-ordered by label as unfiltered ones are (shard.index_reads.search_tie_ordered), and their float
distances and IVF lists do not depend on the batch (lookalike.nearest), as unfiltered ones. Searches run on the
CPU index (a GPU mirror takes no selector here).

Uses faiss, numpy, lookalike.nearest and the shard's index modules.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import faiss
import numpy as np

from lookalike.nearest import nearest
from shard.cpu_index import flat_search, search_ivf
from shard.index_reads import reconstruct_idmap, search_tie_ordered
from shard.specs import FAISS_METRIC, FLAT_TYPES

EXACT_MAX_MATCHES = 2048
EXACT_MAX_FRACTION = 0.01
MAX_EF_SEARCH = 4096
EXACT_BY_COST = True  # graphs: compare the matches when that costs less than the search (see the module docstring)
EXACT_MATCH_COST = 8  # a match gathered and compared, in graph visits


class Matches:
    """The labels a filter matched (sorted int64), with the FAISS selectors over them built once and kept while
    the collection does not change (see :class:`MatchCache`)."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels
        self._batch = None
        self._bitmap = None  # (key of the graph it was built for, selector, its bits)
        self._lock = threading.Lock()

    def batch(self):
        """An IDSelectorBatch over the labels."""
        with self._lock:
            if self._batch is None:
                self._batch = faiss.IDSelectorBatch(self.labels)
            return self._batch

    def bitmap(self, vindex):
        """An IDSelectorBitmap over the graph positions of the labels in ``vindex``'s graph."""
        key = (id(vindex._main), vindex._main.ntotal, vindex._labels.dead)
        with self._lock:
            if self._bitmap is None or self._bitmap[0] != key:
                pos, _ = vindex._labels.positions_of(self.labels)
                bits = np.zeros(vindex._main.ntotal, dtype=bool)
                bits[pos] = True
                packed = np.packbits(bits, bitorder="little")
                self._bitmap = (key, faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(packed)), packed)
            return self._bitmap[1]


class MatchCache:
    """The matches of the last ``size`` filters of a collection, while its payload index is at the same version
    (any write changes it): repeated filters (a category page, a load test) resolve and build selectors once."""

    def __init__(self, size: int = 64):
        self.size = size
        self._lock = threading.Lock()
        self._version = None
        self._entries: OrderedDict[bytes, Matches] = OrderedDict()

    def get(self, version: int, filt, resolve) -> Matches:
        """The Matches of ``filt`` at payload-index ``version``; ``resolve()`` gives its labels when not cached."""
        key = filt.SerializeToString(deterministic=True)
        with self._lock:
            if self._version != version:
                self._entries.clear()
                self._version = version
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        m = Matches(resolve())
        with self._lock:
            if self._version == version:
                self._entries[key] = m
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return m


def _empty(nq: int, k: int, larger_is_better: bool):
    worst = -np.finfo(np.float32).max if larger_is_better else np.finfo(np.float32).max
    return np.full((nq, k), worst, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def _flat_rows(flat, pos: np.ndarray, cols: int, binary: bool) -> np.ndarray:
    """Rows ``pos`` of a flat index's storage (float IndexFlat or IndexBinaryFlat), copied."""
    if binary:
        data = faiss.rev_swig_ptr(flat.xb.data(), flat.ntotal * cols)
    else:
        data = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * cols)
    return np.asarray(data).reshape(-1, cols)[pos]


def matching_vectors(vindex, labels: np.ndarray) -> np.ndarray:
    """The vectors the index holds under ``labels`` (sorted, all present), as it holds them (normalized for cosine;
    approximations for compressed codes), shape (len(labels), cols)."""
    cols, binary = vindex._cols, vindex._binary
    main = vindex._buffer if vindex._buffer is not None else vindex._main
    if isinstance(main, (faiss.IndexIDMap, faiss.IndexBinaryIDMap)):
        inner = faiss.downcast_IndexBinary(main.index) if binary else faiss.downcast_index(main.index)
        if type(inner) in FLAT_TYPES or isinstance(inner, faiss.IndexBinaryFlat):
            id_map = faiss.rev_swig_ptr(main.id_map.data(), main.id_map.size())
            order = np.argsort(id_map, kind="stable")
            return _flat_rows(inner, order[np.searchsorted(id_map, labels, sorter=order)], cols, binary)
        return reconstruct_idmap(main, labels, cols, binary)
    if vindex._graph and isinstance(main, faiss.IndexHNSWFlat):
        pos, _ = vindex._labels.positions_of(labels)
        return _flat_rows(faiss.downcast_index(main.storage), pos, cols, binary)
    return vindex.reconstruct(labels)


def _exact(vindex, xq: np.ndarray, k: int, labels: np.ndarray):
    """Top k of xq (prepared) among ``labels``, comparing every one of their vectors."""
    x = matching_vectors(vindex, labels)
    coll = vindex.coll
    flat = faiss.IndexBinaryFlat(coll.dim) if vindex._binary else faiss.IndexFlat(coll.dim, FAISS_METRIC[coll.metric])
    flat.add(np.ascontiguousarray(x))

    def search(q, kk, _coarse):  # float distances whatever the batch, as unfiltered ones (lookalike.nearest)
        D, pos = flat.search(q, kk) if vindex._binary else nearest(flat, q, kk)
        return D.astype(np.float32, copy=False), np.where(pos >= 0, labels[np.maximum(pos, 0)], -1)
    return search_tie_ordered(search, xq, k, len(labels), coll.larger_is_better)


def plan_and_search(vindex, xq: np.ndarray, k: int, matches: Matches, nprobe: int = 0,
                    ef_search: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """The top k among ``matches`` (the items a filter matched) for queries ``xq`` (as given).

    Returns:
        (D, L, plan): shapes (nq, k) as VectorIndex.search gives them (-1 labels past the matches), and the plan
        used, as a short line (see the module docstring).
    """
    coll = vindex.coll
    labels = matches.labels
    xq = vindex._prepare(xq)
    n = max(vindex.ntotal, 1)
    m = len(labels)
    frac = m / n
    note = f"{m}/{vindex.ntotal} match"
    if m == 0:
        D, L = _empty(len(xq), k, coll.larger_is_better)
        return D, L, f"empty ({note})"
    few = m <= EXACT_MAX_MATCHES or frac < EXACT_MAX_FRACTION
    graph = vindex._graph and vindex._buffer is None
    if graph:
        base = ef_search or coll.ef_search
        ef = min(MAX_EF_SEARCH, max(base, k, math.ceil(base / frac)))
        few = few or (EXACT_BY_COST and m * EXACT_MATCH_COST <= ef * vindex._main.hnsw.nb_neighbors(0))
    ivf = vindex._ivf if vindex._buffer is None else None
    if vindex._binary or (few and ivf is None):  # binary indexes here take no selector
        D, L = _exact(vindex, xq, k, labels)
        return D, L, f"exact ({note})"
    if ivf is not None:
        base = nprobe or coll.nprobe
        probe = int(ivf.nlist) if few else min(int(ivf.nlist), max(base, math.ceil(base / frac)))
        member = vindex._member  # in its process's shared lists (shard.list_groups): its entries are tagged
        sel = matches.batch() if member is None else faiss.IDSelectorBatch(member.tagged(labels))

        def search(q, kk, _coarse):  # the queries' lists as unfiltered searches choose them (lookalike.nearest)
            return search_ivf(vindex._main, q, kk, probe, None, member, sel=sel)
        D, L = search_tie_ordered(search, xq, k, m, coll.larger_is_better)
        return D, L, f"selector-ivf nprobe={probe}{' (all lists)' if probe == ivf.nlist else ''} ({note})"
    if graph:
        params = faiss.SearchParametersHNSW(efSearch=ef, sel=matches.bitmap(vindex))

        def search(q, kk, _coarse):
            params.efSearch = max(ef, kk)
            D, P = vindex._main.search(q, kk, params=params)
            return D.astype(np.float32, copy=False), vindex._labels.labels_at(P)
        D, L = search_tie_ordered(search, xq, k, m, coll.larger_is_better)
        return D, L, f"selector-hnsw ef={ef} ({note})"
    main = vindex._buffer if vindex._buffer is not None else vindex._main

    def search(q, kk, _coarse):
        D, L = flat_search(vindex, main, q, kk, matches)
        return D.astype(np.float32, copy=False), L
    D, L = search_tie_ordered(search, xq, k, m, coll.larger_is_better)
    return D, L, f"selector ({note})"
