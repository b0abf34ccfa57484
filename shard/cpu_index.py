"""One FAISS index over a shard's slice of one collection, addressed by int64 labels.

Three shapes, chosen from the factory string:
- removable indexes (Flat, PQ, SQ... wrapped in ``IndexIDMap``; IVF natively, the ids in its lists): labels are
  FAISS ids, removal is ``remove_ids``. No per-vector map from label to place beyond what FAISS stores anyway:
  ``IndexIDMap`` (8 bytes a vector) rather than ``IndexIDMap2`` (about 50), and no IVF direct map (a hashtable:
  40-60 bytes a vector in memory, more than a PQ16 code and its id together). Removal from IVF scans the lists'
  ids with an ``IDSelectorBatch`` instead; reconstructing by label scans the id map or the lists' ids;
- append-only graph indexes (HNSW, which FAISS cannot remove from): FAISS ids are insertion positions, kept apart
  by shard.graph_labels (removed positions hidden from searches; rebuilt once a third of it is dead);
- indexes that need training (IVF, PQ) answer exactly from a flat buffer until the collection is trained. The
  trained index is one for the whole collection (shard.trained, trained by shard.training.TrainedIndexes.train):
  a VectorIndex made with ``template`` starts from it; ``train_if_ready`` trains on the local buffer only for
  standalone use (tests, tools).

On a GPU shard (a backend from ``lookalike.gpu``) the CPU index stays the source of truth (writes, removal,
reconstruction, training, what storage replays) and searches run on a GPU mirror of it (shard.gpu_keeper keeps it,
shard.gpu_mirror holds it): Flat, IVF-Flat, IVF-PQ and IVF-SQ with a flat coarse quantizer, and ``CAGRA`` specs.
Binary, graph (HNSW) and other indexes, and the untrained buffer, search on the CPU.

Only some indexes hold their vectors exactly (:attr:`VectorIndex.exact_vectors`: flat ones and HNSW over flat
storage); the others (IVF, PQ, SQ, transforms) reconstruct approximations, or none cheaply, so a shard reads the
original vectors of Get and Scan from its storage instead (``shard.reads``).

A query's answer does not depend on the batch it comes in, nor on the threads free: a flat index's search, the IVF
lists a query probes when the router did not choose them, and the list an added vector goes to are found with
lookalike.nearest, not with FAISS's kernels of the batch's shape (docs/ARCHITECTURE.md, "Deterministic answers").

Not thread-safe: ``shard.collection`` guards writes against searches with a read-write lock.

Uses faiss, numpy, the base package, and the shard modules it is made of: shard.specs (what a spec builds),
shard.graph_labels, shard.index_reads (tie-ordered search, reconstruction), shard.index_lifecycle (buffer,
training, checkpoint state), shard.gpu_keeper.
"""

from __future__ import annotations

import contextlib
import logging

import faiss
import numpy as np

from lookalike.config import CollectionConfig
from lookalike.errors import InvalidArgument
from lookalike.nearest import ivf_add, ivf_lists, max_norm, nearest, product_candidates, product_pays
from shard.gpu_keeper import MirrorKeeper
from shard.graph_labels import GraphLabels
from shard.index_lifecycle import IndexLifecycle
from shard.index_reads import reconstruct_keys, search_tie_ordered
from shard.list_groups import eligible
from shard.specs import FLAT_TYPES, build_index, gpu_kind

log = logging.getLogger(__name__)

# IndexIVF.parallel_mode for a search of the lists the router chose: split the queries over the OpenMP threads
PREASSIGNED_PARALLEL_MODE = 3


