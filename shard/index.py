"""One FAISS index over a shard's slice of one collection, addressed by int64 labels.

Three shapes, chosen from the factory string:
- removable indexes (Flat, PQ, SQ... wrapped in ``IndexIDMap``; IVF natively with a hashtable direct map):
  labels are FAISS ids, removal is ``remove_ids``. ``IndexIDMap`` (8 bytes a vector) rather than ``IndexIDMap2``
  (about 50): reconstructing by label, only needed by Get, scans the id map instead;
- append-only graph indexes (HNSW, which FAISS cannot remove from): FAISS ids are insertion positions, a
  removed position is hidden from searches with an ``IDSelectorBitmap`` and the index is rebuilt once a third of
  it is dead;
- indexes that need training (IVF, PQ) answer exactly from a flat buffer until enough vectors have arrived, then
  train on the buffer and switch over.

Not thread-safe: ``shard.core`` guards writes against searches with a read-write lock.
"""

from __future__ import annotations

import logging
import re

import faiss
import numpy as np

from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument

log = logging.getLogger(__name__)

_FAISS_METRIC = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT, "cosine": faiss.METRIC_INNER_PRODUCT}
# FAISS warns below 39 training points per centroid; PQ codebooks have 2**nbits (256) centroids per sub-quantizer.
# Coarse quantizers are trained on about 100 points per list when that is affordable: centroids from 39 points per
# list give visibly unbalanced lists (longer scans) and lower recall at the same nprobe.
_POINTS_PER_CENTROID = 39
_POINTS_PER_LIST = 100
_MAX_BUFFER = 500_000
_MIN_TRAIN = 1000
# Rebuild an append-only index once this fraction of its positions is dead.
_REBUILD_DEAD_FRACTION = 0.33


def _factory(dim: int, metric: str, spec: str):
    if metric == "hamming":
        return faiss.index_binary_factory(dim, spec)
    return faiss.index_factory(dim, spec, _FAISS_METRIC[metric])


def check_index_spec(dim: int, metric: str, spec: str) -> None:
    """Raises InvalidArgument, with FAISS's reason, when the factory string does not build for dim and metric."""
    try:
        _factory(dim, metric, spec)
    except Exception as err:  # FAISS raises RuntimeError with its C++ message
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise InvalidArgument(f"index {spec!r} cannot be built for dim={dim}, metric={metric}: {reason}") from None


def _is_graph(index) -> bool:
    return isinstance(index, (faiss.IndexHNSW, faiss.IndexBinaryHNSW)) or "HNSW" in type(index).__name__


def train_threshold(spec: str, index) -> int:
    """Vectors needed before an untrained index is trained."""
    n = _MIN_TRAIN
    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexBinary) else (
        index if isinstance(index, faiss.IndexBinaryIVF) else None)
    if ivf is not None:
        n = max(n, _POINTS_PER_CENTROID * ivf.nlist, min(_POINTS_PER_LIST * ivf.nlist, _MAX_BUFFER))
    m = re.search(r"PQ\d+(?:x(\d+))?", spec)
    if m:
        n = max(n, _POINTS_PER_CENTROID * (1 << int(m.group(1) or 8)))
    return n


