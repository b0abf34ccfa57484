"""The id table of a collection on a shard: user ids <-> internal labels, plus payloads, in flat numpy arrays.

Uses numpy and the base package (lookalike: limits, label layout); nothing else of the shard.
"""

from __future__ import annotations

import numpy as np

from lookalike.config import LIMITS
from lookalike.ids import LABEL_MASK


def _objects(values) -> np.ndarray:
    """A numpy object array of ``values`` (bytes or None), never an array of arrays."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


# Past this many labels a lookup sorts them first: numpy's binary search then starts each one where the last ended,
# and the search path of the next label is mostly in the caches (at 1.25M rows, 1,000 labels: about 0.3 instead of
# 0.5 ms with cold caches, 0.18 instead of 0.39 warm).
_SORT_LOOKUPS = 64


def _lookup(keys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """np.searchsorted(keys, x) for x of any shape, the x sorted first when there are many."""
    if x.size < _SORT_LOOKUPS:
        return np.searchsorted(keys, x)
    flat = x.ravel()
    order = np.argsort(flat)
    out = np.empty(len(flat), dtype=np.intp)
    out[order] = np.searchsorted(keys, flat[order])
    return out.reshape(x.shape)


def _pack(offsets: np.ndarray, blob: np.ndarray, rows: np.ndarray, present: np.ndarray | None,
          step: int) -> tuple[bytes, np.ndarray]:
    """The ids of ``rows`` (an id table's offsets and arena) back to back, and their uint16 lengths (0 where
    ``present`` is False); ``step`` rows at a time, so the scratch is at most step x longest id int64s."""
    starts = offsets[rows].astype(np.int64)
    lengths = offsets[rows + 1].astype(np.int64) - starts
    if present is not None:
        lengths[~present] = 0
    parts = []
    for s in range(0, len(rows), step):
        ln = lengths[s:s + step]
        ends = np.cumsum(ln)
        if len(ends) and ends[-1]:
            parts.append(blob[np.repeat(starts[s:s + step] - (ends - ln), ln) + np.arange(ends[-1])].tobytes())
    return b"".join(parts), lengths.astype(np.uint16)


class IdTable:
    """User ids <-> internal labels, plus payloads, in flat numpy arrays: 12 bytes an item plus the id's UTF-8
    bytes (about 24 for ids of 12 bytes; a Python str per item would cost about 50 more), and 8 bytes an item more
    (plus the payloads) once any item has a payload.

    Rows are sorted by label (``labels``, int64). The ids live in one byte arena (``blob``) cut by ``offsets``,
    uint32 while the arena is under 4 GiB and int64 past it. Payloads (serialized Payload or None) are an aligned
    object array, or nothing while every one is None: read them with :meth:`payloads_at`. An id's label is its home
    label (from its hash, see lookalike.ids) or, in the astronomically rare case that another id of the same bucket
    already holds that label, one of the next ``PROBES - 1`` labels.

    Copy on write: :meth:`with_put` and :meth:`without` return new tables and never write into an array this one
    holds (searches may be reading it); :meth:`put`, :meth:`set_payloads` and :meth:`remove` change this one.
    """

    PROBES = 4
    OFFSETS_LIMIT = 1 << 32  # offsets are uint32 while the arena holds fewer bytes than this, else int64

    def __init__(self):
        self.labels = np.empty(0, dtype=np.int64)        # sorted
        self.offsets = np.zeros(1, dtype=np.uint32)      # row i's id is blob[offsets[i]:offsets[i + 1]]
        self.blob = np.empty(0, dtype=np.uint8)
        self._payloads = None                            # aligned object array (Payload bytes or None); None: all None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes of the table's arrays (the payload objects not included)."""
        pointers = 0 if self._payloads is None else self._payloads.nbytes
        return self.labels.nbytes + self.offsets.nbytes + self.blob.nbytes + pointers

    @classmethod
    def _offsets(cls, lengths: np.ndarray) -> np.ndarray:
        """Offsets of ids of these lengths: 0 then their running sum, in the narrowest type that holds the total."""
        total = int(lengths.sum(dtype=np.int64)) if len(lengths) else 0
        out = np.empty(len(lengths) + 1, dtype=np.uint32 if total < cls.OFFSETS_LIMIT else np.int64)
        out[0] = 0
        np.cumsum(lengths, dtype=out.dtype, out=out[1:])
        return out

    # --- ids as fixed-width byte strings (ids hold no NUL, so numpy's "S" type round-trips them) ----------------
    def _gather(self, pos: np.ndarray) -> np.ndarray:
        """Ids at row positions (any shape) as a numpy "S" array of the same shape."""
        flat = pos.ravel()
        starts = self.offsets[flat].astype(np.int64)
        lengths = self.offsets[flat + 1].astype(np.int64) - starts
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        idx = starts[:, None] + np.arange(width)
        chars = np.where(np.arange(width) < lengths[:, None], self.blob[np.minimum(idx, max(len(self.blob) - 1, 0))]
                         if len(self.blob) else 0, 0).astype(np.uint8)
        return np.ascontiguousarray(chars).view(f"S{width}").reshape(pos.shape)

    # Rows per _gather call: its scratch arrays are (rows x longest id) cells of 8 bytes, at most 32 MiB here, not
    # (nq x k x 256) of them for a search of 10,000 queries at k=1024 (a 20 GB allocation the fuzz test found).
    _GATHER_ROWS = (1 << 22) // LIMITS.max_id_bytes

    def uids_at(self, pos: np.ndarray) -> list[str]:
        flat = np.asarray(pos).ravel()
        step = self._GATHER_ROWS
        return [b.decode("utf-8") for s in range(0, len(flat), step) for b in self._gather(flat[s:s + step]).tolist()]

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
        return _lookup(self.labels, np.maximum(labels, 0))

    def packed_at(self, pos: np.ndarray, present: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
        """The ids at row positions (1-d) packed, as a shard answers a search (protos/shard.proto
        ``ShardSearchResponse.id_bytes``): (their UTF-8 bytes back to back, each one's length as uint16). Where
        ``present`` is False the slot's id is empty (its position must still be a row, e.g. 0)."""
        return _pack(self.offsets, self.blob, np.asarray(pos, dtype=np.int64).ravel(), present, self._GATHER_ROWS)

    # --- payloads -------------------------------------------------------------------------------------------
    def payloads_at(self, pos) -> list:
        """The payloads (serialized Payload or None) at row positions (1-d), as a list."""
        if self._payloads is None:
            return [None] * int(np.size(pos))
        return self._payloads[np.asarray(pos, dtype=np.int64)].tolist()

    def payload_items(self) -> tuple[np.ndarray, list[bytes]]:
        """(labels, payloads) of the rows that have a payload, in label order."""
        if self._payloads is None:
            return self.labels[:0], []
        has = np.fromiter((p is not None for p in self._payloads), dtype=bool, count=len(self._payloads))
        return self.labels[has], self._payloads[has].tolist()

    def set_payloads(self, pos, values: list[bytes | None]) -> None:
        """Replaces the payloads at row positions, in this table (never in an array another table shares: the
        first payload stored makes a new array, and :meth:`with_put` copies the one it would write into)."""
        if self._payloads is None:
            if all(v is None for v in values):
                return
            self._payloads = np.full(len(self.labels), None, dtype=object)
        self._payloads[np.asarray(pos, dtype=np.int64)] = _objects(values)

    # --- changes --------------------------------------------------------------------------------------------
    def put(self, labels: np.ndarray, uids: list[str], payloads: list[bytes | None], existing: np.ndarray) -> None:
        """Stores a batch :meth:`assign` labelled, in this table: rows for the new ids, new payloads for the
        existing ones (whose ids stay)."""
        if existing.any():
            idx = np.flatnonzero(existing)
            self.set_payloads(self.positions(labels[idx]), [payloads[i] for i in idx])
        new = np.flatnonzero(~existing)
        if not len(new):
            return
        order = new[np.argsort(labels[new], kind="stable")]
        new_labels = labels[order]
        encoded = [uids[i].encode("utf-8") for i in order]
        new_lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        at = np.searchsorted(self.labels, new_labels)
        self.blob = np.insert(self.blob, np.repeat(self.offsets[at].astype(np.int64), new_lengths),
                              np.frombuffer(b"".join(encoded), dtype=np.uint8))
        self.offsets = self._offsets(np.insert(np.diff(self.offsets), at, new_lengths))
        pay = [payloads[i] for i in order]
        if self._payloads is None and any(p is not None for p in pay):
            self._payloads = np.full(len(self.labels), None, dtype=object)  # a new array: the first payload
        if self._payloads is not None:
            self._payloads = np.insert(self._payloads, at, _objects(pay))
        self.labels = np.insert(self.labels, at, new_labels)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as plain arrays, for a checkpoint: payloads as their lengths (-1 for None) and one blob."""
        if self._payloads is None:
            lengths, blob = np.full(len(self.labels), -1, dtype=np.int64), np.empty(0, dtype=np.uint8)
        else:
            lengths = np.fromiter((-1 if p is None else len(p) for p in self._payloads), dtype=np.int64,
                                  count=len(self._payloads))
            blob = np.frombuffer(b"".join(p for p in self._payloads if p), dtype=np.uint8)
        return {"labels": self.labels, "offsets": self.offsets, "blob": self.blob, "payload_lengths": lengths,
                "payload_blob": blob}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "IdTable":
        """A table from :meth:`to_arrays` (offsets uint32 or int64, as older versions wrote them). Raises ValueError
        (or KeyError) if they do not hold together."""
        t = cls()
        t.labels = np.ascontiguousarray(arrays["labels"], dtype=np.int64)
        offsets = np.asarray(arrays["offsets"])
        if offsets.dtype != np.uint32:
            offsets = np.asarray(offsets, dtype=np.int64)
        t.blob = np.ascontiguousarray(arrays["blob"], dtype=np.uint8)
        lengths = np.asarray(arrays["payload_lengths"], dtype=np.int64)
        blob = np.asarray(arrays["payload_blob"], dtype=np.uint8).tobytes()
        n = len(t.labels)
        if (len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(t.blob)
                or (offsets[1:] < offsets[:-1]).any() or (n > 1 and (np.diff(t.labels) <= 0).any())):
            raise ValueError(f"the id table's {n} labels, {len(offsets)} offsets and {len(t.blob)} id bytes do not "
                             "hold together")
        if len(lengths) != n or (lengths < -1).any() or int(lengths[lengths > 0].sum()) != len(blob):
            raise ValueError(f"{len(lengths)} payload lengths for {n} rows, or not those of its "
                             f"{len(blob)} payload bytes")
        t.offsets = np.ascontiguousarray(offsets, dtype=np.uint32 if len(t.blob) < cls.OFFSETS_LIMIT else np.int64)
        if (lengths >= 0).any():
            ends = np.cumsum(np.maximum(lengths, 0)).tolist()
            t._payloads = _objects([None if ln < 0 else blob[e - ln:e] for ln, e in zip(lengths.tolist(), ends)])
        return t

    def _shallow(self) -> "IdTable":
        t = IdTable()
        t.labels, t.offsets, t.blob, t._payloads = self.labels, self.offsets, self.blob, self._payloads
        return t

    def with_put(self, labels, uids, payloads, existing) -> "IdTable":
        """A new table with :meth:`put` applied; this one is left as it is (searches may be reading it)."""
        t = self._shallow()
        if existing.any() and self._payloads is not None:
            t._payloads = self._payloads.copy()  # put assigns into it
        t.put(labels, uids, payloads, existing)
        return t

    def without(self, labels: np.ndarray) -> "IdTable":
        """A new table with :meth:`remove` applied; this one is left as it is."""
        t = self._shallow()
        t.remove(labels)
        return t

    def remove(self, labels: np.ndarray) -> None:
        """Removes rows by label (all present). Assigns new arrays (never writes into the old ones)."""
        if len(labels) == 0:
            return
        keep = np.ones(len(self.labels), dtype=bool)
        keep[self.positions(labels)] = False
        lengths = np.diff(self.offsets)
        self.blob = self.blob[np.repeat(keep, lengths)]
        self.offsets = self._offsets(lengths[keep])
        self.labels = self.labels[keep]
        if self._payloads is not None:
            self._payloads = self._payloads[keep]
