"""The reads of a collection on a shard (:class:`Reads`): Get, Search, the coarse quantizer a router probes with,
and the Scan of catalog jobs.

Works on a :class:`shard.collection.ShardCollection`'s state under its read lock (and its write order, where
vectors come from storage); uses shard.bucket_reader (read_buckets) and the base package.
"""

from __future__ import annotations

import contextlib
import heapq

import faiss
import numpy as np

from lookalike.config import LIMITS
from lookalike.errors import InvalidArgument, Unavailable
from lookalike.ids import LABEL_SHIFT, bucket_of_labels, buckets_and_labels
from shard.bucket_reader import read_buckets
from shard.filtered import MatchCache, plan_and_search

# Bytes of a page of Reads.scan_page at most (vectors, ids and payloads), well under the message limit.
PAGE_BYTES = LIMITS.max_message_bytes // 2


def _spread(values, mask: np.ndarray, empty) -> list:
    """``values`` at the True places of ``mask``, ``empty`` elsewhere."""
    out = np.full(len(mask), empty, dtype=object)
    out[np.flatnonzero(mask)] = values
    return out.tolist()


class Reads:
    """The reads of one collection.

    Args:
        sc: the :class:`shard.collection.ShardCollection` it reads.
    """

    def __init__(self, sc):
        self.sc = sc
        self._matches = MatchCache()  # the labels (and selectors) of recent filters, until the next write

    def stats(self) -> dict:
        """What the shard reports of the collection (shard.proto's CollectionStats)."""
        sc = self.sc
        counts = sc.bucket_counts().astype("<u4")
        damaged = sc.store.damaged()  # files of its storage found damaged and kept aside (shard.proto)
        with sc._rw.read():
            return {"name": sc.coll.name, "buckets": len(sc.buckets), "vectors": sc.index.ntotal,
                    "index_bytes": sc.index.nbytes, "trained": sc.index.trained,
                    "trained_version": sc.index.trained_version,
                    "bucket_counts": counts.tobytes(), "joining": len(sc.joining), "damaged": damaged,
                    "loaded_from_checkpoint": bool(sc.loaded_from_checkpoint),
                    "replayed_records": sc.replayed_records}

    def get(self, ids: list[str], include_vectors: bool, epoch: int = 0):
        """(found ids, vectors or None, payloads) for the ids stored here, in request order.

        Vectors are the ones upserted (normalized for cosine), exact whatever the index: from the index where it
        holds them exactly, else from storage (see :meth:`_stored_vectors`)."""
        sc = self.sc
        _, home = buckets_and_labels(ids, sc.coll.buckets)
        with self._vector_source(include_vectors), sc._rw.read():
            sc._check_live()
            sc._check_epoch(epoch)
            labels = sc.table.find(home, ids)
            hit = np.flatnonzero(labels >= 0)
            pos = sc.table.positions(labels[hit])
            found = [ids[i] for i in hit]
            payloads = sc.table.payloads_at(pos)
            vectors = self._vectors(labels[hit], found) if include_vectors else None
        return found, vectors, payloads

    def _vector_source(self, include_vectors: bool):
        """What a read of vectors holds: the write order where they come from storage, so that storage holds
        exactly what memory does (no write is between its log append and its apply); nothing otherwise. (An
        index is only ever trained from exact to approximate, under the write order: a read that saw it exact
        and finds it trained reads storage without the order, at worst seeing a write that is being applied.)"""
        sc = self.sc
        if include_vectors and not sc.index.exact_vectors:
            return sc._write_order
        return contextlib.nullcontext()

    def _vectors(self, labels: np.ndarray, uids: list[str]) -> np.ndarray:
        """Vectors of items held here (labels and their ids, in the same order): shape (n, d) float32, or
        (n, d/8) uint8 for hamming."""
        sc = self.sc
        if sc.index.exact_vectors:
            return sc.index.reconstruct(labels)
        return self._stored_vectors(labels, uids)

    def _stored_vectors(self, labels: np.ndarray, uids: list[str]) -> np.ndarray:
        """The original vectors of items held here, read from this shard's storage: the snapshots of their buckets
        and the whole log (read_buckets), so a Get of a few ids costs a read of their buckets (docs/BENCHMARKS.md,
        "Shard memory per vector"). Normalized for cosine, as the index holds them and as Get returned them when
        they were reconstructed from the index.

        Raises:
            Unavailable: storage lacks some of them (a file damaged since the collection loaded).
        """
        sc = self.sc
        binary = sc.coll.binary
        uniq = list(dict.fromkeys(uids))
        row_of = {u: i for i, u in enumerate(uniq)}
        out = np.empty((len(uniq), sc.coll.dim // 8 if binary else sc.coll.dim),
                       dtype=np.uint8 if binary else np.float32)
        filled = np.zeros(len(uniq), dtype=bool)
        buckets = np.unique(bucket_of_labels(labels)).tolist() if len(labels) else []
        for batch in read_buckets(sc.store.path, sc.coll.buckets, buckets):
            rows = np.fromiter((row_of.get(u, -1) for u in batch.ids), dtype=np.int64, count=len(batch.ids))
            ok = rows >= 0
            out[rows[ok]] = batch.vectors[ok]
            filled[rows[ok]] = True
        if not filled.all():
            raise Unavailable(f"the vectors of {int((~filled).sum())} item(s) of {sc.coll.name!r} could not be "
                              "read from the shard's storage (a damaged file: see the shard's stats)")
        if sc.coll.metric == "cosine":
            faiss.normalize_L2(out)
        return out if len(uniq) == len(uids) else out[[row_of[u] for u in uids]]

    def search(self, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0, include_payloads: bool = False,
               epoch: int = 0, coarse=None, packed: bool = False):
        """Top-k over every item this shard holds (all its buckets, joining ones included: what they hold is
        current, the router just does not count them as answered).

        Returns:
            (D, L, ids, payloads): D shape (nq, k) float32; L shape (nq, k) int64 labels (-1: none);
            ids, a flat list of nq*k strings ("" for none), or with ``packed`` the same as (UTF-8 bytes back to
            back, uint16 lengths) (IdTable.packed_at: what a shard answers the router); payloads, flat list (None
            where empty) or None.
        """
        sc = self.sc
        with sc._rw.read():
            sc._check_live()
            sc._check_epoch(epoch)
            if coarse is not None:  # (version, nprobe, lists, distances): the IVF lists the router chose
                coarse = sc.index.check_coarse(coarse[0], len(xq), coarse[1], coarse[2], coarse[3])
            D, L = sc.index.search(xq, k, nprobe, ef_search, coarse)
            return self._answer(D, L, include_payloads, packed)

    def search_filtered(self, xq: np.ndarray, k: int, filt, nprobe: int = 0, ef_search: int = 0,
                        include_payloads: bool = False, epoch: int = 0, packed: bool = False):
        """The top k of the items matching ``filt`` (a Filter, checked already: lookalike.filters), as
        :meth:`search`, plus the plan it ran (shard.filtered): (D, L, ids, payloads, plan)."""
        sc = self.sc
        with sc._rw.read():
            sc._check_live()
            sc._check_epoch(epoch)
            matches = self._matches.get(sc.payloads.version, filt, lambda: sc.payloads.resolve(filt, sc.table.labels))
            D, L, plan = plan_and_search(sc.index, xq, k, matches, nprobe, ef_search)
            return (*self._answer(D, L, include_payloads, packed), plan)

    def _answer(self, D: np.ndarray, L: np.ndarray, include_payloads: bool, packed: bool = False):
        """(D, L, ids, payloads) of a search's labels, ids packed or not as :meth:`search` says (the caller holds
        the read lock)."""
        sc = self.sc
        valid = L.ravel() >= 0
        if not len(sc.table) or not valid.any():
            ids = (b"", np.zeros(L.size, dtype=np.uint16)) if packed else [""] * L.size
            return D, L, ids, [None] * L.size if include_payloads else None
        # Ids of the results only: k past the collection's size leaves most slots empty (-1).
        full = bool(valid.all())
        pos = np.minimum(sc.table.positions(L.ravel() if full else L.ravel()[valid]), len(sc.table) - 1)
        payloads = sc.table.payloads_at(pos) if include_payloads else None
        if not full:
            payloads = _spread(payloads, valid, None) if include_payloads else None
        if packed:
            slot_pos = pos if full else np.zeros(len(valid), dtype=np.int64)
            if not full:
                slot_pos[valid] = pos
            return D, L, sc.table.packed_at(slot_pos, None if full else valid), payloads
        ids = sc.table.uids_at(pos)
        return D, L, ids if full else _spread(ids, valid, ""), payloads

    def coarse_quantizer(self) -> tuple[int, np.ndarray] | None:
        """(trained version, coarse centroids) for a router that chooses the IVF lists to probe once per query
        (see VectorIndex.coarse_quantizer); None when it may not."""
        sc = self.sc
        with sc._rw.read():
            sc._check_live()
            return sc.index.coarse_quantizer()

    def scan(self, buckets, include_vectors: bool = False, include_payloads: bool = False, epoch: int = 0,
             filt=None):
        """The items of some held buckets (only those matching ``filt``, a checked Filter, if given): (ids, vectors
        (n, d) or None, payloads or None), in label order."""
        sc = self.sc
        buckets = np.asarray(sorted({int(b) for b in buckets}), dtype=np.int64)
        if len(buckets) and (buckets.min() < 0 or buckets.max() >= sc.coll.buckets):
            raise InvalidArgument(f"bucket numbers of {sc.coll.name!r} run from 0 to {sc.coll.buckets - 1}")
        with self._vector_source(include_vectors), sc._rw.read():
            sc._check_live()
            sc._check_epoch(epoch)
            sc._check_owned(buckets)
            labels = sc._labels_of(buckets.tolist())
            if filt is not None:
                labels = sc.payloads.resolve(filt, labels)
            pos = sc.table.positions(labels)
            ids = sc.table.uids_at(pos) if len(pos) else []
            vectors = self._vectors(labels, ids) if include_vectors else None
            payloads = sc.table.payloads_at(pos) if include_payloads else None
        return ids, vectors, payloads

    def scan_page(self, bucket: int, after_id: str, limit: int, epoch: int = 0):
        """A page of a held bucket, in id order (a backup reads buckets of any size this way): the first ``limit``
        items whose id sorts after ``after_id`` (UTF-8 byte order, which is Python's str order), fewer when they
        would pass ``PAGE_BYTES``. Returns (ids, vectors (n, d), serialized payloads, whether items remain after
        the last id). Each page costs a pass over the bucket's ids."""
        sc = self.sc
        if not 0 <= bucket < sc.coll.buckets:
            raise InvalidArgument(f"bucket numbers of {sc.coll.name!r} run from 0 to {sc.coll.buckets - 1}")
        with self._vector_source(True), sc._rw.read():
            sc._check_live()
            sc._check_epoch(epoch)
            sc._check_owned(np.asarray([bucket], dtype=np.int64))
            # the table is sorted by label, and a label's high bits are its bucket: the bucket is one slice of it
            lo, hi = np.searchsorted(sc.table.labels, [bucket << LABEL_SHIFT, (bucket + 1) << LABEL_SHIFT])
            pos = np.arange(lo, hi)
            labels = sc.table.labels[lo:hi]
            ids = sc.table.uids_at(pos) if len(pos) else []
            first = heapq.nsmallest(limit + 1, (i for i, u in enumerate(ids) if u > after_id), key=ids.__getitem__)
            payloads = sc.table.payloads_at(pos[first]) if first else []
            sizes = [sc.coll.code_size + len(ids[i]) * 4 + len(p or b"") + 16 for i, p in zip(first, payloads)]
            take = max(1, int(np.searchsorted(np.cumsum(sizes), PAGE_BYTES, side="right"))) if first else 0
            take = min(take, limit)
            sel = np.asarray(first[:take], dtype=np.int64)
            page_ids = [ids[i] for i in first[:take]]
            vectors = self._vectors(labels[sel], page_ids)
        return page_ids, vectors, list(payloads[:take]), len(first) > take