class VectorIndex(IndexLifecycle):
    """The vectors of one collection on one shard: writes, searches and the GPU mirror over the FAISS index that
    :class:`shard.index_lifecycle.IndexLifecycle` holds (the untrained buffer, training, checkpoint state).

    Args:
        coll: the collection (dim, metric, index factory string, search defaults).
        gpu: a GPU backend (``lookalike.gpu``) when the shard runs on a GPU: searches then use a GPU mirror of the
            index once :meth:`build_gpu` made one (see the module's docstring). None: CPU only.
        template: the collection's trained, empty index (shard.trained) to start from.
    """

    def __init__(self, coll: CollectionConfig, gpu=None, template=None):
        super().__init__(coll, template)
        # GPU: the backend (None: CPU only) and the mirror searches use (see shard.gpu_keeper).
        self._gpu = gpu if gpu_kind(coll.index, coll.metric, self._main) else None
        self._keeper = MirrorKeeper(coll, self._gpu)
        self._norm_bound: float | None = None  # metric "ip": the norms' bound of a flat search (flat_search)

    # --- shared lists (shard.list_groups) -------------------------------------------------------------------
    def share_lists(self, groups) -> bool:
        """Moves a trained CPU IVF index's entries into its process's shared lists (``groups``); True if it did.
        The caller holds the write lock (or no one searches or writes the index yet)."""
        if groups is None or self._member is not None or self._gpu is not None or not self._router_may_choose_lists \
                or not eligible(self._ivf):
            return False
        self._member = groups.join(self, self._ivf, self.coll.name, self.trained_version)
        return self._member is not None

    def release(self) -> None:
        """Takes its entries out of its process's shared lists, if they are there (the index is let go)."""
        if self._member is not None:
            member, self._member = self._member, None
            member.release(self._ivf)

    # --- writes -------------------------------------------------------------------------------------------
    def add(self, labels: np.ndarray, x: np.ndarray) -> None:
        """Adds vectors (shape (n, d) float32 or (n, d/8) uint8) under labels (shape (n,) int64, not present)."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        x = self._prepare(x)
        if self._buffer is not None:  # training happens apart: see needs_training
            return _add_plain(self, self._buffer, labels, x)
        self._add_main(labels, x)

    def _add_main(self, labels: np.ndarray, x: np.ndarray) -> None:
        if self._graph:
            self._labels.add(self._main, labels, x)
            return
        if self._member is not None:  # its entries tagged in its process's shared lists (shard.list_groups)
            return self._member.add(self._main, labels, x)
        _add_plain(self, self._main, labels, x)
        self._keeper.apply("add", labels, x)

    def remove(self, labels: np.ndarray) -> int:
        """Removes vectors by label; returns how many were removed."""
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if len(labels) == 0:
            return 0
        if self._buffer is not None:
            return self._buffer.remove_ids(faiss.IDSelectorBatch(labels))
        if self._graph:
            removed, rebuild = self._labels.remove(labels, self._main.ntotal)
            if rebuild:
                _rebuild_graph(self)
            return removed
        # IVF without a direct map scans every list's ids against the selector (a hash set): 8-10 ms for 10k
        # labels of 1M (IVF1024,Flat, one thread; docs/BENCHMARKS.md, "Shard memory per vector")
        if self._member is not None:
            return self._member.remove(self._main, labels)
        removed = self._main.remove_ids(faiss.IDSelectorBatch(labels))
        if removed:
            self._keeper.apply("remove", labels)
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
        return old, self._keeper.follow(mirror, labels)

    def install_trained(self, built) -> None:
        """Switches from the buffer to the index built by :meth:`build_trained` (fast: call under the write lock)."""
        super().install_trained(built)
        self._keeper.install(None)  # built next (build_gpu), from the trained index

    @classmethod
    def from_state(cls, coll: CollectionConfig, index, arrays: dict[str, np.ndarray], trained: bool,
                   gpu=None) -> VectorIndex:
        """The index :meth:`state` gave, read back. The GPU mirror is built later (:meth:`build_gpu`).

        Raises:
            ValueError: ``index`` is not what this collection builds (class, dimension, metric, training) or the
                arrays do not fit it.
        """
        self = cls(coll, gpu)
        self._restore(index, arrays, trained)
        return self

    # --- GPU mirror (shard.gpu_keeper) ------------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        """True when searches run on a GPU mirror."""
        return self._keeper.mirror is not None

    @property
    def _mirror(self):
        """The GPU mirror searches use; None: they run on the CPU."""
        return self._keeper.mirror

    @property
    def gpu_nbytes(self) -> int:
        """Approximate GPU bytes of the mirror (tombstones included)."""
        return self._keeper.nbytes

    def gpu_bytes_for(self, n: int) -> int:
        """GPU bytes that ``n`` more vectors take on a GPU shard (0 on the CPU), with the copy of the last flat
        segment that an add to it makes."""
        return self._keeper.bytes_for(n, self._main)

    def gpu_bytes_of(self, main=None) -> int:
        """GPU bytes a mirror of ``main`` (default: the main index) would take."""
        return self._keeper.bytes_of(self._main if main is None else main)

    @property
    def gpu_needs_build(self) -> bool:
        """True on a GPU shard whose trained index has no mirror, or one with too many tombstones."""
        return self._buffer is None and self._keeper.needs_build

    def build_gpu(self, main=None):
        """A GPU mirror of ``main`` (default: the main index) for :meth:`install_gpu` or :meth:`install`.

        Only reads the CPU index, so searches may run meanwhile; the caller keeps writes out until it is installed.
        None without a GPU, while the index is still its training buffer, or when the build failed (logged:
        searches stay on the CPU, and the build is tried again after a minute).
        """
        if self._gpu is None or self._buffer is not None:
            return None
        return self._keeper.build(self._main if main is None else main)

    def install_gpu(self, mirror):
        """Swaps in a mirror from :meth:`build_gpu` (None: search on the CPU). The caller holds the write lock and
        made no write since the build. Returns the old mirror: let it go after releasing the lock."""
        return self._keeper.install(mirror)

    def sync_gpu(self) -> bool:
        """Builds and installs a mirror when one is needed, in one step (for callers without concurrency)."""
        if not self.gpu_needs_build:
            return False
        mirror = self.build_gpu()
        if mirror is not None:
            self.install_gpu(mirror)
        return mirror is not None

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
            ``shard.index_reads._MAX_TIE_FETCH`` results are looked at for that), so every shard or replica holding
            the same vectors answers the same.
        """
        return search_tie_ordered(lambda xq, k, coarse: self._search_any(xq, k, nprobe, ef_search, coarse),
                                  self._prepare(xq), k, self.ntotal, self.coll.larger_is_better, coarse)

    def _search_any(self, xq: np.ndarray, k: int, nprobe: int, ef_search: int,
                    coarse=None) -> tuple[np.ndarray, np.ndarray]:
        """Top k from the GPU mirror when it can answer, else from the CPU index (xq prepared)."""
        if self._buffer is None:
            found = self._keeper.search(xq, k, nprobe or self.coll.nprobe, ef_search or self.coll.ef_search)
            if found is not None:
                D, L, rest = found
                if len(rest):  # queries whose top k the GPU could not tell past its tombstones
                    D[rest], L[rest] = self._search_cpu(xq[rest], k, nprobe, ef_search)
                return D, L
        return self._search_cpu(xq, k, nprobe, ef_search, coarse)

    def _search_cpu(self, xq: np.ndarray, k: int, nprobe: int, ef_search: int, coarse=None):
        if self._buffer is not None:
            D, L = flat_search(self, self._buffer, xq, k)
        elif self._graph:
            D, pos = self._labels.search(self._main, xq, k, ef_search or self.coll.ef_search, self._binary)
            L = self._labels.labels_at(pos)
        elif self._ivf is not None:
            nprobe = nprobe or self.coll.nprobe
            if self._binary:
                self._ivf.nprobe = nprobe  # binary IVF takes no per-call parameters
                D, L = self._main.search(xq, k)
            else:  # lists chosen by the router, or by search_ivf (lookalike.nearest)
                D, L = search_ivf(self._main, xq, k, nprobe, coarse, self._member)
        else:
            D, L = flat_search(self, self._main, xq, k)
        return D.astype(np.float32, copy=False), L

    @property
    def _router_may_choose_lists(self) -> bool:
        """A trained IVF over float vectors with a flat coarse quantizer and no transform before it: a router
        holding the same quantizer chooses the same lists (see coarse_quantizer). A GPU mirror chooses its own."""
        return (self._buffer is None and not self._binary and bool(self.trained_version)
                and isinstance(self._main, faiss.IndexIVF)
                and type(faiss.downcast_index(self._main.quantizer)) in FLAT_TYPES)

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


