"""A shard: for each collection, the buckets the shard map gives it, in one FAISS index, backed by storage.

Plain classes, testable without Ray or gRPC; ``shard.server`` serves them over gRPC and
``lookalike.ray_cluster.ShardActor`` runs that inside a Ray actor.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import threading

import numpy as np
import psutil

from lookalike.config import CollectionConfig
from lookalike.errors import NotFound, StaleShardMap
from lookalike.ids import LABEL_MASK, buckets_and_labels
from shard.index import VectorIndex
from shard.storage import DELETE, UPSERT, CollectionStore, release_memory

log = logging.getLogger(__name__)

_TRIM_EVERY_BYTES = 32 << 20


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    class _Ctx:
        def __init__(self, acquire, release):
            self._acquire, self._release = acquire, release

        def __enter__(self):
            self._acquire()

        def __exit__(self, *exc):
            self._release()

    def read(self):
        return self._Ctx(self.acquire_read, self.release_read)

    def write(self):
        return self._Ctx(self.acquire_write, self.release_write)


class IdTable:
    """User ids <-> internal labels, plus payloads, in flat numpy arrays: about 24 bytes an item plus the id's
    UTF-8 bytes (a Python str per item would cost about 50 more).

    Rows are sorted by label. The ids live in one byte arena (``blob``) cut by ``offsets``. An id's label is its
    home label (from its hash, see lookalike.ids) or, in the astronomically rare case that another id of the same
    bucket already holds that label, one of the next ``PROBES - 1`` labels.
    """

    PROBES = 4

    def __init__(self):
        self.labels = np.empty(0, dtype=np.int64)        # sorted
        self.offsets = np.zeros(1, dtype=np.int64)       # row i's id is blob[offsets[i]:offsets[i + 1]]
        self.blob = np.empty(0, dtype=np.uint8)
        self.payloads = np.empty(0, dtype=object)        # aligned; serialized Payload or None

    def __len__(self) -> int:
        return len(self.labels)

    # --- ids as fixed-width byte strings (ids hold no NUL, so numpy's "S" type round-trips them) ----------------
    def _gather(self, pos: np.ndarray) -> np.ndarray:
        """Ids at row positions (any shape) as a numpy "S" array of the same shape."""
        flat = pos.ravel()
        starts = self.offsets[flat]
        lengths = self.offsets[flat + 1] - starts
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        idx = starts[:, None] + np.arange(width)
        chars = np.where(np.arange(width) < lengths[:, None], self.blob[np.minimum(idx, max(len(self.blob) - 1, 0))]
                         if len(self.blob) else 0, 0).astype(np.uint8)
        return np.ascontiguousarray(chars).view(f"S{width}").reshape(pos.shape)

    def uids_at(self, pos: np.ndarray) -> list[str]:
        return [b.decode("utf-8") for b in self._gather(pos).ravel().tolist()]

    @staticmethod
    def _encode(uids: list[str]) -> np.ndarray:
        return np.array([u.encode("utf-8") for u in uids], dtype=bytes)

    # --- lookups --------------------------------------------------------------------------------------------
    def _candidates(self, home: np.ndarray) -> np.ndarray:
        high = home & ~np.int64(LABEL_MASK)
        return high[:, None] | ((home[:, None] + np.arange(self.PROBES, dtype=np.int64)) & LABEL_MASK)

    def _probe(self, home: np.ndarray, uids: list[str]):
        cand = self._candidates(home)
        if not len(self.labels):
            none = np.zeros(cand.shape, dtype=bool)
            return cand, none, none
        posc = np.minimum(np.searchsorted(self.labels, cand), len(self.labels) - 1)
        present = self.labels[posc] == cand
        match = present.copy()
        if present.any():
            rows = present.any(axis=1)
            match[rows] &= self._gather(posc[rows]) == self._encode([u for u, r in zip(uids, rows) if r])[:, None]
        return cand, present, match

    def find(self, home: np.ndarray, uids: list[str]) -> np.ndarray:
        """Labels of ids (shape (n,) int64), -1 for ids not stored."""
        cand, _, match = self._probe(home, uids)
        found = match.any(axis=1)
        return np.where(found, cand[np.arange(len(cand)), match.argmax(axis=1)], -1)

    def assign(self, home: np.ndarray, uids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Labels for a batch of distinct ids to upsert: (labels, existing), existing marking ids already stored."""
        cand, present, match = self._probe(home, uids)
        existing = match.any(axis=1)
        rows = np.arange(len(cand))
        labels = np.where(existing, cand[rows, match.argmax(axis=1)], cand[rows, (~present).argmax(axis=1)])
        new = ~existing
        if (new & present.all(axis=1)).any():
            raise RuntimeError("label space of a bucket exhausted by hash collisions")
        if len(np.unique(labels)) != len(labels):  # two new ids of one batch collide: settle them in order
            used = set(labels[existing].tolist())
            for i in np.flatnonzero(new):
                for j, c in enumerate(cand[i].tolist()):
                    if not present[i, j] and c not in used:
                        labels[i] = c
                        used.add(c)
                        break
                else:
                    raise RuntimeError("label space of a bucket exhausted by hash collisions")
        return labels, existing

    def positions(self, labels: np.ndarray) -> np.ndarray:
        """Row positions of present labels (any shape); -1 labels give position 0, mask them yourself."""
        return np.searchsorted(self.labels, np.maximum(labels, 0))

    # --- changes --------------------------------------------------------------------------------------------
    def put(self, labels: np.ndarray, uids: list[str], payloads: list[bytes | None], existing: np.ndarray) -> None:
        if existing.any():
            pay = np.empty(int(existing.sum()), dtype=object)
            pay[:] = [payloads[i] for i in np.flatnonzero(existing)]
            self.payloads[self.positions(labels[existing])] = pay
        new = np.flatnonzero(~existing)
        if not len(new):
            return
        order = new[np.argsort(labels[new], kind="stable")]
        new_labels = labels[order]
        encoded = [uids[i].encode("utf-8") for i in order]
        new_lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        at = np.searchsorted(self.labels, new_labels)
        self.blob = np.insert(self.blob, np.repeat(self.offsets[at], new_lengths),
                              np.frombuffer(b"".join(encoded), dtype=np.uint8))
        lengths = np.insert(np.diff(self.offsets), at, new_lengths)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.labels = np.insert(self.labels, at, new_labels)
        pay = np.empty(len(order), dtype=object)
        pay[:] = [payloads[i] for i in order]
        self.payloads = np.insert(self.payloads, at, pay)

    def remove(self, labels: np.ndarray) -> None:
        """Removes rows by label (all present)."""
        if len(labels) == 0:
            return
        keep = np.ones(len(self.labels), dtype=bool)
        keep[self.positions(labels)] = False
        lengths = np.diff(self.offsets)
        self.blob = self.blob[np.repeat(keep, lengths)]
        self.offsets = np.concatenate([[0], np.cumsum(lengths[keep])])
        self.labels = self.labels[keep]
        self.payloads = self.payloads[keep]


