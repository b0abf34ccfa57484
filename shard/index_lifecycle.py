"""The FAISS index of one collection on one shard through its life: an exact flat buffer until the collection is
trained, then the trained index (from the collection's template, shard.trained, or trained here on the buffer);
what it holds (live vectors, bytes, the stored vectors of labels), its checkpoint state (shard.checkpoint) and its
repacking. :class:`shard.cpu_index.VectorIndex` builds on it with writes, searches and the GPU mirror.

Uses faiss, numpy, the base package and shard.specs / shard.graph_labels / shard.index_reads.
"""

from __future__ import annotations

import contextlib
import logging

import faiss
import numpy as np

from lookalike.config import CollectionConfig
from shard.graph_labels import GraphLabels
from shard.index_reads import reconstruct_idmap, reconstruct_ivf, reconstruct_keys
from shard.list_groups import release_list_slack
from shard.specs import (FAISS_METRIC, FLAT_TYPES, build_index, drop_precomputed_tables, extract_ivf, faiss_reason,
                         is_graph, train_threshold)

log = logging.getLogger(__name__)


def train_template(coll: CollectionConfig, x: np.ndarray, gpu=None):
    """A new index of the collection's spec trained on ``x`` (prepared: float32 normalized for cosine, or uint8),
    empty. The coarse k-means of an IVF index runs on ``gpu`` (a lookalike.gpu backend) when given; the rest (PQ/SQ
    codebooks, transforms) on the CPU."""
    index = build_index(coll.dim, coll.metric, coll.index)
    ivf = extract_ivf(index)
    lock = contextlib.nullcontext()
    if gpu is not None and ivf is not None and not coll.binary:
        lock = gpu.lock  # FAISS GPU resources are not thread-safe
        try:
            flat = faiss.IndexFlatIP(ivf.d) if coll.larger_is_better else faiss.IndexFlatL2(ivf.d)
            ivf.clustering_index = gpu.to_gpu(flat, False)
        except Exception as err:  # noqa: BLE001: no room on the GPU: train on the CPU
            log.warning("%s: training on the CPU (%s)", coll.name, err)
    log.info("training %s index %r on %d vectors", coll.name, coll.index, len(x))
    with lock:
        index.train(x)
    if ivf is not None and not coll.binary:
        ivf.clustering_index = None  # a GPU index must not be serialized (nor kept)
    return index


