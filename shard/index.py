"""One FAISS index over a shard's slice of one collection, addressed by int64 labels.

Three shapes, chosen from the factory string:
- removable indexes (Flat, PQ, SQ... wrapped in ``IndexIDMap``; IVF natively, the ids in its lists): labels are
  FAISS ids, removal is ``remove_ids``. No per-vector map from label to place beyond what FAISS stores anyway:
  ``IndexIDMap`` (8 bytes a vector) rather than ``IndexIDMap2`` (about 50), and no IVF direct map (a hashtable:
  40-60 bytes a vector in memory, more than a PQ16 code and its id together). Removal from IVF scans the lists'
  ids with an ``IDSelectorBatch`` instead; reconstructing by label scans the id map or the lists' ids;
- append-only graph indexes (HNSW, which FAISS cannot remove from): FAISS ids are insertion positions, a
  removed position is hidden from searches with an ``IDSelectorBitmap`` and the index is rebuilt once a third of
  it is dead; labels are found by binary search through the positions sorted by label (4 bytes a vector, where a
  Python dict took about 100);
- indexes that need training (IVF, PQ) answer exactly from a flat buffer until the collection is trained. The
  trained index is one for the whole collection (shard.trained, trained by shard.core.Shard.train_collection):
  a VectorIndex made with ``template`` starts from it; ``train_if_ready`` trains on the local buffer only for
  standalone use (tests, tools).

On a GPU shard (a backend from ``lookalike.gpu``) the CPU index stays the source of truth (writes, removal,
reconstruction, training, what storage replays) and searches run on a GPU mirror of it: Flat, IVF-Flat, IVF-PQ and
IVF-SQ with a flat coarse quantizer (:class:`_IdMirror`), and ``CAGRA`` specs (:class:`_CagraMirror`). GPU indexes
cannot remove, so removed or replaced vectors stay on the GPU as tombstones that searches over-fetch by and filter
out, until the mirror is rebuilt from the CPU index (:meth:`VectorIndex.build_gpu`). Binary, graph (HNSW) and
other indexes, and the untrained buffer, search on the CPU.

Only some indexes hold their vectors exactly (:attr:`VectorIndex.exact_vectors`: flat ones and HNSW over flat
storage); the others (IVF, PQ, SQ, transforms) reconstruct approximations, or none cheaply, so a shard reads the
original vectors of Get and Scan from its storage instead (``shard.core``).

Not thread-safe: ``shard.core`` guards writes against searches with a read-write lock.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

import faiss
import numpy as np

from lookalike import gpu as gpu_mod
from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument
from lookalike.ids import order_by_distance_then_label
from lookalike.indexspec import check_spec, training_points

log = logging.getLogger(__name__)

_FAISS_METRIC = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT, "cosine": faiss.METRIC_INNER_PRODUCT}
# Rebuild an append-only index once this fraction of its positions is dead.
_REBUILD_DEAD_FRACTION = 0.33

# "CAGRA" / "CAGRA<graph degree>": a GPU graph (cuVS); its CPU source of truth is a flat index.
_CAGRA_RE = re.compile(r"^CAGRA(\d*)$")
_CAGRA_DEGREE = 64
_CAGRA_MIN = 10_000  # fewer vectors: the GPU mirror is an exact flat index (CAGRA's build needs a few thousand)
# GPU mirrors: FAISS ids are labels (56 bits, see lookalike.ids) tagged with a generation in bits 56-62, so that a
# replaced vector's old copy (a tombstone) and its new copy differ.
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
# A flat mirror is cut into segments of this many bytes (at least _MIN_SEGMENT vectors): a GPU flat index
# reallocates all of its storage on every add, so an add needs at most one segment of spare GPU memory.
_SEGMENT_BYTES = 1 << 30
_MIN_SEGMENT = 4096
# A group of equal distances (pHash duplicates) crossing the k-th place is searched up to this many results deep
# to find its smallest labels; past that, the cut follows FAISS's order.
_MAX_TIE_FETCH = 4096
_GPU_RETRY_S = 60.0  # after a failed GPU build, search on the CPU this long before trying again
_FLAT_TYPES = (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP)
_IVF_GPU_TYPES = (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)


def _cagra_degree(spec: str) -> int | None:
    m = _CAGRA_RE.match(spec)
    return (int(m.group(1)) if m.group(1) else _CAGRA_DEGREE) if m else None


def _factory(dim: int, metric: str, spec: str):
    if metric == "hamming":
        return faiss.index_binary_factory(dim, spec)
    if _cagra_degree(spec) is not None:
        return faiss.IndexFlat(dim, _FAISS_METRIC[metric])  # exact on CPU; the graph lives on the GPU
    return faiss.index_factory(dim, spec, _FAISS_METRIC[metric])


def gpu_kind(spec: str, metric: str, index) -> str | None:
    """How an index runs on a GPU shard: "flat", "ivf" or "cagra" (a GPU mirror), or None (on the CPU)."""
    if metric == "hamming":
        return None
    if _cagra_degree(spec) is not None:
        return "cagra"
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    if type(index) in _FLAT_TYPES:
        return "flat"
    if type(index) in _IVF_GPU_TYPES and type(faiss.downcast_index(index.quantizer)) in _FLAT_TYPES:
        return "ivf"
    return None


def check_index_spec(dim: int, metric: str, spec: str, gpu_float16: bool = False) -> None:
    """Raises InvalidArgument, with FAISS's reason, when the factory string does not build for dim and metric
    (or is not in the grammar of lookalike.indexspec, or asks for CAGRA from a faiss build without cuVS, or
    gpu_float16 where it means nothing)."""
    check_spec(spec, dim, metric == "hamming")
    if _cagra_degree(spec) is not None:
        if not gpu_mod.has_cuvs():
            raise InvalidArgument(
                f"index {spec!r} needs FAISS built with cuVS (GPU CAGRA), and this faiss build has none "
                f"({gpu_mod.faiss_build()}): use 'HNSW32' for a graph index, or install a faiss-gpu build with cuVS")
    try:
        index = _factory(dim, metric, spec)
    except Exception as err:  # FAISS raises RuntimeError with its C++ message
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise InvalidArgument(f"index {spec!r} cannot be built for dim={dim}, metric={metric}: {reason}") from None
    if gpu_float16:
        kind = gpu_kind(spec, metric, index)
        if not (kind == "flat" or (kind == "ivf" and type(index) is faiss.IndexIVFPQ)):
            raise InvalidArgument(
                f"gpu_float16 applies to 'Flat' (float16 vectors on the GPU) and 'IVF...,PQ...' (float16 lookup "
                f"tables), not to {spec!r}" + (" (use 'IVF...,SQfp16' for float16 IVF lists)" if kind == "ivf" else ""))


def _is_graph(index) -> bool:
    return isinstance(index, (faiss.IndexHNSW, faiss.IndexBinaryHNSW)) or "HNSW" in type(index).__name__


def train_threshold(spec: str) -> int:
    """Vectors a collection needs before its index is trained (see lookalike.indexspec.training_points); 0 for
    indexes that need no training."""
    return training_points(spec)[0]


class VectorIndex:
    """The vectors of one collection on one shard.

    Args:
        coll: the collection (dim, metric, index factory string, search defaults).
        gpu: a GPU backend (``lookalike.gpu``) when the shard runs on a GPU: searches then use a GPU mirror of the
            index once :meth:`build_gpu` made one (see the module's docstring). None: CPU only.
    """

    def __init__(self, coll: CollectionConfig, gpu=None, template=None):
        self.coll = coll
        self._binary = coll.binary
        self._main = template if template is not None else _factory(coll.dim, coll.metric, coll.index)
        self._graph = _is_graph(self._main)
        self._ivf = self._extract_ivf(self._main)
        self.trained = self._main.is_trained
        # The collection's trained index this one started from (shard.trained), 0: none.
        self.trained_version = coll.trained_version if template is not None else 0
        # A graph over trained codes (HNSW_PQ) is rebuilt from the trained template, not retrained.
        self._template = faiss.clone_index(template) if template is not None and self._graph else None
        self.train_size = 0 if self.trained else train_threshold(coll.index)
        self.train_error = ""  # why training failed, if it did (see train_failed)
        # Until trained: an exact flat buffer keyed by label.
        self._buffer = None if self.trained else self._idmap(self._flat())
        if self.trained:
            self._main = self._prepare_trained(self._main)
        # Append-only (graph) indexes: position -> label (-1 once removed), and every position sorted by that label
        # (removed ones first): label -> position by binary search (see _positions_of).
        self._pos_label = np.empty(0, dtype=np.int64)
        self._label_order = np.empty(0, dtype=np.int32)
        self._dead = 0
        self._selector = None  # cached IDSelectorBitmap over live positions, with its backing array
        # GPU: the mirror searches use (None: search on the CPU), and when a failed build may be tried again.
        self._gpu = gpu if gpu_kind(coll.index, coll.metric, self._main) else None
        self._mirror: _IdMirror | _CagraMirror | None = None
        self._gpu_retry_at = 0.0
        self._gpu_error = ""  # the last build failure, logged once

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
        """The trained main index, wrapped so that it takes labels. IVF keeps labels in its lists, with no direct
        map (see the module's docstring: removal and reconstruction scan the lists instead)."""
        if self._graph:
            return index  # positions are ids; see _pos_label
        ivf = self._extract_ivf(index)
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
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
        """Approximate bytes held: codes, ids and index structures (what FAISS would serialize, plus the graph's
        position arrays). Cheap: checked before every write."""
        if self._buffer is not None:
            return self._buffer.ntotal * (self.coll.code_size + 8)
        n = self._main.ntotal
        if self._ivf is not None:
            # codes and ids in the lists, and the coarse centroids
            quantizer = self._ivf.quantizer
            centroid = int(quantizer.code_size) if self._binary else 4 * int(quantizer.d)
            return n * (int(self._ivf.code_size) + 8) + int(quantizer.ntotal) * centroid
        per = self._code_size() + 8  # code, and its id (IndexIDMap) or its label (_pos_label)
        if self._graph:
            # level-0 links, the position in _label_order
            per += 4 * getattr(getattr(self._main, "hnsw", None), "nb_neighbors", lambda _l: 32)(0)
            per += self._label_order.itemsize
        return n * per

    @property
    def exact_vectors(self) -> bool:
        """True when :meth:`reconstruct` returns the vectors as added (normalized for cosine): the untrained
        buffer, flat indexes, HNSW over flat storage. Others hold approximations (PQ, SQ, transforms) or no cheap
        way to find a vector (IVF): read their vectors from storage."""
        if self._buffer is not None:
            return True
        main = self._main
        if isinstance(main, (faiss.IndexIDMap, faiss.IndexBinaryIDMap)):
            inner = faiss.downcast_index(main.index) if not self._binary else faiss.downcast_IndexBinary(main.index)
            return type(inner) in _FLAT_TYPES or isinstance(inner, faiss.IndexBinaryFlat)
        return isinstance(main, (faiss.IndexHNSWFlat, faiss.IndexBinaryHNSW))

    def _code_size(self) -> int:
        try:
            return int(self._main.sa_code_size())
        except Exception:
            return self.coll.code_size

    @property
    def on_gpu(self) -> bool:
        """True when searches run on a GPU mirror."""
        return self._mirror is not None

    @property
    def gpu_nbytes(self) -> int:
        """Approximate GPU bytes of the mirror (tombstones included)."""
        return self._mirror.nbytes if self._mirror is not None else 0

    def _gpu_per_vector(self, main) -> tuple[int, int]:
        """(GPU bytes per vector, fixed GPU bytes) of a mirror of ``main``."""
        kind = gpu_kind(self.coll.index, self.coll.metric, main)
        dim = self.coll.dim
        if kind == "flat":
            return dim * (2 if self.coll.gpu_float16 else 4), 0
        if kind == "cagra":
            return 4 * dim + 4 * _cagra_degree(self.coll.index), 0
        if kind == "ivf":
            ivf = self._extract_ivf(main)
            return int(ivf.code_size) + 8, 4 * dim * int(ivf.nlist)  # codes + 64-bit ids; coarse centroids
        return 0, 0

    def gpu_bytes_for(self, n: int) -> int:
        """GPU bytes that ``n`` more vectors take on a GPU shard (0 on the CPU), with the copy of the last flat
        segment that an add to it makes."""
        if self._gpu is None:
            return 0
        per = self._gpu_per_vector(self._main)[0]
        m = self._mirror
        last = int(m.parts[-1].ntotal) if isinstance(m, _IdMirror) and not m.ivf and m.parts else 0
        return (n + last) * per

    def gpu_bytes_of(self, main=None) -> int:
        """GPU bytes a mirror of ``main`` (default: the main index) would take."""
        if self._gpu is None:
            return 0
        main = self._main if main is None else main
        per, fixed = self._gpu_per_vector(main)
        return main.ntotal * per + fixed

    @property
    def gpu_needs_build(self) -> bool:
        """True on a GPU shard whose trained index has no mirror, or one with too many tombstones."""
        return (self._gpu is not None and self._buffer is None and time.monotonic() >= self._gpu_retry_at
                and (self._mirror is None or self._mirror.needs_rebuild))

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
            self._mirror_apply("add", labels, x)
            return
        start = self._main.ntotal
        dtype = np.int32 if start + len(labels) < 2**31 else np.int64
        order = np.argsort(labels, kind="stable")
        at = np.searchsorted(self._pos_label, labels[order], sorter=self._label_order)  # before _pos_label grows
        self._main.add(x)
        self._pos_label = np.concatenate([self._pos_label, labels])
        self._label_order = np.insert(self._label_order.astype(dtype, copy=False), at, (start + order).astype(dtype))
        self._selector = None

    def _positions_of(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Graph indexes: (positions of the live labels among ``labels``, where they are in ``_label_order``),
        for labels as given (absent ones left out)."""
        if not len(self._label_order):
            none = np.empty(0, dtype=np.int64)
            return none, none
        at = np.minimum(np.searchsorted(self._pos_label, labels, sorter=self._label_order), len(self._label_order) - 1)
        pos = self._label_order[at].astype(np.int64)
        live = (self._pos_label[pos] == labels) & (labels >= 0)
        return pos[live], at[live]

    @property
    def needs_training(self) -> bool:
        """True once the flat buffer holds enough vectors to train the real index (and training has not failed)."""
        return self._buffer is not None and self._buffer.ntotal >= self.train_size and not self.train_error

    def train_failed(self, err: Exception) -> None:
        """Records that training failed: the index stays an exact flat buffer (searches stay right, only slower)
        and training is not tried again until the shard restarts."""
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        self.train_error = f"training {self.coll.index!r} on {self._buffer.ntotal} vectors failed: {reason}"
        log.error("%s: %s; searching the exact buffer instead", self.coll.name, self.train_error)

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
        self._mirror = None  # built next (build_gpu), from the trained index
        if labels is not None:
            self._add_main(labels, x)

    @property
    def repackable(self) -> bool:
        """A trained IVF index over float vectors, whose lists' growth leaves slack and heap holes behind (see
        shard.core ShardCollection._repack_if_due)."""
        return self._buffer is None and not self._binary and isinstance(self._main, faiss.IndexIVF)

    def repacked(self):
        """A copy of the main index with every list exactly its size: FAISS's serialization reads each list back
        into a buffer of its length. Only reads, so searches go on; the caller keeps writes out until
        :meth:`install_repacked`."""
        return faiss.deserialize_index(faiss.serialize_index(self._main))

    def install_repacked(self, main):
        """Swaps in :meth:`repacked`'s copy (the caller holds the write lock; the GPU mirror holds the same
        items and stays). Returns the old index: let it go after releasing the lock."""
        old, self._main = self._main, main
        self._ivf = self._extract_ivf(main)
        return old

    def train_template(self, x: np.ndarray, gpu=None):
        """A new index of the collection's spec trained on ``x`` (shape (n, d) float32, or (n, d/8) uint8), empty:
        what every shard starts from (shard.trained). The coarse k-means of an IVF index runs on ``gpu`` (a
        lookalike.gpu backend) when given; the rest (PQ/SQ codebooks, transforms) on the CPU."""
        x = self._prepare(x)
        index = _factory(self.coll.dim, self.coll.metric, self.coll.index)
        ivf = self._extract_ivf(index)
        lock = contextlib.nullcontext()
        if gpu is not None and ivf is not None and not self._binary:
            lock = gpu.lock  # FAISS GPU resources are not thread-safe
            try:
                flat = faiss.IndexFlatIP(ivf.d) if self.coll.larger_is_better else faiss.IndexFlatL2(ivf.d)
                ivf.clustering_index = gpu.to_gpu(flat, False)
            except Exception as err:  # noqa: BLE001: no room on the GPU: train on the CPU
                log.warning("%s: training on the CPU (%s)", self.coll.name, err)
        log.info("training %s index %r on %d vectors", self.coll.name, self.coll.index, len(x))
        with lock:
            index.train(x)
        if ivf is not None and not self._binary:
            ivf.clustering_index = None  # a GPU index must not be serialized (nor kept)
        return index

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
            pos, at = self._positions_of(np.unique(labels))
            removed = len(pos)
            if removed:
                self._pos_label[pos] = -1  # their label is now -1: they move to the front of the order
                self._label_order = np.concatenate([self._label_order[at], np.delete(self._label_order, at)])
            self._dead += removed
            self._selector = None
            if self._dead > _REBUILD_DEAD_FRACTION * self._main.ntotal:
                self._rebuild_graph()
            return removed
        # IVF without a direct map scans every list's ids against the selector (a hash set): 8-10 ms for 10k
        # labels of 1M (IVF1024,Flat, one thread; docs/BENCHMARKS.md, "Shard memory per vector")
        removed = self._main.remove_ids(faiss.IDSelectorBatch(labels))
        if removed:
            self._mirror_apply("remove", labels)
        return removed

    def without(self, labels: np.ndarray):
        """A copy of the main index without ``labels``, for :meth:`install`: built while the original keeps serving
        searches, because removal from flat codes moves every vector after the first one removed. None where removal
        in place is cheap (IVF lists, graphs) or the index is still its training buffer."""
        if self._buffer is not None or self._graph or self._ivf is not None or not len(labels):
            return None
        clone = faiss.clone_index_binary(self._main) if self._binary else faiss.clone_index(self._main)
        clone.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(labels, dtype=np.int64)))
        return clone

    def install(self, main, labels: np.ndarray | None = None, mirror=None):
        """Swaps in an index from :meth:`without` (the caller holds the write lock), with ``mirror``, a GPU mirror
        :meth:`build_gpu` made of it, if any (else the old mirror takes the removed ``labels`` as tombstones, or is
        dropped). Returns what it replaced: let it go after releasing the lock (freeing it takes time)."""
        old, self._main = self._main, main
        old_mirror = self._mirror
        if mirror is not None:
            self._mirror = mirror
        elif old_mirror is not None and labels is not None and len(labels):
            self._mirror_apply("remove", np.ascontiguousarray(labels, dtype=np.int64))
        elif labels is None:
            self._mirror = None
        return old, (old_mirror if self._mirror is not old_mirror else None)

    # --- checkpoints (shard.checkpoint) ----------------------------------------------------------------------
    def state(self) -> tuple[object, dict[str, np.ndarray]]:
        """What a checkpoint holds of this index: the FAISS index to serialize (the exact buffer until trained, else
        the main index) and the arrays FAISS's file does not carry (a graph's position -> label map, -1 for removed
        positions). Only reads, so searches go on; the caller keeps writes out until it is written."""
        if self._buffer is not None:
            return self._buffer, {}
        return self._main, ({"pos_label": self._pos_label} if self._graph else {})

    def layout(self, trained: bool) -> str:
        """The FAISS class :meth:`state` gives for this collection (trained or not): a checkpoint of another one was
        written by other code and is not used."""
        if not trained:
            return type(self._buffer if self._buffer is not None else self._idmap(self._flat())).__name__
        if self._buffer is None:
            return type(self._main).__name__
        return type(self._prepare_trained(_factory(self.coll.dim, self.coll.metric, self.coll.index))).__name__

    @classmethod
    def from_state(cls, coll: CollectionConfig, index, arrays: dict[str, np.ndarray], trained: bool,
                   gpu=None) -> "VectorIndex":
        """The index :meth:`state` gave, read back. The GPU mirror is built later (:meth:`build_gpu`).

        Raises:
            ValueError: ``index`` is not what this collection builds (class, dimension, metric, training) or the
                arrays do not fit it.
        """
        self = cls(coll, gpu)
        want = self.layout(trained)
        if type(index).__name__ != want:
            raise ValueError(f"a {type(index).__name__}, where the collection's index is a {want}")
        if index.d != coll.dim:
            raise ValueError(f"dimension {index.d}, not {coll.dim}")
        if not self._binary and index.metric_type != _FAISS_METRIC[coll.metric]:
            raise ValueError(f"metric {index.metric_type}, not {coll.metric}'s {_FAISS_METRIC[coll.metric]}")
        if not index.is_trained:
            raise ValueError("not trained")
        if not trained:
            if self._buffer is None:
                raise ValueError("an untrained buffer, for an index that needs no training")
            self._buffer = index
            return self
        self._buffer = None
        self.trained = True
        self.trained_version = coll.trained_version  # a checkpoint of another version is not used (shard.core)
        self._main = index
        self._ivf = self._extract_ivf(index)
        if self._graph:
            pos_label = np.asarray(arrays.get("pos_label", np.empty(0)), dtype=np.int64)
            if len(pos_label) != index.ntotal:
                raise ValueError(f"{len(pos_label)} graph positions, the index holds {index.ntotal}")
            self._pos_label = pos_label
            dtype = np.int32 if len(pos_label) < 2**31 else np.int64
            self._label_order = np.argsort(pos_label, kind="stable").astype(dtype)  # removed (-1) ones first
            self._dead = int((pos_label < 0).sum())
            srt = pos_label[self._label_order]
            if ((srt[1:] == srt[:-1]) & (srt[1:] >= 0)).any():
                raise ValueError("a label at two graph positions")
        return self

    # --- GPU mirror ---------------------------------------------------------------------------------------------
    def _mirror_apply(self, op: str, labels: np.ndarray, x: np.ndarray | None = None) -> None:
        """Applies a write to the mirror; a mirror that cannot take it is dropped (rebuilt by the next build)."""
        m = self._mirror
        if m is None:
            return
        try:
            if op == "add":
                m.add(labels, x)
            else:
                m.remove(labels)
        except Exception as err:
            log.warning("%s: GPU mirror dropped after a failed %s (%s); searching on the CPU until rebuilt",
                        self.coll.name, op, err)
            m.valid = False
        if not m.valid:
            self._mirror = None

    def build_gpu(self, main=None):
        """A GPU mirror of ``main`` (default: the main index) for :meth:`install_gpu` or :meth:`install`.

        Only reads the CPU index, so searches may run meanwhile; the caller keeps writes out until it is installed.
        None without a GPU, while the index is still its training buffer, or when the build failed (logged:
        searches stay on the CPU, and the build is tried again after a minute).
        """
        if self._gpu is None or self._buffer is not None:
            return None
        main = self._main if main is None else main
        try:
            return self._build_mirror(main)
        except Exception as err:  # no room on the GPU, or a shape the GPU cannot hold (e.g. some PQ sizes)
            self._gpu_retry_at = time.monotonic() + _GPU_RETRY_S
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            (log.warning if reason != self._gpu_error else log.debug)(
                "%s: index %r cannot go on the GPU (%s); searching on the CPU, trying again in %.0fs",
                self.coll.name, self.coll.index, reason, _GPU_RETRY_S)
            self._gpu_error = reason
            return None

    def _build_mirror(self, main):
        coll, backend = self.coll, self._gpu
        kind = gpu_kind(coll.index, coll.metric, main)
        per, fixed = self._gpu_per_vector(main)
        t0 = time.monotonic()
        if kind == "ivf":
            index = backend.to_gpu(main, coll.gpu_float16)
            mirror = _IdMirror(backend, [index], int(main.nlist), coll.larger_is_better, per, fixed)
        else:
            flat = faiss.downcast_index(main.index)
            n, labels = flat.ntotal, faiss.vector_to_array(main.id_map)
            xb = (faiss.rev_swig_ptr(flat.get_xb(), n * coll.dim).reshape(n, coll.dim) if n
                  else np.empty((0, coll.dim), np.float32))
            if kind == "flat":
                mirror = _IdMirror(backend, [], 0, coll.larger_is_better, per, fixed,
                                   new_segment=lambda: faiss.IndexIDMap(backend.to_gpu(self._flat(), coll.gpu_float16)),
                                   segment=max(_MIN_SEGMENT, _SEGMENT_BYTES // per))
                for i in range(0, n, mirror.segment):
                    with backend.lock:
                        mirror.parts.append(mirror._new_segment())
                        mirror.parts[-1].add_with_ids(xb[i:i + mirror.segment], labels[i:i + mirror.segment])
                mirror.ntotal = n
            else:  # cagra
                graph = n >= _CAGRA_MIN
                if graph:
                    base = backend.cagra(xb, coll.metric, _cagra_degree(coll.index))
                else:  # small: exact on the GPU
                    flat = self._flat()
                    flat.add(xb)
                    base = backend.to_gpu(flat, False)
                mirror = _CagraMirror(backend, base, labels, graph, coll.dim, coll.metric, coll.larger_is_better,
                                      per, coll.ef_search)
        log.info("%s: GPU mirror (%s, %d vectors, %.1f MiB) built in %.2fs on %s", coll.name, kind, main.ntotal,
                 mirror.nbytes / 2**20, time.monotonic() - t0, getattr(backend, "name", "gpu"))
        return mirror

    def install_gpu(self, mirror):
        """Swaps in a mirror from :meth:`build_gpu` (None: search on the CPU). The caller holds the write lock and
        made no write since the build. Returns the old mirror: let it go after releasing the lock."""
        old, self._mirror = self._mirror, mirror
        return old

    def sync_gpu(self) -> bool:
        """Builds and installs a mirror when one is needed, in one step (for callers without concurrency)."""
        if not self.gpu_needs_build:
            return False
        mirror = self.build_gpu()
        if mirror is not None:
            self.install_gpu(mirror)
        return mirror is not None

    def _rebuild_graph(self) -> None:
        live = np.flatnonzero(self._pos_label >= 0)
        x = self._reconstruct(self._main, live) if len(live) else None
        labels = self._pos_label[live]
        log.info("rebuilding %s %r without %d removed vectors", self.coll.name, self.coll.index, self._dead)
        self._main = (faiss.clone_index(self._template) if self._template is not None
                      else _factory(self.coll.dim, self.coll.metric, self.coll.index))
        self._pos_label = np.empty(0, dtype=np.int64)
        self._label_order = np.empty(0, dtype=np.int32)
        self._dead = 0
        self._selector = None
        if x is not None:
            if not self._main.is_trained:  # a graph over compressed codes (HNSW32_PQ16): retrain on what is live
                self._main.train(x)
            self._add_main(labels, x)

    # --- reads --------------------------------------------------------------------------------------------
    def search(self, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
               coarse=None) -> tuple[np.ndarray, np.ndarray]:
        """k-NN search.

        Args:
            xq: shape (nq, d) float32 (or (nq, d/8) uint8 for hamming).
            k: neighbours per query.
            nprobe, ef_search: 0 keeps the collection default.
            coarse: (lists, distances), each shape (nq, nprobe), from :meth:`check_coarse`: the IVF lists to probe,
                chosen by the router with this index's coarse quantizer (used by the CPU index; a GPU mirror
                chooses its own).

        Returns:
            (D, L): shape (nq, k) float32 distances in the metric's direction (see CollectionConfig), and shape
            (nq, k) int64 labels, -1 where fewer than k vectors exist. Equal distances come in increasing label
            order, and a group of equal distances cut at the k-th place keeps its smallest labels (up to
            ``_MAX_TIE_FETCH`` results are looked at for that), so every shard or replica holding the same
            vectors answers the same.
        """
        xq = self._prepare(xq)
        n = self.ntotal
        if k >= n:  # every live vector fits: nothing is cut at the k-th place
            D, L = self._search_any(xq, k, nprobe, ef_search, coarse)
            return self._tie_order(D, L)
        # One more than asked shows whether a group of equal distances crosses the cut; such rows look further.
        D, L = self._search_any(xq, k + 1, nprobe, ef_search, coarse)
        rows = np.flatnonzero((L[:, k] >= 0) & (D[:, k] == D[:, k - 1]))
        D, L = self._tie_order(D[:, :k], L[:, :k])
        kk = k + 1
        while len(rows) and kk < min(n, _MAX_TIE_FETCH):
            kk = min(n, _MAX_TIE_FETCH, max(4 * kk, 64))
            D2, L2 = self._search_any(xq[rows], kk, nprobe, ef_search,
                                      None if coarse is None else (coarse[0][rows], coarse[1][rows]))
            D2o, L2o = self._tie_order(D2, L2)
            D[rows], L[rows] = D2o[:, :k], L2o[:, :k]
            rows = rows[(L2[:, -1] >= 0) & (D2[:, -1] == D2[:, k - 1])]
        return D, L

    def _tie_order(self, D: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows re-ordered so that equal distances come in increasing label order (FAISS keeps them in the order
        it met them, which depends on where a vector sits in this shard's index)."""
        if D.shape[1] < 2:
            return D, L
        tied = np.flatnonzero(((D[:, 1:] == D[:, :-1]) & (L[:, 1:] >= 0)).any(axis=1))
        if len(tied):
            D, L = D.copy(), L.copy()
            order = order_by_distance_then_label(D[tied], L[tied], self.coll.larger_is_better)
            D[tied] = np.take_along_axis(D[tied], order, axis=1)
            L[tied] = np.take_along_axis(L[tied], order, axis=1)
        return D, L

    @property
    def _router_may_choose_lists(self) -> bool:
        """A trained IVF over float vectors with a flat coarse quantizer and no transform before it: a router
        holding the same quantizer chooses the same lists (see coarse_quantizer). A GPU mirror chooses its own."""
        return (self._buffer is None and not self._binary and bool(self.trained_version)
                and isinstance(self._main, faiss.IndexIVF)
                and type(faiss.downcast_index(self._main.quantizer)) in _FLAT_TYPES)

    def coarse_quantizer(self) -> tuple[int, np.ndarray] | None:
        """(trained version, nlist x dim float32 centroids) when a router may choose the IVF lists to probe once
        per query for every shard (``search(coarse=...)``); None for any other index."""
        if not self._router_may_choose_lists:
            return None
        q = faiss.downcast_index(self._main.quantizer)
        return self.trained_version, q.reconstruct_n(0, q.ntotal)

    def check_coarse(self, version: int, nq: int, nprobe: int, lists: np.ndarray, dis: np.ndarray):
        """The router's list choice for a search of nq queries, as (lists, distances) arrays of shape (nq, nprobe),
        when it was made with this index's trained version; None when it was not (the shard then chooses itself).

        Raises:
            InvalidArgument: arrays of the wrong size, or list numbers outside 0..nlist-1 (-1: none).
        """
        if version != self.trained_version or not self._router_may_choose_lists:
            return None
        nlist = int(self._main.nlist)
        if not 1 <= nprobe <= nlist or lists.size != nq * nprobe or dis.size != nq * nprobe:
            raise InvalidArgument(f"coarse assignment of {lists.size} lists and {dis.size} distances for {nq} "
                                  f"queries x nprobe {nprobe} (nlist {nlist})")
        if lists.size and (lists.min() < -1 or lists.max() >= nlist):
            raise InvalidArgument(f"coarse assignment names lists outside 0..{nlist - 1}")
        return (np.ascontiguousarray(lists.reshape(nq, nprobe), dtype=np.int64),
                np.ascontiguousarray(dis.reshape(nq, nprobe), dtype=np.float32))

    def _search_any(self, xq: np.ndarray, k: int, nprobe: int, ef_search: int,
                    coarse=None) -> tuple[np.ndarray, np.ndarray]:
        """Top k from the GPU mirror when it can answer, else from the CPU index (xq prepared)."""
        mirror = self._mirror
        if self._buffer is None and mirror is not None and mirror.usable(k, nprobe or self.coll.nprobe):
            try:
                D, L, rest = mirror.search(xq, k, nprobe or self.coll.nprobe, ef_search or self.coll.ef_search)
            except Exception as err:  # e.g. no GPU scratch memory left: the CPU index still answers
                log.warning("%s: GPU search failed (%s); answering from the CPU index", self.coll.name, err)
            else:
                if len(rest):  # queries whose top k the GPU could not tell past its tombstones
                    D[rest], L[rest] = self._search_cpu(xq[rest], k, nprobe, ef_search)
                return D, L
        return self._search_cpu(xq, k, nprobe, ef_search, coarse)

    def _search_cpu(self, xq: np.ndarray, k: int, nprobe: int, ef_search: int, coarse=None):
        if self._buffer is not None:
            D, L = self._buffer.search(xq, k)
        elif self._graph:
            D, pos = self._search_graph(xq, k, ef_search or self.coll.ef_search)
            L = np.where(pos >= 0, self._pos_label[np.maximum(pos, 0)], -1) if len(self._pos_label) else pos
        elif self._ivf is not None:
            nprobe = nprobe or self.coll.nprobe
            if coarse is not None:  # the lists the router chose with this very quantizer (see coarse_quantizer)
                lists, dis = coarse
                D = np.empty((len(xq), k), dtype=np.float32)
                L = np.empty((len(xq), k), dtype=np.int64)
                self._main.search_preassigned_c(
                    len(xq), faiss.swig_ptr(xq), k, faiss.swig_ptr(lists), faiss.swig_ptr(dis), faiss.swig_ptr(D),
                    faiss.swig_ptr(L), False, faiss.SearchParametersIVF(nprobe=lists.shape[1]))
            elif self._binary:
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
        """Stored vectors for labels (all present); lossy for compressed indexes (see :attr:`exact_vectors`),
        normalised for cosine."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if self._graph and self._buffer is None:
            pos, _ = self._positions_of(labels)
            assert len(pos) == len(labels), "reconstruct of labels not in the index"
            return self._reconstruct(self._main, pos)
        if self._ivf is not None and self._buffer is None:
            return self._reconstruct_ivf(labels)
        idmap = self._buffer if self._buffer is not None else self._main
        id_map = faiss.rev_swig_ptr(idmap.id_map.data(), idmap.id_map.size())  # position -> label, no copy
        order = np.argsort(id_map, kind="stable")
        pos = order[np.searchsorted(id_map, labels, sorter=order)]
        return self._reconstruct(idmap.index, pos)

    def _reconstruct_ivf(self, labels: np.ndarray) -> np.ndarray:
        """Reconstructs from IVF lists, found by scanning every list's ids (there is no direct map): O(vectors),
        for the few callers that want the index's own (possibly lossy) copy; Get and Scan read storage."""
        if not len(labels):
            return self._reconstruct(self._main, labels)
        ivf, invlists = self._ivf, self._ivf.invlists
        sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        ids = np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(i), int(s)) for i, s in enumerate(sizes) if s]
                             or [np.empty(0, dtype=np.int64)])
        order = np.argsort(ids, kind="stable")
        at = order[np.minimum(np.searchsorted(ids, labels, sorter=order), max(len(ids) - 1, 0))]
        assert len(ids) and (ids[at] == labels).all(), "reconstruct of labels not in the index"
        list_no = np.repeat(np.arange(ivf.nlist, dtype=np.int64), sizes)[at]
        offset = at - (np.cumsum(sizes) - sizes)[list_no]
        cols = self.coll.dim // 8 if self._binary else ivf.d
        out = np.empty((len(labels), cols), dtype=np.uint8 if self._binary else np.float32)
        for row, (lst, off) in enumerate(zip(list_no.tolist(), offset.tolist())):
            ivf.reconstruct_from_offset(lst, off, faiss.swig_ptr(out[row]))
        if isinstance(self._main, faiss.IndexPreTransform):  # back through PCA / OPQ
            x = np.empty((len(labels), self.coll.dim), dtype=np.float32)
            self._main.reverse_chain(len(labels), faiss.swig_ptr(out), faiss.swig_ptr(x))
            out = x
        return out

    def _reconstruct(self, index, keys: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            cols = self.coll.dim // 8 if self._binary else self.coll.dim
            return np.empty((0, cols), dtype=np.uint8 if self._binary else np.float32)
        return np.stack([index.reconstruct(int(key)) for key in keys])


# --- GPU mirrors ----------------------------------------------------------------------------------------------------
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


class _IdMirror:
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


class _CagraMirror:
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
        self.delta = faiss.IndexIDMap(faiss.IndexFlat(dim, _FAISS_METRIC[metric]))
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