class VectorIndex:
    """The vectors of one collection on one shard.

    Args:
        coll: the collection (dim, metric, index factory string, search defaults).
    """

    def __init__(self, coll: CollectionConfig):
        self.coll = coll
        self._binary = coll.binary
        self._main = _factory(coll.dim, coll.metric, coll.index)
        self._graph = _is_graph(self._main)
        self._ivf = self._extract_ivf(self._main)
        self.trained = self._main.is_trained
        self.train_size = 0 if self.trained else train_threshold(coll.index, self._main)
        # Until trained: an exact flat buffer keyed by label.
        self._buffer = None if self.trained else self._idmap(self._flat())
        if self.trained:
            self._main = self._prepare_trained(self._main)
        # Append-only (graph) indexes: position -> label (-1 once removed), label -> position.
        self._pos_label = np.empty(0, dtype=np.int64)
        self._label_pos: dict[int, int] = {}
        self._dead = 0
        self._selector = None  # cached IDSelectorBitmap over live positions, with its backing array

    # --- construction helpers -------------------------------------------------------------------------------
    def _flat(self):
        if self._binary:
            return faiss.IndexBinaryFlat(self.coll.dim)
        return faiss.IndexFlat(self.coll.dim, _FAISS_METRIC[self.coll.metric])

    def _idmap(self, index):
        return faiss.IndexBinaryIDMap(index) if self._binary else faiss.IndexIDMap(index)

    @staticmethod
    def _extract_ivf(index):
        if isinstance(index, faiss.IndexBinary):
            return index if isinstance(index, faiss.IndexBinaryIVF) else None
        return faiss.try_extract_index_ivf(index)

    def _prepare_trained(self, index):
        """The trained main index, wrapped so that it takes labels."""
        if self._graph:
            return index  # positions are ids; see _pos_label
        ivf = self._extract_ivf(index)
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by label
            return index
        return self._idmap(index)

    # --- properties ---------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live vectors."""
        if self._buffer is not None:
            return self._buffer.ntotal
        return self._main.ntotal - self._dead

    @property
    def nbytes(self) -> int:
        """Approximate bytes held: codes, ids and index structures."""
        index = self._buffer if self._buffer is not None else self._main
        per = (self.coll.code_size if self._buffer is not None else self._code_size()) + 8
        if self._ivf is not None and self._buffer is None:
            per += 24  # hashtable direct map entry
        elif self._graph and self._buffer is None:
            per += 4 * getattr(getattr(self._main, "hnsw", None), "nb_neighbors", lambda _l: 32)(0)  # level-0 links
        return index.ntotal * per

    def _code_size(self) -> int:
        try:
            return int(self._main.sa_code_size())
        except Exception:
            return self.coll.code_size

    # --- writes -------------------------------------------------------------------------------------------
    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self._binary:
            return np.ascontiguousarray(x, dtype=np.uint8)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.coll.metric == "cosine":
            x = x.copy() if not x.flags.writeable else x
            faiss.normalize_L2(x)
        return x

    def add(self, labels: np.ndarray, x: np.ndarray) -> None:
        """Adds vectors (shape (n, d) float32 or (n, d/8) uint8) under labels (shape (n,) int64, not present)."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        x = self._prepare(x)
        if self._buffer is not None:
            self._buffer.add_with_ids(x, labels)  # training happens apart: see needs_training
            return
        self._add_main(labels, x)

    def _add_main(self, labels: np.ndarray, x: np.ndarray) -> None:
        if not self._graph:
            self._main.add_with_ids(x, labels)
            return
        start = self._main.ntotal
        self._main.add(x)
        self._pos_label = np.concatenate([self._pos_label, labels])
        self._label_pos.update(zip(labels.tolist(), range(start, start + len(labels))))
        self._selector = None

    @property
    def needs_training(self) -> bool:
        """True once the flat buffer holds enough vectors to train the real index."""
        return self._buffer is not None and self._buffer.ntotal >= self.train_size

    def build_trained(self):
        """Trains a new main index on the buffer's vectors and fills it with them.

        Only reads the buffer, so searches may run meanwhile; the caller keeps writes out until
        :meth:`install_trained`. Returns what install_trained takes.
        """
        buf = self._buffer
        labels = faiss.vector_to_array(buf.id_map)
        x = buf.index.reconstruct_n(0, buf.ntotal)
        log.info("training %s index %r on %d vectors", self.coll.name, self.coll.index, len(x))
        main = _factory(self.coll.dim, self.coll.metric, self.coll.index)
        main.train(x)
        main = self._prepare_trained(main)
        if self._graph:  # positions are ids: filled on install
            return main, labels, x
        main.add_with_ids(x, labels)
        return main, None, None

    def install_trained(self, built) -> None:
        """Switches from the buffer to the index built by :meth:`build_trained` (fast: call under the write lock)."""
        main, labels, x = built
        self._main = main
        self._ivf = self._extract_ivf(main)
        self._buffer = None
        self.trained = True
        if labels is not None:
            self._add_main(labels, x)

    def train_if_ready(self) -> bool:
        """Trains and switches over in one step when enough vectors arrived (for callers without concurrency)."""
        if not self.needs_training:
            return False
        self.install_trained(self.build_trained())
        return True

    def remove(self, labels: np.ndarray) -> int:
        """Removes vectors by label; returns how many were removed."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if len(labels) == 0:
            return 0
        if self._buffer is not None:
            return self._buffer.remove_ids(faiss.IDSelectorBatch(labels))
        if self._graph:
            removed = 0
            for lab in labels.tolist():
                pos = self._label_pos.pop(lab, None)
                if pos is not None:
                    self._pos_label[pos] = -1
                    removed += 1
            self._dead += removed
            self._selector = None
            if self._dead > _REBUILD_DEAD_FRACTION * self._main.ntotal:
                self._rebuild_graph()
            return removed
        if self._ivf is not None:
            return self._main.remove_ids(faiss.IDSelectorArray(labels))
        return self._main.remove_ids(faiss.IDSelectorBatch(labels))

    def without(self, labels: np.ndarray):
        """A copy of the main index without ``labels``, for :meth:`install`: built while the original keeps serving
        searches, because removal from flat codes moves every vector after the first one removed. None where removal
        in place is cheap (IVF lists, graphs) or the index is still its training buffer."""
        if self._buffer is not None or self._graph or self._ivf is not None or not len(labels):
            return None
        clone = faiss.clone_index_binary(self._main) if self._binary else faiss.clone_index(self._main)
        clone.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(labels, dtype=np.int64)))
        return clone

    def install(self, main):
        """Swaps in an index from :meth:`without` (the caller holds the write lock). Returns the old one: let it
        go after releasing the lock (freeing it takes time)."""
        old, self._main = self._main, main
        return old

    def _rebuild_graph(self) -> None:
        live = np.flatnonzero(self._pos_label >= 0)
        x = self._reconstruct(self._main, live) if len(live) else None
        labels = self._pos_label[live]
        log.info("rebuilding %s %r without %d removed vectors", self.coll.name, self.coll.index, self._dead)
        self._main = _factory(self.coll.dim, self.coll.metric, self.coll.index)
        self._pos_label = np.empty(0, dtype=np.int64)
        self._label_pos = {}
        self._dead = 0
        self._selector = None
        if x is not None:
            if not self._main.is_trained:  # a graph over compressed codes (HNSW32_PQ16): retrain on what is live
                self._main.train(x)
            self._add_main(labels, x)

    # --- reads --------------------------------------------------------------------------------------------
    def search(self, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """k-NN search.

        Args:
            xq: shape (nq, d) float32 (or (nq, d/8) uint8 for hamming).
            k: neighbours per query.
            nprobe, ef_search: 0 keeps the collection default.

        Returns:
            (D, L): shape (nq, k) float32 distances in the metric's direction (see CollectionConfig), and shape
            (nq, k) int64 labels, -1 where fewer than k vectors exist.
        """
        xq = self._prepare(xq)
        if self._buffer is not None:
            D, L = self._buffer.search(xq, k)
        elif self._graph:
            D, pos = self._search_graph(xq, k, ef_search or self.coll.ef_search)
            L = np.where(pos >= 0, self._pos_label[np.maximum(pos, 0)], -1) if len(self._pos_label) else pos
        elif self._ivf is not None:
            nprobe = nprobe or self.coll.nprobe
            if self._binary:
                self._ivf.nprobe = nprobe  # binary IVF takes no per-call parameters
                D, L = self._main.search(xq, k)
            else:
                D, L = self._main.search(xq, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        else:
            D, L = self._main.search(xq, k)
        return D.astype(np.float32, copy=False), L

    def _search_graph(self, xq, k, ef_search):
        if self._binary:
            self._main.hnsw.efSearch = ef_search
            if self._dead:
                # Binary HNSW takes no selector: over-fetch and filter the dead.
                D, pos = self._main.search(xq, min(self._main.ntotal, k + self._dead))
                return self._drop_dead(D, pos, k)
            return self._main.search(xq, k)
        params = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
        if self._dead:
            if self._selector is None:
                bitmap = np.packbits(self._pos_label >= 0, bitorder="little")
                self._selector = (faiss.IDSelectorBitmap(len(self._pos_label), faiss.swig_ptr(bitmap)), bitmap)
            params.sel = self._selector[0]
        return self._main.search(xq, k, params=params)

    def _drop_dead(self, D, pos, k):
        nq = len(D)
        outD = np.full((nq, k), np.inf, dtype=np.float32)
        outP = np.full((nq, k), -1, dtype=np.int64)
        live = (pos >= 0) & (self._pos_label[np.maximum(pos, 0)] >= 0)
        for q in range(nq):
            keep = np.flatnonzero(live[q])[:k]
            outP[q, :len(keep)] = pos[q, keep]
            outD[q, :len(keep)] = D[q, keep]
        return outD, outP

    def reconstruct(self, labels: np.ndarray) -> np.ndarray:
        """Stored vectors for labels (all present); lossy for compressed indexes, normalised for cosine."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if self._graph and self._buffer is None:
            return self._reconstruct(self._main, np.array([self._label_pos[int(l)] for l in labels], dtype=np.int64))
        if self._ivf is not None and self._buffer is None:
            return self._reconstruct(self._main, labels)  # the direct map finds labels
        idmap = self._buffer if self._buffer is not None else self._main
        id_map = faiss.rev_swig_ptr(idmap.id_map.data(), idmap.id_map.size())  # position -> label, no copy
        order = np.argsort(id_map, kind="stable")
        pos = order[np.searchsorted(id_map, labels, sorter=order)]
        return self._reconstruct(idmap.index, pos)

    def _reconstruct(self, index, keys: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            cols = self.coll.dim // 8 if self._binary else self.coll.dim
            return np.empty((0, cols), dtype=np.uint8 if self._binary else np.float32)
        return np.stack([index.reconstruct(int(key)) for key in keys])