def flat_search(vindex: VectorIndex, index, xq: np.ndarray, k: int, matches=None):
    """``index.search(xq, k)`` (only the labels of ``matches``, a shard.filtered.Matches, when given); over a float
    flat index (an ``IndexIDMap`` of an ``IndexFlat``: a Flat spec, or the buffer before training), with distances
    that do not depend on the batch (lookalike.nearest), the candidates of a batch of 8 to 999 unfiltered queries
    found by BLAS products (docs/BENCHMARKS.md, "Distances whatever the batch")."""
    inner = None if vindex._binary else faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlat):
        return index.search(xq, k, params=None if matches is None else faiss.SearchParameters(sel=matches.batch()))
    metric = vindex.coll.metric
    if metric == "ip" and vindex._norm_bound is None:
        vindex._norm_bound = max_norm(inner)  # then kept up by _bound_norms
    ids = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size()) if index.ntotal else None
    search = among = None
    if matches is not None:  # FAISS's search through a selector of their positions; those positions if scanned
        params = faiss.SearchParameters(sel=faiss.IDSelectorTranslated(index.id_map, matches.batch()))
        search = lambda x, kk: inner.search(x, kk, params=params)  # noqa: E731
        among = (len(matches.labels), lambda: _positions_of(ids, matches.labels))
    elif ids is not None and product_pays(*xq.shape):  # BLAS products: 3.8-8.3x FAISS's scan at batch 100
        xb = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(-1, inner.d)
        threads = faiss.omp_get_max_threads()  # the search's share of the process's threads (shard.host)
        search = lambda x, kk: product_candidates(xb, x, kk, metric != "l2", threads=threads)  # noqa: E731
    D, P = nearest(inner, xq, k, 1.001 if metric == "cosine" else vindex._norm_bound, search, among)
    if ids is None:
        return D, P
    return D, np.where(P >= 0, ids[np.maximum(P, 0)], -1)