class ShardCollection:
    """One collection's buckets on one shard: index, id table and storage.

    Args:
        coll: the collection.
        buckets: the buckets this shard owns.
        store: its durable storage.
    """

    def __init__(self, coll: CollectionConfig, buckets, store: CollectionStore):
        self.coll = coll
        self.buckets = frozenset(int(b) for b in buckets)
        self._owned = np.zeros(coll.buckets, dtype=bool)
        self._owned[list(self.buckets)] = True
        self.store = store
        self.index = VectorIndex(coll)
        self.table = IdTable()
        self._rw = RWLock()
        self._write_order = threading.Lock()  # log order == apply order
        self._written_since_trim = 0
        self.dropped = False

    # --- loading --------------------------------------------------------------------------------------------
    def load(self) -> int:
        """Replays storage into memory; returns the live item count."""
        for batch in self.store.load(set(self.buckets)):
            _, home = buckets_and_labels(batch.ids, self.coll.buckets)
            with self._rw.write():
                if batch.op == UPSERT:
                    self._apply_upsert(batch.ids, home, batch.vectors, batch.payloads)
                else:
                    self._apply_delete(batch.ids, home)
            self._train_if_ready()
        return len(self.table)

    def _train_if_ready(self) -> None:
        """Trains an IVF/PQ index once its buffer is full. The caller holds ``_write_order`` (or is loading), so
        the buffer cannot change; searches go on against the exact buffer until the switch."""
        if self.index.needs_training:
            built = self.index.build_trained()
            with self._rw.write():
                self.index.install_trained(built)

    # --- writes ---------------------------------------------------------------------------------------------
    def _check_owned(self, buckets: np.ndarray) -> None:
        if not self._owned[buckets].all():
            bad = int(buckets[~self._owned[buckets]][0])
            raise StaleShardMap(
                f"shard does not own bucket {bad} of collection {self.coll.name!r}: the shard map changed, retry")

    def _check_live(self) -> None:
        if self.dropped:
            raise NotFound(f"collection {self.coll.name!r} was dropped")

    def upsert(self, ids: list[str], x: np.ndarray, payloads: list[bytes | None]) -> int:
        """Inserts or replaces items; durable and searchable when it returns. x: shape (n, d) float32 / uint8."""
        buckets, home = buckets_and_labels(ids, self.coll.buckets)
        self._check_owned(buckets)
        with self._write_order:
            self._check_live()
            self.store.append(UPSERT, ids, x, payloads)
            with self._rw.write():
                self._apply_upsert(ids, home, x, payloads)
            self._train_if_ready()
            self._written_since_trim += x.nbytes
            if self._written_since_trim > _TRIM_EVERY_BYTES:
                self._written_since_trim = 0
                release_memory()  # request buffers and old id-table arrays leave freed pages behind
        return len(ids)

    def _apply_upsert(self, ids, home, x, payloads) -> None:
        labels, existing = self.table.assign(home, ids)
        if existing.any():
            self.index.remove(labels[existing])
        self.index.add(labels, x)
        self.table.put(labels, ids, payloads, existing)

    def delete(self, ids: list[str]) -> tuple[int, int]:
        """Removes items; returns (removed, missing)."""
        buckets, home = buckets_and_labels(ids, self.coll.buckets)
        self._check_owned(buckets)
        with self._write_order:
            self._check_live()
            self.store.append(DELETE, ids)
            with self._rw.write():
                removed = self._apply_delete(ids, home)
        return removed, len(ids) - removed

    def _apply_delete(self, ids, home) -> int:
        labels = self.table.find(home, ids)
        labels = labels[labels >= 0]
        self.index.remove(labels)
        self.table.remove(np.sort(labels))
        return len(labels)

    # --- reads ----------------------------------------------------------------------------------------------
    def get(self, ids: list[str], include_vectors: bool):
        """(found ids, vectors or None, payloads) for the ids stored here, in request order."""
        _, home = buckets_and_labels(ids, self.coll.buckets)
        with self._rw.read():
            self._check_live()
            labels = self.table.find(home, ids)
            hit = np.flatnonzero(labels >= 0)
            pos = self.table.positions(labels[hit])
            found = [ids[i] for i in hit]
            payloads = list(self.table.payloads[pos])
            vectors = self.index.reconstruct(labels[hit]) if include_vectors else None
        return found, vectors, payloads

    def search(self, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0, include_payloads: bool = False):
        """Top-k over this shard's buckets.

        Returns:
            (D, L, ids, payloads): D shape (nq, k) float32; L shape (nq, k) int64 labels (-1: none);
            ids, a flat list of nq*k strings ("" for none); payloads, flat list (None where empty) or None.
        """
        with self._rw.read():
            self._check_live()
            D, L = self.index.search(xq, k, nprobe, ef_search)
            valid = L >= 0
            if len(self.table):
                pos = np.minimum(self.table.positions(L).ravel(), len(self.table) - 1)
                ids = [u if v else "" for u, v in zip(self.table.uids_at(pos), valid.ravel().tolist())]
                payloads = (np.where(valid.ravel(), self.table.payloads[pos], None).tolist()
                            if include_payloads else None)
            else:
                ids = [""] * L.size
                payloads = [None] * L.size if include_payloads else None
        return D, L, ids, payloads

    def stats(self) -> dict:
        with self._rw.read():
            return {"name": self.coll.name, "buckets": len(self.buckets), "vectors": self.index.ntotal,
                    "index_bytes": self.index.nbytes, "trained": self.index.trained}


