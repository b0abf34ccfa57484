"""The nearest vectors of a flat FAISS index, with distances that do not depend on the batch a query comes in.

FAISS picks the kernel of a flat search (``IndexFlatL2``, ``IndexFlatIP``) by the batch's shape, and the kernels
round differently. Measured with faiss-cpu 1.15.1 at d = 128: BLAS (||x||^2 + ||y||^2 - 2 x.y) once a batch holds
about 1,000 queries; a kernel over parts of the database when a batch has fewer queries than OpenMP threads (a
single query on a shard whose other search took half the threads); for inner products one kernel for a single
query and another for several. So the same query alone, in a batch of 100 (the router's batcher puts callers
together), or on a busier shard, came back with other distances, and at a near tie with other neighbours; and the
same vector added in a batch of 20,000 or in batches of 500 was put in another IVF list (3 of 20,000 here), so a
replica or a restart that added it in other batches could answer a query differently.

:func:`nearest` answers as each query against each vector alone would: its distances are FAISS's per-pair
kernels' (``fvec_L2sqr``, ``fvec_inner_product``, through ``compute_distance_subset``), and equal distances come
in position order. It costs about FAISS's own search: FAISS searches k + a margin with whatever kernel it picks,
the candidates' distances are computed again pair by pair, and a query whose candidates might not hold its k
nearest by those distances is scanned pair by pair (rare: see :func:`_complete`). Used for the IVF lists a
query probes (router.coarse, shard.cpu_index), those a vector is added to, and Flat indexes' searches. As the
candidates' rounding does not matter, a batch of 8 to 999 queries finds them by BLAS products
(:func:`product_candidates`, where FAISS would scan query by query): docs/BENCHMARKS.md, "Distances whatever the
batch".

Uses faiss, numpy and threadpoolctl only.
"""

from __future__ import annotations

import faiss
import numpy as np
from threadpoolctl import ThreadpoolController

_U = 2.0 ** -24  # float32's unit roundoff
_SCAN_STEP = 65536  # vectors compared at a time by a query scanned pair by pair
_PRODUCT_ROWS = 8192  # vectors multiplied at a time by product_candidates: its block of products stays in cache
PRODUCT_FROM = 8  # queries a batch needs for product_candidates to pay (product_pays)
_BLAS = ThreadpoolController()  # numpy's BLAS kept to the threads asked: its idle threads spin, as OpenMP's
FLT_MAX = float(np.finfo(np.float32).max)  # FAISS's padding where fewer than k vectors exist


def margin(k: int) -> int:
    """Candidates FAISS is asked for beyond ``k``: a few, as a larger heap costs FAISS more (k 12 + 11 of 4096
    lists: 0.36 ms more a batch of 100 than k 12) and a query whose candidates fall short is only scanned."""
    return 2 + k // 8