class IndexLifecycle:
    """Which FAISS index holds a collection's vectors on a shard: ``_buffer`` (an exact ``IndexIDMap`` over a flat
    index, keyed by label) until trained, then ``_main`` (``_ivf`` its IVF part, if any; a graph's labels in
    ``_labels``).

    Args:
        coll: the collection (dim, metric, index factory string).
        template: the collection's trained, empty index (shard.trained) to start from; None: untrained.
    """

    def __init__(self, coll: CollectionConfig, template=None):
        self.coll = coll
        self._binary = coll.binary
        self._main = template if template is not None else build_index(coll.dim, coll.metric, coll.index)
        self._graph = is_graph(self._main)
        self._ivf = extract_ivf(self._main)
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
        self._labels = GraphLabels()  # append-only (graph) indexes: position <-> label
        self._member = None  # its place in its process's shared IVF lists (shard.list_groups), if it has one

    # --- construction helpers -------------------------------------------------------------------------------
    def _flat(self):
        if self._binary:
            return faiss.IndexBinaryFlat(self.coll.dim)
        return faiss.IndexFlat(self.coll.dim, FAISS_METRIC[self.coll.metric])

    def _idmap(self, index):
        return faiss.IndexBinaryIDMap(index) if self._binary else faiss.IndexIDMap(index)

    def _prepare_trained(self, index):
        """The trained main index, wrapped so that it takes labels. IVF keeps labels in its lists, with no direct
        map (see shard.cpu_index's docstring: removal and reconstruction scan the lists instead)."""
        if self._graph:
            return index  # positions are ids; see GraphLabels
        drop_precomputed_tables(index)
        if (ivf := extract_ivf(index)) is not None:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
            return index
        return self._idmap(index)

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self._binary:
            return np.ascontiguousarray(x, dtype=np.uint8)
        if self.coll.metric == "cosine":  # normalized in a copy: the caller's array (a test's, a job's) stays as is
            x = np.array(x, dtype=np.float32, order="C", copy=True)
            faiss.normalize_L2(x)
            return x
        return np.ascontiguousarray(x, dtype=np.float32)

    @property
    def _cols(self) -> int:  # columns of a vector as added: dim floats, or dim/8 bytes for hamming
        return self.coll.dim // 8 if self._binary else self.coll.dim

    # --- what it holds ---------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:  # live vectors
        if self._buffer is not None:
            return self._buffer.ntotal
        return self._main.ntotal - self._labels.dead

    @property
    def nbytes(self) -> int:
        """Approximate bytes held: codes, ids, index structures (what FAISS serializes), a graph's position arrays."""
        if self._buffer is not None:
            return self._buffer.ntotal * (self.coll.code_size + 8)
        n = self._main.ntotal
        if self._ivf is not None:
            # codes and ids in the lists, and the coarse centroids
            quantizer = self._ivf.quantizer
            centroid = int(quantizer.code_size) if self._binary else 4 * int(quantizer.d)
            return n * (int(self._ivf.code_size) + 8) + int(quantizer.ntotal) * centroid
        per = self._code_size() + 8  # code, and its id (IndexIDMap) or its label (GraphLabels.pos_label)
        if self._graph:
            # level-0 links, the position in GraphLabels.label_order
            per += 4 * getattr(getattr(self._main, "hnsw", None), "nb_neighbors", lambda _l: 32)(0)
            per += self._labels.label_order.itemsize
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
            return type(inner) in FLAT_TYPES or isinstance(inner, faiss.IndexBinaryFlat)
        return isinstance(main, (faiss.IndexHNSWFlat, faiss.IndexBinaryHNSW))

    def _code_size(self) -> int:
        try:
            return int(self._main.sa_code_size())
        except Exception:
            return self.coll.code_size

    def reconstruct(self, labels: np.ndarray) -> np.ndarray:
        """Stored vectors for labels (all present); lossy for compressed indexes (see :attr:`exact_vectors`),
        normalised for cosine."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if self._graph and self._buffer is None:
            pos, _ = self._labels.positions_of(labels)
            assert len(pos) == len(labels), "reconstruct of labels not in the index"
            return reconstruct_keys(self._main, pos, self._cols, self._binary)
        if self._ivf is not None and self._buffer is None:
            if self._member is not None:  # its entries in its process's shared lists (shard.list_groups)
                return self._member.reconstruct(self._main, self._ivf, labels, self.coll.dim)
            return reconstruct_ivf(self._main, self._ivf, labels, self.coll.dim, self._binary)
        return reconstruct_idmap(self._buffer if self._buffer is not None else self._main, labels, self._cols,
                                 self._binary)

    # --- training -------------------------------------------------------------------------------------------
    @property
    def needs_training(self) -> bool:
        """True once the flat buffer holds enough vectors to train the real index (and training has not failed)."""
        return self._buffer is not None and self._buffer.ntotal >= self.train_size and not self.train_error

    def train_failed(self, err: Exception) -> None:
        """Records that training failed: it stays an exact flat buffer (right, slower) until the shard restarts."""
        self.train_error = f"training {self.coll.index!r} on {self._buffer.ntotal} vectors failed: {faiss_reason(err)}"
        log.error("%s: %s; searching the exact buffer instead", self.coll.name, self.train_error)

    def build_trained(self):
        """Trains a new main index on the buffer's vectors and fills it with them: what :meth:`install_trained`
        takes. Only reads the buffer, so searches may run meanwhile; the caller keeps writes out until then."""
        buf = self._buffer
        labels = faiss.vector_to_array(buf.id_map)
        x = buf.index.reconstruct_n(0, buf.ntotal)
        log.info("training %s index %r on %d vectors", self.coll.name, self.coll.index, len(x))
        main = build_index(self.coll.dim, self.coll.metric, self.coll.index)
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
        self._ivf = extract_ivf(main)
        self._buffer = None
        self.trained = True
        if labels is not None:
            self._labels.add(self._main, labels, x)

    def train_template(self, x: np.ndarray, gpu=None):
        """A new index of the collection's spec trained on ``x`` (shape (n, d) float32, or (n, d/8) uint8), empty:
        what every shard starts from (shard.trained); see :func:`train_template`."""
        return train_template(self.coll, self._prepare(x), gpu)

    def train_if_ready(self) -> bool:
        """Trains and switches over in one step when enough vectors arrived (for callers without concurrency)."""
        if not self.needs_training:
            return False
        self.install_trained(self.build_trained())
        return True

    # --- repacking ------------------------------------------------------------------------------------------
    @property
    def repackable(self) -> bool:
        """A trained IVF index over float vectors, whose lists' growth leaves slack and heap holes behind (see
        shard.upkeep Upkeep.repack_if_due)."""
        return self._buffer is None and not self._binary and isinstance(self._main, faiss.IndexIVF)

    def repacked(self):
        """The main index's lists packed (:func:`packed_lists`); other lists (fast-scan blocks, lists the index does
        not own): a copy of the whole index through FAISS's serialization, which reads each list back into a buffer
        of its length. Only reads, so searches go on; writes wait until :meth:`install_repacked`."""
        assert self._member is None, "lists shared by its process's shards are packed in place (ListGroup.pack)"
        lists = faiss.downcast_InvertedLists(self._ivf.invlists) if self._ivf.own_invlists else None
        if not isinstance(lists, faiss.ArrayInvertedLists):
            return faiss.deserialize_index(faiss.serialize_index(self._main))
        return packed_lists(lists)

    def install_repacked(self, packed):
        """Swaps in :meth:`repacked`'s copy (the caller holds the write lock; the GPU mirror holds the same
        items and stays). Returns what it replaced, to let go after releasing the lock: the old index, or None
        when only the lists were replaced (the index frees its old lists as it takes the new ones)."""
        if isinstance(packed, faiss.InvertedLists):
            packed.this.disown()  # the index owns it from here
            self._ivf.replace_invlists(packed, True)
            return None
        drop_precomputed_tables(packed)  # FAISS computes them again as it reads the copy
        old, self._main, self._ivf = self._main, packed, extract_ivf(packed)
        return old

    # --- checkpoints (shard.checkpoint) ----------------------------------------------------------------------
    def state(self) -> tuple[object, dict[str, np.ndarray]]:
        """What a checkpoint holds of this index: the FAISS index to serialize (the exact buffer until trained, else
        the main index) and the arrays FAISS's file does not carry (a graph's position -> label map, -1 for removed
        positions). Only reads, so searches go on; the caller keeps writes out until it is written."""
        if self._buffer is not None:
            return self._buffer, {}
        if self._member is not None:  # a copy of its own entries, out of its process's shared lists
            return self._member.private_index(self._main.ntotal), {}
        return self._main, ({"pos_label": self._labels.pos_label} if self._graph else {})

    def layout(self, trained: bool) -> str:
        """The FAISS class :meth:`state` gives for this collection (trained or not): a checkpoint of another one was
        written by other code and is not used."""
        if not trained:
            return type(self._buffer if self._buffer is not None else self._idmap(self._flat())).__name__
        if self._buffer is None:
            return type(self._main).__name__
        return type(self._prepare_trained(build_index(self.coll.dim, self.coll.metric, self.coll.index))).__name__

    def _restore(self, index, arrays: dict[str, np.ndarray], trained: bool) -> None:
        """Takes ``index`` and ``arrays`` from :meth:`state` (a checkpoint's), in place of this new, empty one.

        Raises:
            ValueError: ``index`` is not what this collection builds (class, dimension, metric, training) or the
                arrays do not fit it.
        """
        coll = self.coll
        want = self.layout(trained)
        if type(index).__name__ != want:
            raise ValueError(f"a {type(index).__name__}, where the collection's index is a {want}")
        if index.d != coll.dim:
            raise ValueError(f"dimension {index.d}, not {coll.dim}")
        if not self._binary and index.metric_type != FAISS_METRIC[coll.metric]:
            raise ValueError(f"metric {index.metric_type}, not {coll.metric}'s {FAISS_METRIC[coll.metric]}")
        if not index.is_trained:
            raise ValueError("not trained")
        if not trained:
            if self._buffer is None:
                raise ValueError("an untrained buffer, for an index that needs no training")
            self._buffer = index
            return
        self._buffer = None
        self.trained = True
        self.trained_version = coll.trained_version  # a checkpoint of another version is not used (shard.checkpointing)
        drop_precomputed_tables(index)  # FAISS computes them as it reads an IVF-PQ file
        self._main, self._ivf = index, extract_ivf(index)
        if self._graph:
            self._labels = GraphLabels.restore(np.asarray(arrays.get("pos_label", np.empty(0)), dtype=np.int64),
                                               index.ntotal)


def packed_lists(lists):
    """A copy of ``lists`` (a ``faiss.ArrayInvertedLists``) whose every list's buffers are exactly its length: each
    list is added to an empty one at once (a vector resized from empty gets the capacity asked for). The old lists
    and the copy are both held until the swap, not a serialized third copy: 0.23 s for 1M x 128 IVF1024,Flat here,
    against 1.9 s through FAISS's serialization."""
    packed = faiss.ArrayInvertedLists(lists.nlist, lists.code_size)
    for no in range(lists.nlist):
        n = lists.list_size(no)
        if n:
            packed.add_entries(no, n, lists.get_ids(no), lists.get_codes(no))
    release_list_slack(packed)  # the allocator's size classes past each buffer
    return packed