class Shard:
    """All collections of one shard.

    Args:
        shard_id: stable name ("shard-0"); its storage lives under ``<storage_root>/shards/<shard_id>``.
        storage_root: the storage URI (a local directory path).
        segment_bytes: WAL segment size before compaction.
    """

    def __init__(self, shard_id: str, storage_root: str | pathlib.Path, segment_bytes: int = 64 << 20):
        self.shard_id = shard_id
        self.root = pathlib.Path(storage_root) / "shards" / shard_id
        self.segment_bytes = segment_bytes
        self._collections: dict[str, ShardCollection] = {}
        self._lock = threading.Lock()
        self.serving = False

    def open_collection(self, coll: CollectionConfig, buckets) -> int:
        """Takes ownership of ``buckets`` of a collection and loads them from storage; returns the items loaded.

        Idempotent for an already open collection with the same buckets.
        """
        with self._lock:
            current = self._collections.get(coll.name)
            if current is not None and current.coll == coll and current.buckets == frozenset(buckets):
                return len(current.table)
        store = CollectionStore(self.root / coll.name, coll.buckets, segment_bytes=self.segment_bytes)
        sc = ShardCollection(coll, buckets, store)
        n = sc.load()
        release_memory()
        with self._lock:
            old = self._collections.get(coll.name)
            self._collections[coll.name] = sc
        if old is not None:
            old.store.close()
        log.info("%s: collection %s loaded, %d items in %d buckets", self.shard_id, coll.name, n, len(sc.buckets))
        return n

    def drop_collection(self, name: str) -> None:
        """Forgets a collection and deletes its storage on this shard (no error if absent)."""
        with self._lock:
            sc = self._collections.pop(name, None)
        if sc is not None:
            with sc._write_order:
                sc.dropped = True
                sc.store.destroy()
            with sc._rw.write():  # searches in flight finish first
                sc.index = None
                sc.table = None
            release_memory()
        else:
            shutil.rmtree(self.root / name, ignore_errors=True)

    def collection(self, name: str) -> ShardCollection:
        sc = self._collections.get(name)
        if sc is None:
            raise NotFound(f"collection {name!r} does not exist on shard {self.shard_id}")
        return sc

    def stats(self) -> dict:
        return {"shard_id": self.shard_id, "serving": self.serving,
                "memory_bytes": psutil.Process().memory_info().rss,
                "collections": [sc.stats() for sc in list(self._collections.values())]}

    def close(self) -> None:
        for sc in list(self._collections.values()):
            sc.store.close()

