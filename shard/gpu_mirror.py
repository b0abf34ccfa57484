"""The GPU mirrors of a CPU index: what a GPU shard searches (see shard.gpu_keeper, which builds and keeps them).

GPU indexes cannot remove, so removed or replaced vectors stay on the GPU as tombstones that searches over-fetch by
and filter out, until the mirror is rebuilt from the CPU index, the source of truth:

- :class:`IdMirror`: Flat (in segments), IVF-Flat, IVF-PQ and IVF-SQ with a flat coarse quantizer;
- :class:`CagraMirror`: ``CAGRA`` specs (a GPU graph, cuVS; an exact GPU flat index while small).

Uses faiss, numpy and the base package (lookalike.gpu: the backend and the GPU's k limit).
"""

from __future__ import annotations

import faiss
import numpy as np

from lookalike import gpu as gpu_mod
from shard.specs import FAISS_METRIC

# FAISS ids are labels (56 bits, see lookalike.ids) tagged with a generation in bits 56-62, so that a replaced
# vector's old copy (a tombstone) and its new copy differ.
_TAG_SHIFT = 56
_TAG_MASK = (1 << _TAG_SHIFT) - 1
_MAX_TAG = 127
# A Flat/IVF mirror is rebuilt once its tombstones pass 5% of its vectors (at least 1024): they cost GPU memory and a
# little over-fetch, not correctness. A CAGRA mirror is rebuilt once tombstones plus vectors added since its build
# pass 1% (at least 256, at most 1024: its searches over-fetch by every tombstone, within the GPU's k limit).
_MIN_REBUILD = 1024
_REBUILD_FRACTION = 0.05
_CAGRA_MIN_REBUILD = 256
_CAGRA_REBUILD_FRACTION = 0.01
_CAGRA_MAX_PENDING = 1024


def _cagra_rebuild_at(live: int) -> int:
    """Tombstones plus vectors not yet in the graph a CAGRA mirror takes before it is rebuilt."""
    return min(_CAGRA_MAX_PENDING, max(_CAGRA_MIN_REBUILD, int(live * _CAGRA_REBUILD_FRACTION)))


def _worst(larger_is_better: bool) -> np.float32:
    """FAISS's padding distance (the worst float in the metric's direction)."""
    big = np.finfo(np.float32).max
    return np.float32(-big if larger_is_better else big)


def _pad(D: np.ndarray, L: np.ndarray, k: int, worst) -> tuple[np.ndarray, np.ndarray]:
    if D.shape[1] >= k:
        return D, L
    nq, extra = len(D), k - D.shape[1]
    return (np.hstack([D, np.full((nq, extra), worst, dtype=np.float32)]),
            np.hstack([L, np.full((nq, extra), -1, dtype=np.int64)]))


def _first_live(D, ids, live, k, worst):
    """The first k live columns of each row (rows sorted best first), padded with (worst, -1)."""
    D, ids = _pad(D, ids, k, worst)
    if live.shape[1] < D.shape[1]:
        live = np.hstack([live, np.zeros((len(live), D.shape[1] - live.shape[1]), dtype=bool)])
    order = np.argsort(~live, axis=1, kind="stable")[:, :k]
    live = np.take_along_axis(live, order, axis=1)
    return (np.where(live, np.take_along_axis(D, order, axis=1), worst),
            np.where(live, np.take_along_axis(ids, order, axis=1), -1))


