"""Labels of an append-only graph index (HNSW), which FAISS cannot remove from.

FAISS ids are insertion positions. Each position keeps its label (-1 once removed), and every position is kept
sorted by that label (removed ones first), so a label's position is found by binary search: 4 bytes a vector,
where a Python dict took about 100. Searches hide removed positions with an ``IDSelectorBitmap`` (binary HNSW takes
no selector: it over-fetches and filters); the owner rebuilds the index once a third of it is dead.

Uses faiss and numpy only.
"""

from __future__ import annotations

import faiss
import numpy as np

# Rebuild an append-only index once this fraction of its positions is dead.
_REBUILD_DEAD_FRACTION = 0.33


class GraphLabels:
    """Position <-> label of one graph index.

    Attributes:
        pos_label: shape (positions,) int64: the label at each position, -1 once removed.
        label_order: every position, sorted by its label (int32 below 2^31 positions).
        dead: removed positions.
    """

    def __init__(self):
        self.pos_label = np.empty(0, dtype=np.int64)
        self.label_order = np.empty(0, dtype=np.int32)
        self.dead = 0
        self._selector = None  # cached IDSelectorBitmap over live positions, with its backing array

    @classmethod
    def restore(cls, pos_label: np.ndarray, ntotal: int) -> GraphLabels:
        """The labels a checkpoint kept (``pos_label``, for an index of ``ntotal`` positions).

        Raises:
            ValueError: they do not fit the index.
        """
        if len(pos_label) != ntotal:
            raise ValueError(f"{len(pos_label)} graph positions, the index holds {ntotal}")
        self = cls()
        self.pos_label = pos_label
        dtype = np.int32 if len(pos_label) < 2**31 else np.int64
        self.label_order = np.argsort(pos_label, kind="stable").astype(dtype)  # removed (-1) ones first
        self.dead = int((pos_label < 0).sum())
        srt = pos_label[self.label_order]
        if ((srt[1:] == srt[:-1]) & (srt[1:] >= 0)).any():
            raise ValueError("a label at two graph positions")
        return self

    def add(self, main, labels: np.ndarray, x: np.ndarray) -> None:
        """Adds ``x`` to the graph ``main`` under ``labels`` (not present)."""
        start = main.ntotal
        dtype = np.int32 if start + len(labels) < 2**31 else np.int64
        order = np.argsort(labels, kind="stable")
        at = np.searchsorted(self.pos_label, labels[order], sorter=self.label_order)  # before pos_label grows
        main.add(x)
        self.pos_label = np.concatenate([self.pos_label, labels])
        self.label_order = np.insert(self.label_order.astype(dtype, copy=False), at, (start + order).astype(dtype))
        self._selector = None

    def positions_of(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the live labels among ``labels``, where they are in ``label_order``), for labels as given
        (absent ones left out)."""
        if not len(self.label_order):
            none = np.empty(0, dtype=np.int64)
            return none, none
        at = np.minimum(np.searchsorted(self.pos_label, labels, sorter=self.label_order), len(self.label_order) - 1)
        pos = self.label_order[at].astype(np.int64)
        live = (self.pos_label[pos] == labels) & (labels >= 0)
        return pos[live], at[live]

    def remove(self, labels: np.ndarray, ntotal: int) -> tuple[int, bool]:
        """Marks the positions of ``labels`` dead: (how many were live, whether the graph of ``ntotal`` positions
        is now due for a rebuild)."""
        pos, at = self.positions_of(np.unique(labels))
        removed = len(pos)
        if removed:
            self.pos_label[pos] = -1  # their label is now -1: they move to the front of the order
            self.label_order = np.concatenate([self.label_order[at], np.delete(self.label_order, at)])
        self.dead += removed
        self._selector = None
        return removed, self.dead > _REBUILD_DEAD_FRACTION * ntotal

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(live positions, their labels)."""
        pos = np.flatnonzero(self.pos_label >= 0)
        return pos, self.pos_label[pos]

    def labels_at(self, pos: np.ndarray) -> np.ndarray:
        """The labels of positions a search returned (-1 stays -1)."""
        return np.where(pos >= 0, self.pos_label[np.maximum(pos, 0)], -1) if len(self.pos_label) else pos

    def search(self, main, xq: np.ndarray, k: int, ef_search: int, binary: bool) -> tuple[np.ndarray, np.ndarray]:
        """(D, positions) of the top k live positions of graph ``main`` for queries ``xq`` (prepared)."""
        if binary:
            main.hnsw.efSearch = ef_search
            if self.dead:
                # Binary HNSW takes no selector: over-fetch and filter the dead.
                D, pos = main.search(xq, min(main.ntotal, k + self.dead))
                return self._drop_dead(D, pos, k)
            return main.search(xq, k)
        params = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
        if self.dead:
            if self._selector is None:
                bitmap = np.packbits(self.pos_label >= 0, bitorder="little")
                self._selector = (faiss.IDSelectorBitmap(len(self.pos_label), faiss.swig_ptr(bitmap)), bitmap)
            params.sel = self._selector[0]
        return main.search(xq, k, params=params)

    def _drop_dead(self, D, pos, k):
        nq = len(D)
        outD = np.full((nq, k), np.inf, dtype=np.float32)
        outP = np.full((nq, k), -1, dtype=np.int64)
        live = (pos >= 0) & (self.pos_label[np.maximum(pos, 0)] >= 0)
        for q in range(nq):
            keep = np.flatnonzero(live[q])[:k]
            outP[q, :len(keep)] = pos[q, keep]
            outD[q, :len(keep)] = D[q, keep]
        return outD, outP