def nearest(index, x: np.ndarray, k: int, norm_bound: float | None = None, search=None,
            among=None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest vectors of ``index`` (a FAISS ``IndexFlatL2`` or ``IndexFlatIP``) to each row of ``x``.

    Args:
        x: shape (nq, d) float32 queries, C-contiguous.
        norm_bound: inner product only: a bound on the norm of every vector in ``index`` (1.001 for normalized
            ones); None: found from the vectors (a pass over them).
        search, among: only some of the vectors: ``among`` is (their count, a function giving their positions,
            called only for a query scanned pair by pair) and ``search(x, kk)`` FAISS's search of them (a
            selector): (distances, positions).

    Returns:
        (D, I): shape (nq, k) float32 distances by the per-pair kernels (inner products for ``IndexFlatIP``), best
        first, equal ones in position order; shape (nq, k) int64 positions, -1 past the index's size (distance
        FLT_MAX, or -FLT_MAX for inner products, as FAISS pads).
    """
    ip = index.metric_type == faiss.METRIC_INNER_PRODUCT
    x = np.ascontiguousarray(x, dtype=np.float32)
    nq, n = len(x), int(index.ntotal) if among is None else among[0]
    D = np.full((nq, k), -FLT_MAX if ip else FLT_MAX, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    if not nq or not n or k <= 0:
        return D, I
    kk = min(n, k + margin(k))
    fast_D, cand = (search or index.search)(x, kk)
    exact = pair_distances(index, x, cand)
    exact_D, cand = _order(exact, cand, ip)
    take = min(k, kk)
    D[:, :take], I[:, :take] = exact_D[:, :take], cand[:, :take]
    if kk < n:
        worst = fast_D[:, kk - 1].astype(np.float64)
        if ip and norm_bound is None:
            norm_bound = max_norm(index)
        ok = _complete(x, worst, exact_D[:, k - 1].astype(np.float64), ip, norm_bound) & (cand >= 0).all(axis=1)
        domain = among[1]() if among is not None and not ok.all() else None
        for q in np.flatnonzero(~ok):
            D[q], I[q] = scan(index, x[q], k, domain)
    return D, I


def product_pays(nq: int, d: int) -> bool:
    """Whether a batch of ``nq`` queries of dimension ``d`` finds its candidates faster by
    :func:`product_candidates` than by FAISS's search: from ``PRODUCT_FROM`` queries, below FAISS's own BLAS
    threshold (nq x d of 128,000: 1,000 queries at d=128), past which FAISS's search blocks its product better (15
    against 29-43 ms at 1,200 queries over 4096 centroids: bench/nearest_bench.py)."""
    return PRODUCT_FROM <= nq and nq * d < faiss.cvar.distance_compute_blas_threshold


def product_candidates(xb: np.ndarray, x: np.ndarray, kk: int, ip: bool, norms: np.ndarray | None = None,
                       threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``kk`` nearest rows of ``xb`` (shape (n, d) float32) to each query by BLAS products (numpy, on
    ``threads`` threads), a block of ``_PRODUCT_ROWS`` rows at a time, best first: (distances, positions). The
    distances round otherwise than FAISS's but within the bound :func:`nearest` allows, which computes the kept
    ones again pair by pair: use as its ``search``. ``norms``: the rows' squared norms, if known (L2)."""
    nq = len(x)
    best_key = np.full((nq, 0), np.inf, dtype=np.float32)
    best_pos = np.empty((nq, 0), dtype=np.int64)
    with _BLAS.limit(limits=threads, user_api="blas"):
        for s in range(0, len(xb), _PRODUCT_ROWS):
            block = xb[s:s + _PRODUCT_ROWS]
            key = x @ block.T  # the inner products; then the key sorted ascending: -ip, or |y|^2 - 2 x.y for L2
            if ip:
                np.negative(key, out=key)
            else:
                key *= -2
                key += norms[s:s + len(block)] if norms is not None else np.einsum("ij,ij->i", block, block)
            keep = min(kk, key.shape[1])
            part = np.argpartition(key, keep - 1, axis=1)[:, :keep] if keep < key.shape[1] else \
                np.broadcast_to(np.arange(key.shape[1]), key.shape)
            best_key = np.concatenate([best_key, np.take_along_axis(key, part, axis=1)], axis=1)
            best_pos = np.concatenate([best_pos, part + s], axis=1)
            if best_key.shape[1] > kk:
                part = np.argpartition(best_key, kk - 1, axis=1)[:, :kk]
                best_key, best_pos = np.take_along_axis(best_key, part, 1), np.take_along_axis(best_pos, part, 1)
    order = np.argsort(best_key, axis=1)
    best_key, best_pos = np.take_along_axis(best_key, order, 1), np.take_along_axis(best_pos, order, 1)
    D = -best_key if ip else best_key + np.einsum("ij,ij->i", x, x)[:, None]
    return D, best_pos