class IdMirror:
    """A GPU copy of a Flat or IVF main index.

    Its FAISS ids are labels tagged with a generation (bits 56-62): a label's first copy has tag 0, the copy added
    after it was removed or replaced tag 1, and so on. Removed copies stay on the GPU as tombstones (``dead``,
    tagged ids) that searches filter out: a query's first k live results among the top k' are exactly the CPU
    index's top k. k' is k plus a margin; a query with fewer than k live results among them is searched again with
    k' at the GPU's limit (2048), and if that is still short, on the CPU (``search`` returns which). Adds are
    applied to the mirror as to the CPU index.

    A flat mirror is a list of segments (``IndexIDMap`` over a GPU flat index, up to ``segment`` vectors each): a
    GPU flat index reallocates its whole storage on every add, so adds go to the last segment only and cost at most
    one segment of spare GPU memory. An IVF mirror is one GPU IVF index (its lists grow one by one).
    """

    def __init__(self, backend, parts: list, nlist: int, larger_is_better: bool, per_vector: int, fixed: int,
                 new_segment=None, segment: int = 0):
        self.backend = backend
        self.parts = parts
        self.ntotal = sum(int(p.ntotal) for p in parts)  # copies on the GPU, tombstones included
        self.ivf = nlist > 0
        self.nlist = nlist
        self.larger_is_better = larger_is_better
        self.worst = _worst(larger_is_better)
        self.per_vector = per_vector
        self.fixed = fixed
        self._new_segment = new_segment
        self.segment = segment
        self.gen: dict[int, int] = {}  # label -> tag of its latest copy, where not 0
        self.dead = np.empty(0, dtype=np.int64)  # tombstones: tagged ids, sorted
        self.valid = True

    @property
    def nbytes(self) -> int:
        return self.ntotal * self.per_vector + self.fixed

    def fill(self, xb: np.ndarray, labels: np.ndarray) -> None:
        """Fills a new, empty flat mirror with vectors ``xb`` under ``labels`` (their first copies), one segment
        at a time."""
        for i in range(0, len(labels), self.segment):
            with self.backend.lock:
                self.parts.append(self._new_segment())
                self.parts[-1].add_with_ids(xb[i:i + self.segment], labels[i:i + self.segment])
        self.ntotal = len(labels)

    def _is_dead(self, ids: np.ndarray) -> np.ndarray:
        if not len(self.dead):
            return np.zeros(ids.shape, dtype=bool)
        return self.dead[np.minimum(np.searchsorted(self.dead, ids), len(self.dead) - 1)] == ids

    @property
    def needs_rebuild(self) -> bool:
        live = self.ntotal - len(self.dead)
        return not self.valid or len(self.dead) > max(_MIN_REBUILD, _REBUILD_FRACTION * live)

    def usable(self, k: int, nprobe: int) -> bool:
        return (self.valid and k <= gpu_mod.GPU_MAX_K
                and (not self.ivf or min(nprobe, self.nlist) <= gpu_mod.GPU_MAX_K))

    def _tags(self, labels: np.ndarray) -> np.ndarray:
        if not self.gen:
            return np.zeros(len(labels), dtype=np.int64)
        return np.fromiter((self.gen.get(lab, 0) for lab in labels.tolist()), dtype=np.int64, count=len(labels))

    def add(self, labels: np.ndarray, x: np.ndarray) -> None:
        tags = self._tags(labels)
        if len(self.dead):  # labels whose latest copy is a tombstone get the next tag
            tags += self._is_dead(labels | (tags << _TAG_SHIFT))
        if len(tags) and tags.max() > _MAX_TAG:
            self.valid = False  # a label replaced 128 times between rebuilds: rebuild
            return
        for lab, tag in zip(labels[tags > 0].tolist(), tags[tags > 0].tolist()):
            self.gen[lab] = tag
        ids = labels | (tags << _TAG_SHIFT)
        with self.backend.lock:
            if self.ivf:
                self.parts[0].add_with_ids(x, ids)
            else:
                i = 0
                while i < len(ids):
                    if not self.parts or self.parts[-1].ntotal >= self.segment:
                        self.parts.append(self._new_segment())
                    j = i + min(self.segment - int(self.parts[-1].ntotal), len(ids) - i)
                    self.parts[-1].add_with_ids(x[i:j], ids[i:j])
                    i = j
        self.ntotal += len(labels)

    def remove(self, labels: np.ndarray) -> None:
        ids = np.unique(labels | (self._tags(labels) << _TAG_SHIFT))
        ids = ids[~self._is_dead(ids)]
        self.dead = np.insert(self.dead, np.searchsorted(self.dead, ids), ids)

    def _search_parts(self, xq: np.ndarray, kk: int, nprobe: int):
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist)) if self.ivf else None
        results = []
        with self.backend.lock:
            for part in self.parts:
                n = min(kk, int(part.ntotal))
                if n:
                    D, ids = part.search(xq, n, params=params) if params is not None else part.search(xq, n)
                    results.append(_pad(D, ids, kk, self.worst))
        if len(results) == 1:
            return results[0]
        return faiss.merge_knn_results(np.stack([r[0] for r in results]), np.stack([r[1] for r in results]),
                                       keep_max=self.larger_is_better)

    def _search_live(self, xq: np.ndarray, k: int, kk: int, nprobe: int):
        """Top kk, then the first k live: (D, tagged ids, rows that may miss live results beyond kk)."""
        D, ids = self._search_parts(xq, kk, nprobe)
        live = ids >= 0
        if len(self.dead):
            live &= ~self._is_dead(ids)
        # short: fewer than k live, and the search was cut at kk (not out of candidates: IVF probes a few lists)
        short = (np.flatnonzero((live.sum(axis=1) < k) & (ids[:, -1] >= 0)) if kk < self.ntotal
                 else np.empty(0, dtype=np.int64))
        if kk != k or not live.all():
            D, ids = _first_live(D, ids, live, k, self.worst)
        return D, ids, short

    def search(self, xq: np.ndarray, k: int, nprobe: int, ef_search: int):
        """(D, L, rows to search on the CPU) for queries xq (prepared)."""
        nq, n_dead = len(xq), len(self.dead)
        kk = min(k + min(n_dead, k + 32), self.ntotal, gpu_mod.GPU_MAX_K)
        if kk <= 0 or nq == 0:
            D, L = _pad(np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64), k, self.worst)
            return D, L, np.empty(0, dtype=np.int64)
        D, ids, short = self._search_live(xq, k, kk, nprobe)
        wide = min(self.ntotal, gpu_mod.GPU_MAX_K)
        if len(short) and wide > kk:  # some queries met many tombstones: look further
            D2, ids2, short2 = self._search_live(xq[short], k, wide, nprobe)
            D[short], ids[short] = D2, ids2
            short = short[short2]
        return D, np.where(ids >= 0, ids & _TAG_MASK, -1), short