def _positions_of(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The positions of ``labels`` (all present) in an id map ``ids``, sorted."""
    order = np.argsort(ids, kind="stable")
    return np.sort(order[np.searchsorted(ids, labels, sorter=order)])


def _add_plain(vindex: VectorIndex, index, labels: np.ndarray, x: np.ndarray) -> None:
    """Adds to ``index``, its buffer or a main index that is neither a graph nor in shared lists."""
    if isinstance(index, faiss.IndexIVF) and not vindex._binary:
        ivf_add(index, x, labels)  # in the lists a search finds them in, whatever the batch
    else:
        index.add_with_ids(x, labels)
        _bound_norms(vindex, x)


def _bound_norms(vindex: VectorIndex, x: np.ndarray) -> None:
    """Keeps ``vindex._norm_bound`` (metric "ip": a bound on the norms of the vectors of its flat index, for
    lookalike.nearest) above the norms of ``x``, vectors it adds. Removals leave it a bound."""
    if vindex.coll.metric == "ip" and vindex._norm_bound is not None and len(x):
        vindex._norm_bound = max(vindex._norm_bound, float(np.sqrt(np.einsum("ij,ij->i", x, x,
                                                                                dtype=np.float64).max())))


def _rebuild_graph(vindex) -> None:
    """Builds a graph index again without its removed vectors (VectorIndex.remove, once a third of it is dead)."""
    live, labels = vindex._labels.live()
    x = reconstruct_keys(vindex._main, live, vindex._cols, vindex._binary) if len(live) else None
    log.info("rebuilding %s %r without %d removed vectors", vindex.coll.name, vindex.coll.index, vindex._labels.dead)
    vindex._main = (faiss.clone_index(vindex._template) if vindex._template is not None
                    else build_index(vindex.coll.dim, vindex.coll.metric, vindex.coll.index))
    vindex._labels = GraphLabels()
    if x is not None:
        if not vindex._main.is_trained:  # a graph over compressed codes (HNSW32_PQ16): retrain on what is live
            vindex._main.train(x)
        vindex._add_main(labels, x)


def search_ivf(main, xq: np.ndarray, k: int, nprobe: int, coarse=None, member=None, whole: bool = False, sel=None):
    """The top k of an IVF index ``main``: in the lists ``coarse`` names (lists, distances) when
    given (the router chose them with this very quantizer: see VectorIndex.coarse_quantizer), else in the nprobe
    nearest. An index in shared lists (``member``, shard.list_groups) sees its own entries only, untagged, under
    the group's read lock; with ``whole``, every entry of the group (the caller holds that lock and checked that
    they are those of the shards searched). ``sel``: a FAISS selector of the entries searched instead of the
    member's own (a filter's: shard.filtered; tagged ids for a member)."""
    if coarse is None and isinstance(main, faiss.IndexIVF):  # the lists a router chooses: the same whatever the batch
        coarse = ivf_lists(main, xq, nprobe)
    params = faiss.SearchParametersIVF(nprobe=coarse[0].shape[1] if coarse is not None else nprobe)
    if sel is not None or (member is not None and not whole):
        params.sel = sel if sel is not None else member.selector()
    D = np.empty((len(xq), k), dtype=np.float32)
    L = np.empty((len(xq), k), dtype=np.int64)
    with member.group.lock.read() if member is not None and not whole else contextlib.nullcontext():
        if coarse is not None:
            # FAISS's search() splits a batch over its threads; search_preassigned only in mode 3 (the same
            # answer: each query is answered alone). search() runs the same in either mode.
            main.parallel_mode = PREASSIGNED_PARALLEL_MODE
            main.search_preassigned_c(len(xq), faiss.swig_ptr(xq), k, faiss.swig_ptr(coarse[0]),
                                      faiss.swig_ptr(coarse[1]), faiss.swig_ptr(D), faiss.swig_ptr(L), False, params)
        else:
            main.search_c(len(xq), faiss.swig_ptr(xq), k, faiss.swig_ptr(D), faiss.swig_ptr(L), params)
    return D, (member.untag(L) if member is not None else L)


def search_shared(indexes: list[VectorIndex], xq: np.ndarray, k: int, nprobe: int,
                  coarse: tuple | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The top k over several shards' indexes whose entries are all the entries of one group of shared lists
    (shard.list_groups): one FAISS search of the lists, the work of one index. ``coarse``: the router's (trained
    version, nprobe, lists, distances), or None. Ties in label order, as :meth:`VectorIndex.search`. The caller
    holds every index's read lock. None when they are not exactly a group's holders."""
    first = indexes[0]
    member = first._member
    if member is None or any(i._member is None or i._member.group is not member.group for i in indexes):
        return None
    with member.group.lock.read():  # no member joins or leaves while it is searched
        if member.group.holders() != {id(i) for i in indexes}:
            return None
        cs = first.check_coarse(coarse[0], len(xq), *coarse[1:]) if coarse is not None else None

        def search(x, kk, c):
            return search_ivf(first._main, x, kk, nprobe or first.coll.nprobe, c, member, whole=True)

        return search_tie_ordered(search, first._prepare(xq), k, sum(i.ntotal for i in indexes),
                                  first.coll.larger_is_better, cs)