def pair_distances(index, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Shape (nq, m) float32: each query's distance to its row of ``ids`` (positions; -1 gives the worst float) by
    FAISS's per-pair kernel."""
    ip = index.metric_type == faiss.METRIC_INNER_PRODUCT
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    safe = np.ascontiguousarray(np.maximum(ids, 0))
    out = np.empty(ids.shape, dtype=np.float32)
    index.compute_distance_subset(len(x), faiss.swig_ptr(x), ids.shape[1], faiss.swig_ptr(out), faiss.swig_ptr(safe))
    out[ids < 0] = -FLT_MAX if ip else FLT_MAX
    return out


def scan(index, q: np.ndarray, k: int, domain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One query's ``k`` nearest by the per-pair kernel over every vector of ``index`` (or those at the positions
    ``domain``): (distances, positions), each shape (min(k, vectors),)."""
    ip = index.metric_type == faiss.METRIC_INNER_PRODUCT
    x = np.ascontiguousarray(q, dtype=np.float32).reshape(1, -1)
    best_D, best_I = np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
    n = int(index.ntotal) if domain is None else len(domain)
    for start in range(0, n, _SCAN_STEP):
        ids = (np.arange(start, min(start + _SCAN_STEP, n), dtype=np.int64) if domain is None
               else np.asarray(domain[start:start + _SCAN_STEP], dtype=np.int64)).reshape(1, -1)
        d = pair_distances(index, x, ids)
        Dm, Im = _order(np.concatenate([best_D, d[0]])[None], np.concatenate([best_I, ids[0]])[None], ip)
        best_D, best_I = Dm[0, :k], Im[0, :k]
    return best_D, best_I


def max_norm(index) -> float:
    """The largest norm of the vectors of a flat index (a pass over them)."""
    n, d = int(index.ntotal), int(index.d)
    if not n:
        return 0.0
    xb = faiss.rev_swig_ptr(faiss.downcast_index(index).get_xb(), n * d).reshape(n, d)
    top = 0.0
    for s in range(0, n, _SCAN_STEP):
        top = max(top, float(np.sqrt(np.einsum("ij,ij->i", xb[s:s + _SCAN_STEP], xb[s:s + _SCAN_STEP],
                                                dtype=np.float64).max())))
    return top


def _order(D: np.ndarray, I: np.ndarray, ip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each row sorted best first, equal distances (and padding) in position order, -1 positions last."""
    key = np.where(I < 0, np.inf, -D.astype(np.float64) if ip else D.astype(np.float64))
    pos = np.where(I < 0, np.iinfo(np.int64).max, I)
    order = np.lexsort((pos, key), axis=-1)
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _complete(x: np.ndarray, worst: np.ndarray, kth: np.ndarray, ip: bool,
              norm_bound: float | None) -> np.ndarray:
    """Per query: True when no vector outside the candidates can be among its k nearest by the per-pair kernel,
    nor tie with the k-th. ``worst``: FAISS's distance of its last candidate (any vector left out is at least
    that far, or that small an inner product, by FAISS's kernel); ``kth``: the k-th per-pair distance.

    A float32 sum of d products is within gamma = d u / (1 - d u) of the exact sum of their magnitudes (u = 2^-24)
    whatever the order of the sum, so the two kernels' values for one pair differ by at most
    2 gamma(d + 3) (|x| + |y|)^2 for squared L2 (BLAS's expansion and the direct sum alike) and 2 gamma(d) |x| |y|
    for inner products; a factor of 2 more is kept. For L2 the norm of a vector left out is bounded through the
    triangle inequality, |y| <= |x| + s with s its distance's root, so no bound on the index's norms is needed:
    its FAISS distance is at least ``worst``, so s is at least the root of s^2 + e(2|x| + s)^2 = worst, and its
    per-pair distance at least s^2 - e(2|x| + s)^2, which grows with s."""
    d = x.shape[1]
    xn = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    if ip:
        e = 4 * d * _U / (1 - d * _U)
        return worst + e * xn * float(norm_bound) < kth
    e = 4 * (d + 3) * _U / (1 - (d + 3) * _U)
    a = 2 * xn
    # (1 + e) s^2 + 2 e a s + e a^2 - worst = 0, the positive root
    disc = (e * a) ** 2 - (1 + e) * (e * a * a - worst)
    s = (-e * a + np.sqrt(np.maximum(disc, 0.0))) / (1 + e)
    low = (1 - e) * s * s - 2 * e * a * s - e * a * a
    return (disc > 0) & (s > e * a / (1 - e)) & (low > kth)


# --- IVF lists (a flat coarse quantizer) ---------------------------------------------------------------------
_BOUNDS: dict[tuple, float] = {}  # an inner-product quantizer's (address, size, first and last centroid) -> bound


def quantizer_bound(q) -> float | None:
    """A bound on the norms of an inner-product flat quantizer's centroids (cached), None for L2."""
    if q.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    n, d = int(q.ntotal), int(q.d)
    if not n:
        return 0.0
    xb = faiss.rev_swig_ptr(faiss.downcast_index(q).get_xb(), n * d)
    # the address and the end rows: a quantizer trained again at a freed one's address differs in its centroids
    key = (int(q.this), n, xb[:d].tobytes(), xb[-d:].tobytes())
    bound = _BOUNDS.get(key)
    if bound is None:
        if len(_BOUNDS) > 256:
            _BOUNDS.clear()
        bound = _BOUNDS[key] = max_norm(q)
    return bound


def ivf_lists(ivf, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(lists, distances), each shape (nq, nprobe), the IVF lists an ``IndexIVF``'s flat coarse quantizer gives
    each query by :func:`nearest`; None for another quantizer (FAISS then chooses them itself)."""
    q = faiss.downcast_index(ivf.quantizer)
    if not isinstance(q, faiss.IndexFlat):
        return None
    D, I = nearest(q, np.ascontiguousarray(x, dtype=np.float32), max(1, min(nprobe, int(q.ntotal))),
                   quantizer_bound(q))
    return I, D


# IVF kinds whose add takes the lists from its caller (``add_core``); FAISS's fast-scan IVF chooses them itself
_PRESET_LISTS = (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)


def _list_of_each(ivf, x: np.ndarray) -> np.ndarray | None:
    """The list :func:`ivf_lists` gives each vector of ``x`` (float32, C-contiguous), for the IVF kinds of
    ``_PRESET_LISTS``; None for others, or no vectors (FAISS then chooses)."""
    if not len(x) or not isinstance(faiss.downcast_index(ivf), _PRESET_LISTS):
        return None
    found = ivf_lists(ivf, x, 1)
    return None if found is None else np.ascontiguousarray(found[0][:, 0])


def ivf_add(ivf, x: np.ndarray, ids: np.ndarray) -> None:
    """``ivf.add_with_ids(x, ids)``, each vector put in the list :func:`ivf_lists` gives it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lists = _list_of_each(ivf, x)
    if lists is None:
        return ivf.add_with_ids(x, ids)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def ivf_encode(ivf, x: np.ndarray) -> np.ndarray:
    """``ivf.sa_encode(x)``: each vector's list number and code, its list the one :func:`ivf_lists` gives it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lists = _list_of_each(ivf, x)
    if lists is None:
        return ivf.sa_encode(x)
    codes = np.empty((len(x), ivf.sa_code_size()), dtype=np.uint8)
    ivf.encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes), True)
    return codes
