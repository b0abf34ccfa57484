"""The router chooses the IVF lists a query probes, once for all shards.

Every shard of a collection holds the same trained IVF index (shard.trained), so every shard would quantize a query
against the same centroids and probe the same lists. Doing it once, here, saves (S - 1) coarse quantizations per
query over S shards: measured in-process at 8 shards (docs/BENCHMARKS.md, "Shared quantizer: quantize once or per
shard"), 11-56% of the CPU of a search, the more the larger nlist (IVF4096: half). Each shard then runs FAISS's
``search_preassigned`` with these lists (shard.cpu_index ``VectorIndex.search(coarse=...)``).

Only for indexes a router can quantize for exactly as a shard would: float vectors, ``IVF<nlist>,...`` with a flat
coarse quantizer and no transform before it (the spec text says so). The centroids are fetched from a shard (RPC
``Quantizer``) in a background thread once per trained version; until they arrive, or when the trained version
changed, searches go out without an assignment and shards quantize themselves. A shard whose index runs another
version ignores the assignment, so an assignment can never make an answer wrong, only cheaper. Router and shards
choose a query's lists with lookalike.nearest, which gives the same lists and distances whatever the batch.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

import faiss
import numpy as np

from lookalike.config import CollectionConfig
from lookalike.nearest import max_norm, nearest, product_candidates, product_pays
from protos import shard_pb2

log = logging.getLogger(__name__)

_PLAIN_IVF = re.compile(r"IVF(\d+),(Flat|PQ\S*|SQ\S*)")
_RETRY_S = 1.0  # a fetch that found no shard on the collection's trained version is tried again after this
# Quantizations of up to this many multiply-adds (queries x nlist x dim) run on the router's event loop; larger ones
# go to a thread (a millisecond or more).
QUANTIZE_ON_LOOP = 2_000_000


def router_may_quantize(cfg: CollectionConfig) -> bool:
    """True for a trained collection whose lists the router can choose as its shards would."""
    return bool(cfg.trained_version) and not cfg.binary and _PLAIN_IVF.fullmatch(cfg.index) is not None


class _Quantizer:
    def __init__(self, version: int, index):
        self.version = version
        self.index = index  # a flat index over the centroids
        self.ip = index.metric_type == faiss.METRIC_INNER_PRODUCT
        # inner products: a bound on the centroids' norms (lookalike.nearest); None for L2
        self.norm_bound = max_norm(index) if self.ip else None
        # the index's own centroids (a view: no second copy) and their squared norms, for the products (candidates)
        self.centroids = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        self.norms = np.einsum("ij,ij->i", self.centroids, self.centroids)

    def candidates(self, x: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` nearest centroids of each query by BLAS products on one thread (lookalike.nearest
        ``product_candidates``), for ``nearest`` to settle: batch 100 over 4096 lists 2.5 ms against FAISS's 4.6
        (docs/BENCHMARKS.md, "Distances whatever the batch")."""
        return product_candidates(self.centroids, x, kk, self.ip, self.norms)


class CoarseQuantizers:
    """Per collection, the coarse quantizer of its current trained version (see the module docstring).

    Args:
        fetch: ``fetch(name)`` returns (version, centroids (nlist, dim) float32) from a shard of the collection,
            or None when none answered with centroids; called in a background thread.
    """

    def __init__(self, fetch: Callable[[str], tuple[int, np.ndarray] | None]):
        self._fetch = fetch
        self._have: dict[str, _Quantizer] = {}
        self._pending: set[str] = set()
        self._tried: dict[str, float] = {}
        self._lock = threading.Lock()

    def ready(self, cfg: CollectionConfig) -> _Quantizer | None:
        """The quantizer for ``cfg``'s trained version, or None (and a fetch started when none is under way)."""
        q = self._have.get(cfg.name)
        if q is not None and q.version == cfg.trained_version:  # the usual case, per search: no spec parsing
            return q
        if not router_may_quantize(cfg):
            return None
        with self._lock:
            if cfg.name in self._pending or time.monotonic() < self._tried.get(cfg.name, 0.0) + _RETRY_S:
                return None
            self._pending.add(cfg.name)
        threading.Thread(target=self._load, args=(cfg,), daemon=True, name=f"coarse-{cfg.name}").start()
        return None

    def _load(self, cfg: CollectionConfig) -> None:
        try:
            got = self._fetch(cfg.name)
            if got is not None and got[0] == cfg.trained_version:
                version, centroids = got
                index = (faiss.IndexFlatIP if cfg.larger_is_better else faiss.IndexFlatL2)(centroids.shape[1])
                index.add(np.ascontiguousarray(centroids, dtype=np.float32))
                self._have[cfg.name] = _Quantizer(version, index)
                log.info("%s: the router chooses the IVF lists of trained version %d (%d lists)", cfg.name,
                         version, index.ntotal)
        except Exception as err:  # noqa: BLE001: shards quantize themselves meanwhile
            log.warning("%s: no coarse quantizer from the shards (%s); they choose their lists themselves",
                        cfg.name, err)
        finally:
            with self._lock:
                self._pending.discard(cfg.name)
                self._tried[cfg.name] = time.monotonic()

    def forget(self, name: str) -> None:
        self._have.pop(name, None)

    @staticmethod
    def assign(q: _Quantizer, cfg: CollectionConfig, xq: np.ndarray, nprobe: int) -> shard_pb2.CoarseAssignment:
        """The lists each query probes (nprobe 0: the collection's default), as the shards' request field."""
        nprobe = max(1, min(nprobe or cfg.nprobe, q.index.ntotal))
        x = np.ascontiguousarray(xq, dtype=np.float32)
        if cfg.metric == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        D, I = _search_on_one_thread(q, x, nprobe)
        return shard_pb2.CoarseAssignment(version=q.version, nprobe=nprobe, lists=I.astype("<i8").tobytes(),
                                          distances=D.astype("<f4").tobytes())


def _search_on_one_thread(q: _Quantizer, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest centroids of each query as each shard finds them (lookalike.nearest: the same whatever the
    batch), on one OpenMP thread; the calling thread's setting (OpenMP's is per thread) is given back after. On all
    cores, OpenMP's idle workers spin for a while after each parallel search, and where the router shares the cores
    with shards (the embedded cluster, a small node) that spin is the shards' CPU: measured with
    bench/cpu_split_bench.py (500k x 128, IVF1024, 8 shards on 2 cores, batch 100), the router's process 13.0-13.5
    -> 9.4-10.0 ms of CPU a batch (docs/BENCHMARKS.md, "Where a batch of searches spends its CPU"). On one core a
    batch of 100 at IVF4096 x 128 takes 7 ms (4.3 on two): the same work FAISS's own search does."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return nearest(q.index, x, k, q.norm_bound, q.candidates if product_pays(*x.shape) else None)
    finally:
        faiss.omp_set_num_threads(threads)