def search_stacked(indexes: list[VectorIndex], xq: np.ndarray, k: int, version: int, nprobe: int,
                   lists: np.ndarray, dis: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The top k over several shards' IVF-PQ indexes of one trained version, their lists searched as one index
    (``HStackInvertedLists``): each probed list's distance table is built once for all of them, not once per
    shard (shard.stacked says when and why). Ties in label order, as :meth:`VectorIndex.search`. The caller holds
    every index's read lock. None when one of them cannot be searched so: not a CPU IVF-PQ of ``version`` whose
    lists the router chose, or one that keeps precomputed tables (their sums round differently)."""
    ivfs = []
    for index in indexes:
        if index._gpu is not None or index.trained_version != version or not index._router_may_choose_lists \
                or index._member is not None:  # shared lists: each stacked would be all of them (search_shared)
            return None
        ivf = faiss.downcast_index(index._main)
        if type(ivf) is not faiss.IndexIVFPQ or (ivf.by_residual and ivf.use_precomputed_table != -1):
            return None
        ivfs.append(ivf)
    first = indexes[0]
    coarse = first.check_coarse(version, len(xq), nprobe, lists, dis)
    if coarse is None:
        return None
    one = ivfs[0]
    view = faiss.IndexIVFPQ(one.quantizer, one.d, one.nlist, one.pq.M, one.pq.nbits, one.metric_type)
    view.pq = one.pq
    view.by_residual, view.use_precomputed_table, view.polysemous_ht = one.by_residual, -1, one.polysemous_ht
    view.is_trained, view.parallel_mode = True, PREASSIGNED_PARALLEL_MODE
    parts = faiss.InvertedListsPtrVector()
    for ivf in ivfs:
        parts.push_back(ivf.invlists)
    stack = faiss.HStackInvertedLists(parts.size(), parts.data())  # copies a probed list's codes together
    view.replace_invlists(stack, False)
    view.ntotal = sum(int(ivf.ntotal) for ivf in ivfs)

    def search(x, kk, cs):
        D = np.empty((len(x), kk), dtype=np.float32)
        L = np.empty((len(x), kk), dtype=np.int64)
        view.search_preassigned_c(len(x), faiss.swig_ptr(x), kk, faiss.swig_ptr(cs[0]), faiss.swig_ptr(cs[1]),
                                  faiss.swig_ptr(D), faiss.swig_ptr(L), False,
                                  faiss.SearchParametersIVF(nprobe=cs[0].shape[1]))
        return D, L

    return search_tie_ordered(search, first._prepare(xq), k, sum(i.ntotal for i in indexes),
                              first.coll.larger_is_better, coarse)