class CagraMirror:
    """A GPU graph (CAGRA; an exact GPU flat index while the collection is small) over the vectors of a flat main
    index, FAISS ids = positions. CAGRA takes no cheap adds: vectors added since the build sit in a small exact CPU
    index (``delta``) searched alongside; removed positions are tombstones over-fetched by and filtered. Rebuilt
    once tombstones + delta pass the threshold."""

    def __init__(self, backend, base, labels: np.ndarray, graph: bool, dim: int, metric: str,
                 larger_is_better: bool, per_vector: int, ef_search: int):
        self.backend = backend
        self.base = base
        self.graph = graph
        self.pos_label = labels
        self.alive = np.ones(len(labels), dtype=bool)
        self._order = np.argsort(labels, kind="stable")
        self._sorted = labels[self._order]
        self.n_dead = 0
        self.delta = faiss.IndexIDMap(faiss.IndexFlat(dim, FAISS_METRIC[metric]))
        self.delta_labels: set[int] = set()
        self.larger_is_better = larger_is_better
        self.worst = _worst(larger_is_better)
        self.per_vector = per_vector
        self.valid = True

    @property
    def ntotal(self) -> int:
        return len(self.pos_label) + self.delta.ntotal

    @property
    def nbytes(self) -> int:
        return len(self.pos_label) * self.per_vector  # the delta is on the CPU

    @property
    def needs_rebuild(self) -> bool:
        live = len(self.pos_label) - self.n_dead + self.delta.ntotal
        return not self.valid or self.n_dead + self.delta.ntotal > _cagra_rebuild_at(live)

    def usable(self, k: int, nprobe: int) -> bool:
        return self.valid and k + self.n_dead <= gpu_mod.GPU_MAX_K

    def add(self, labels: np.ndarray, x: np.ndarray) -> None:
        self.delta.add_with_ids(x, labels)
        self.delta_labels.update(labels.tolist())

    def remove(self, labels: np.ndarray) -> None:
        in_delta = np.fromiter((lab in self.delta_labels for lab in labels.tolist()), dtype=bool, count=len(labels))
        if in_delta.any():
            gone = labels[in_delta]
            self.delta.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(gone)))
            self.delta_labels.difference_update(gone.tolist())
        rest = labels[~in_delta]
        if len(rest) and len(self._sorted):
            at = np.minimum(np.searchsorted(self._sorted, rest), len(self._sorted) - 1)
            pos = self._order[at[self._sorted[at] == rest]]
            self.n_dead += int(self.alive[pos].sum())
            self.alive[pos] = False
        if self.n_dead > gpu_mod.GPU_MAX_K:
            self.valid = False

    def search(self, xq: np.ndarray, k: int, nprobe: int, ef_search: int):
        nq = len(xq)
        parts_D, parts_L = [], []
        kk = min(k + self.n_dead, len(self.pos_label))
        if kk > 0 and nq:
            params = self.backend.cagra_params(max(ef_search, kk)) if self.graph else None
            with self.backend.lock:
                D, pos = self.base.search(xq, kk, params=params) if params is not None else self.base.search(xq, kk)
            live = (pos >= 0) & self.alive[np.maximum(pos, 0)]
            parts_D.append(np.where(live, D, self.worst))
            parts_L.append(np.where(live, self.pos_label[np.maximum(pos, 0)], -1))
        if self.delta.ntotal and nq:
            D, L = self.delta.search(xq, min(k, self.delta.ntotal))
            parts_D.append(D)
            parts_L.append(L)
        none = np.empty(0, dtype=np.int64)
        if not parts_D:
            return (*_pad(np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64), k, self.worst), none)
        D, L = np.hstack(parts_D), np.hstack(parts_L)
        order = np.argsort(-D if self.larger_is_better else D, axis=1, kind="stable")[:, :k]
        return (*_pad(np.take_along_axis(D, order, axis=1), np.take_along_axis(L, order, axis=1), k, self.worst),
                none)
