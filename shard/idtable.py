"""The id table of a collection on a shard: user ids <-> internal labels, plus payloads, in flat numpy arrays.

Uses numpy and the base package (lookalike: limits, label layout); nothing else of the shard.
"""

from __future__ import annotations

import numpy as np

from lookalike.config import LIMITS
from lookalike.ids import LABEL_MASK


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

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as plain arrays, for a checkpoint: payloads as their lengths (-1 for None) and one blob."""
        lengths = np.fromiter((-1 if p is None else len(p) for p in self.payloads.tolist()), dtype=np.int64,
                              count=len(self.payloads))
        blob = np.frombuffer(b"".join(p for p in self.payloads.tolist() if p), dtype=np.uint8)
        return {"labels": self.labels, "offsets": self.offsets, "blob": self.blob, "payload_lengths": lengths,
                "payload_blob": blob}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "IdTable":
        """A table from :meth:`to_arrays`. Raises ValueError (or KeyError) if they do not hold together."""
        t = cls()
        t.labels = np.ascontiguousarray(arrays["labels"], dtype=np.int64)
        t.offsets = np.ascontiguousarray(arrays["offsets"], dtype=np.int64)
        t.blob = np.ascontiguousarray(arrays["blob"], dtype=np.uint8)
        lengths = np.asarray(arrays["payload_lengths"], dtype=np.int64)
        blob = np.asarray(arrays["payload_blob"], dtype=np.uint8).tobytes()
        n = len(t.labels)
        if (len(t.offsets) != n + 1 or t.offsets[0] != 0 or t.offsets[-1] != len(t.blob)
                or (np.diff(t.offsets) < 0).any() or (n > 1 and (np.diff(t.labels) <= 0).any())):
            raise ValueError(f"the id table's {n} labels, {len(t.offsets)} offsets and {len(t.blob)} id bytes do not "
                             "hold together")
        if len(lengths) != n or (lengths < -1).any() or int(lengths[lengths > 0].sum()) != len(blob):
            raise ValueError(f"{len(lengths)} payload lengths for {n} rows, or not those of its "
                             f"{len(blob)} payload bytes")
        ends = np.cumsum(np.maximum(lengths, 0)).tolist()
        t.payloads = np.empty(n, dtype=object)
        t.payloads[:] = [None if ln < 0 else blob[e - ln:e] for ln, e in zip(lengths.tolist(), ends)]
        return t

    def _shallow(self) -> "IdTable":
        t = IdTable()
        t.labels, t.offsets, t.blob, t.payloads = self.labels, self.offsets, self.blob, self.payloads
        return t

    def with_put(self, labels, uids, payloads, existing) -> "IdTable":
        """A new table with :meth:`put` applied; this one is left as it is (searches may be reading it)."""
        t = self._shallow()
        if existing.any():
            t.payloads = self.payloads.copy()  # put assigns into it
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
        self.offsets = np.concatenate([[0], np.cumsum(lengths[keep])])
        self.labels = self.labels[keep]
        self.payloads = self.payloads[keep]
