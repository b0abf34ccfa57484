"""The GPU mirror of one VectorIndex (shard.cpu_index) on a GPU shard: built from the CPU index, kept up to date
with its writes, searched in its place, rebuilt when tombstones pile up, and given up for the CPU when a build or a
search fails.

The CPU index stays the source of truth (writes, removal, reconstruction, training, what storage replays); the
mirrors themselves are shard.gpu_mirror's. A mirror is built only while the index is trained: the untrained buffer
searches on the CPU.

Uses faiss, numpy, the base package (the GPU backend of lookalike.gpu, CollectionConfig) and the shard modules for
specs and mirrors.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from lookalike.config import CollectionConfig
from lookalike.metrics import CPU_FALLBACKS, GPU_SEARCHES, MIRROR_BUILDS
from shard.gpu_mirror import CagraMirror, IdMirror
from shard.specs import FAISS_METRIC, cagra_degree, extract_ivf, faiss_reason, gpu_kind

log = logging.getLogger(__name__)

_CAGRA_MIN = 10_000  # fewer vectors: the GPU mirror is an exact flat index (CAGRA's build needs a few thousand)
# A flat mirror is cut into segments of this many bytes (at least _MIN_SEGMENT vectors): a GPU flat index
# reallocates all of its storage on every add, so an add needs at most one segment of spare GPU memory.
_SEGMENT_BYTES = 1 << 30
_MIN_SEGMENT = 4096
_GPU_RETRY_S = 60.0  # after a failed GPU build, search on the CPU this long before trying again


class MirrorKeeper:
    """The GPU mirror searches use, for one collection's index on one shard.

    Args:
        coll: the collection (dim, metric, spec, gpu_float16, search defaults).
        backend: a GPU backend (``lookalike.gpu``), or None: no mirror is ever built.

    Attributes:
        mirror: the installed mirror (:class:`IdMirror` or :class:`CagraMirror`); None: searches run on the CPU.
    """

    def __init__(self, coll: CollectionConfig, backend=None):
        self.coll = coll
        self.backend = backend
        self.mirror: IdMirror | CagraMirror | None = None
        self._retry_at = 0.0
        self._error = ""  # the last build failure, logged once

    @property
    def nbytes(self) -> int:
        """Approximate GPU bytes of the mirror (tombstones included)."""
        return self.mirror.nbytes if self.mirror is not None else 0

    @property
    def needs_build(self) -> bool:
        """True on a GPU shard without a mirror, or with one that has too many tombstones, unless a failed build
        is waiting to be tried again."""
        return (self.backend is not None and time.monotonic() >= self._retry_at
                and (self.mirror is None or self.mirror.needs_rebuild))

    def per_vector(self, main) -> tuple[int, int]:
        """(GPU bytes per vector, fixed GPU bytes) of a mirror of ``main``."""
        kind = gpu_kind(self.coll.index, self.coll.metric, main)
        dim = self.coll.dim
        if kind == "flat":
            return dim * (2 if self.coll.gpu_float16 else 4), 0
        if kind == "cagra":
            return 4 * dim + 4 * cagra_degree(self.coll.index), 0
        if kind == "ivf":
            ivf = extract_ivf(main)
            return int(ivf.code_size) + 8, 4 * dim * int(ivf.nlist)  # codes + 64-bit ids; coarse centroids
        return 0, 0

    def bytes_for(self, n: int, main) -> int:
        """GPU bytes that ``n`` more vectors of ``main`` take (0 on the CPU), with the copy of the last flat segment
        that an add to it makes."""
        if self.backend is None:
            return 0
        per = self.per_vector(main)[0]
        m = self.mirror
        last = int(m.parts[-1].ntotal) if isinstance(m, IdMirror) and not m.ivf and m.parts else 0
        return (n + last) * per

    def bytes_of(self, main) -> int:
        """GPU bytes a mirror of ``main`` would take (0 on the CPU)."""
        if self.backend is None:
            return 0
        per, fixed = self.per_vector(main)
        return main.ntotal * per + fixed

    # --- writes and swaps ------------------------------------------------------------------------------------
    def apply(self, op: str, labels: np.ndarray, x: np.ndarray | None = None) -> None:
        """Applies a write ("add" or "remove") to the mirror; a mirror that cannot take it is dropped (rebuilt by
        the next build)."""
        m = self.mirror
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
            self.mirror = None

    def install(self, mirror):
        """Swaps in a mirror from :meth:`build` (None: search on the CPU). Returns the old one."""
        old, self.mirror = self.mirror, mirror
        return old

    def follow(self, mirror, labels: np.ndarray | None):
        """Follows a swap of the CPU index for a copy without ``labels``: installs ``mirror``, a mirror of that copy,
        if given; else the old mirror takes the removed labels as tombstones (or is dropped if ``labels`` is None).
        Returns the mirror replaced, if any."""
        old = self.mirror
        if mirror is not None:
            self.mirror = mirror
        elif old is not None and labels is not None and len(labels):
            self.apply("remove", np.ascontiguousarray(labels, dtype=np.int64))
        elif labels is None:
            self.mirror = None
        return old if self.mirror is not old else None

    # --- builds -----------------------------------------------------------------------------------------------
    def build(self, main):
        """A mirror of the trained CPU index ``main``; None when the build failed (logged: searches stay on the
        CPU, and :attr:`needs_build` waits a minute before asking again)."""
        try:
            mirror = self._build(main)
            MIRROR_BUILDS.labels(collection=self.coll.name, outcome="ok").inc()
            return mirror
        except Exception as err:  # no room on the GPU, or a shape the GPU cannot hold (e.g. some PQ sizes)
            MIRROR_BUILDS.labels(collection=self.coll.name, outcome="failed").inc()
            self._retry_at = time.monotonic() + _GPU_RETRY_S
            reason = faiss_reason(err)
            (log.warning if reason != self._error else log.debug)(
                "%s: index %r cannot go on the GPU (%s); searching on the CPU, trying again in %.0fs",
                self.coll.name, self.coll.index, reason, _GPU_RETRY_S)
            self._error = reason
            return None

    def _build(self, main):
        coll, backend = self.coll, self.backend
        kind = gpu_kind(coll.index, coll.metric, main)
        per, fixed = self.per_vector(main)
        t0 = time.monotonic()
        if kind == "ivf":
            index = backend.to_gpu(main, coll.gpu_float16)
            mirror = IdMirror(backend, [index], int(main.nlist), coll.larger_is_better, per, fixed)
        else:
            flat = faiss.downcast_index(main.index)
            n, labels = flat.ntotal, faiss.vector_to_array(main.id_map)
            xb = (faiss.rev_swig_ptr(flat.get_xb(), n * coll.dim).reshape(n, coll.dim) if n
                  else np.empty((0, coll.dim), np.float32))
            if kind == "flat":
                mirror = IdMirror(backend, [], 0, coll.larger_is_better, per, fixed,
                                  new_segment=lambda: faiss.IndexIDMap(backend.to_gpu(self._flat(), coll.gpu_float16)),
                                  segment=max(_MIN_SEGMENT, _SEGMENT_BYTES // per))
                mirror.fill(xb, labels)
            else:  # cagra
                graph = n >= _CAGRA_MIN
                if graph:
                    base = backend.cagra(xb, coll.metric, cagra_degree(coll.index))
                else:  # small: exact on the GPU
                    flat = self._flat()
                    flat.add(xb)
                    base = backend.to_gpu(flat, False)
                mirror = CagraMirror(backend, base, labels, graph, coll.dim, coll.metric, coll.larger_is_better,
                                     per, coll.ef_search)
        log.info("%s: GPU mirror (%s, %d vectors, %.1f MiB) built in %.2fs on %s", coll.name, kind, main.ntotal,
                 mirror.nbytes / 2**20, time.monotonic() - t0, getattr(backend, "name", "gpu"))
        return mirror

    def _flat(self):
        return faiss.IndexFlat(self.coll.dim, FAISS_METRIC[self.coll.metric])

    # --- searches ---------------------------------------------------------------------------------------------
    def search(self, xq: np.ndarray, k: int, nprobe: int, ef_search: int):
        """(D, L, rows the mirror could not answer: the CPU must) for queries ``xq`` (prepared); None when the
        mirror cannot answer at all (none, k or nprobe beyond the GPU's limit, or the search failed)."""
        mirror = self.mirror
        if mirror is None or not mirror.usable(k, nprobe):
            if self.backend is not None:
                CPU_FALLBACKS.labels(collection=self.coll.name).inc()
            return None
        try:
            found = mirror.search(xq, k, nprobe, ef_search)
        except Exception as err:  # e.g. no GPU scratch memory left: the CPU index still answers
            log.warning("%s: GPU search failed (%s); answering from the CPU index", self.coll.name, err)
            CPU_FALLBACKS.labels(collection=self.coll.name).inc()
            return None
        GPU_SEARCHES.labels(collection=self.coll.name).inc()
        return found
