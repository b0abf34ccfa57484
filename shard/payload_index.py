"""Payload indexes of a collection on a shard (:class:`PayloadIndex`): for each filterable field, an inverted index
value -> labels (strings, booleans, list elements) or a sorted array of (value, label) (ints, floats, timestamps),
so that a filter resolves to a sorted array of labels without reading payloads; and the type of every payload field
seen (a field's first value fixes its type).

Derived state: storage (the log and snapshots, or a checkpoint's id table, which holds every payload) is the source
of truth. The owner rebuilds it from the id table after loading a checkpoint (:meth:`rebuild`) and keeps it current
with every write it applies (:meth:`put`, :meth:`remove`) under its write lock, so it survives a crash and a restart
as the items do.

Uses numpy, the protos and the base package.
"""

from __future__ import annotations

import numpy as np

from lookalike.errors import InvalidArgument
from lookalike.payloads import LISTS, NUMERIC, check_types, plain, typed_items
from protos import common_pb2

_EMPTY = np.empty(0, dtype=np.int64)


def _decode(b: bytes | None) -> common_pb2.Payload | None:
    return common_pb2.Payload.FromString(b) if b else None


class _Keyword:
    """value -> set of labels, for string, bool and list fields (a list indexes each element)."""

    def __init__(self):
        self.postings: dict[object, set[int]] = {}
        self.of: dict[int, tuple] = {}  # label -> the values it is indexed under
        self._arrays: dict[object, np.ndarray] = {}

    def put(self, label: int, values: tuple) -> None:
        self.remove(label)
        values = tuple(dict.fromkeys(values))
        self.of[label] = values
        for v in values:
            self.postings.setdefault(v, set()).add(label)
            self._arrays.pop(v, None)

    def remove(self, label: int) -> None:
        for v in self.of.pop(label, ()):
            s = self.postings[v]
            s.discard(label)
            if not s:
                del self.postings[v]
            self._arrays.pop(v, None)

    def eq(self, v) -> np.ndarray:
        arr = self._arrays.get(v)
        if arr is None:
            s = self.postings.get(v)
            arr = np.sort(np.fromiter(s, dtype=np.int64, count=len(s))) if s else _EMPTY
            self._arrays[v] = arr
        return arr

    def count(self, v) -> int:
        return len(self.postings.get(v, ()))

    def exists(self) -> np.ndarray:
        return np.sort(np.fromiter(self.of.keys(), dtype=np.int64, count=len(self.of)))


class _Numeric:
    """label -> number, with a sorted (values, labels) pair built on first use after a change."""

    def __init__(self):
        self.of: dict[int, float] = {}
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def put(self, label: int, value) -> None:
        self.of[label] = value
        self._sorted = None

    def remove(self, label: int) -> None:
        if self.of.pop(label, None) is not None:
            self._sorted = None

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted is None:
            labels = np.fromiter(self.of.keys(), dtype=np.int64, count=len(self.of))
            values = np.fromiter(self.of.values(), dtype=np.float64, count=len(self.of))
            order = np.lexsort((labels, values))
            self._sorted = (values[order], labels[order])
        return self._sorted

    def range(self, lo, lo_open: bool, hi, hi_open: bool) -> tuple[int, int]:
        """(start, end) positions in :meth:`sorted` of the values within the bounds (None: open)."""
        values, _ = self.sorted()
        start = 0 if lo is None else int(np.searchsorted(values, lo, side="right" if lo_open else "left"))
        end = len(values) if hi is None else int(np.searchsorted(values, hi, side="left" if hi_open else "right"))
        return start, max(start, end)

    def labels(self, start: int, end: int) -> np.ndarray:
        return np.sort(self.sorted()[1][start:end])

    def exists(self) -> np.ndarray:
        return np.sort(np.fromiter(self.of.keys(), dtype=np.int64, count=len(self.of)))


class PayloadIndex:
    """The payload indexes of one collection on one shard (see the module docstring).

    Args:
        schema: the collection's filterable fields, name -> type name (lookalike.payloads).
    """

    def __init__(self, schema: dict[str, str]):
        self.schema = dict(schema)
        self.types: dict[str, str] = dict(schema)  # every field's type: declared, or fixed by its first value
        self._fields = {name: _Numeric() if t in NUMERIC else _Keyword() for name, t in schema.items()}
        self.version = getattr(self, "version", 0) + 1  # changes with every write: caches of matches key on it

    # --- writes ---------------------------------------------------------------------------------------------
    def check(self, ids: list[str], payloads: list[bytes | None]) -> None:
        """Checks the payloads of items about to be written against the fields' types (the caller holds the write
        order, so no other write fixes a type meanwhile); remembers the types they fix.

        Raises:
            InvalidArgument: naming the item and the field.
        """
        items = [(uid, _decode(p)) for uid, p in zip(ids, payloads) if p]
        self.types.update(check_types(items, self.types))

    @staticmethod
    def decode(payloads: list[bytes | None]) -> list[dict]:
        """Serialized payloads as {name: (type, value)} for :meth:`put_fields` (done before taking the write lock)."""
        out = []
        for b in payloads:
            p = _decode(b)
            out.append({} if p is None else {name: (kind, value) for name, kind, value in typed_items(p)})
        return out

    def put(self, labels: np.ndarray, payloads: list[bytes | None]) -> None:
        """Indexes items written under ``labels`` (replacing what those labels had)."""
        self.put_fields(labels, self.decode(payloads))

    def put_fields(self, labels: np.ndarray, decoded: list[dict]) -> None:
        """:meth:`put` of payloads :meth:`decode` gave."""
        self.version += 1
        for label, fields in zip(labels.tolist(), decoded):
            for name, (kind, value) in fields.items():
                if name not in self.types and not (kind in LISTS and not value):
                    self.types[name] = kind
            for name, idx in self._fields.items():
                got = fields.get(name)
                want = self.schema[name]
                if got is None or not (got[0] == want or (got[0] in LISTS and want in LISTS and not got[1])):
                    idx.remove(label)  # absent, or of another type (stored before the field was declared)
                elif isinstance(idx, _Numeric):
                    idx.put(label, got[1])
                else:
                    idx.put(label, got[1] if want in LISTS else (got[1],))

    def remove(self, labels: np.ndarray) -> None:
        self.version += 1
        for label in np.asarray(labels).tolist():
            for idx in self._fields.values():
                idx.remove(label)

    def rebuild(self, labels: np.ndarray, payloads) -> None:
        """Forgets everything and indexes the items of an id table (after a checkpoint was loaded)."""
        self.__init__(self.schema)
        self.put(np.asarray(labels), list(payloads))

    # --- reads ----------------------------------------------------------------------------------------------
    def resolve(self, f: common_pb2.Filter, universe: np.ndarray) -> np.ndarray:
        """The labels among ``universe`` (the sorted labels of every item held) that match the filter (checked
        already: lookalike.filters.check_filter), sorted."""
        kind = f.WhichOneof("kind")
        if kind == "condition":
            return self._condition(f.condition, universe)
        if kind == "negate":
            return np.setdiff1d(universe, self.resolve(f.negate, universe), assume_unique=True)
        subs = getattr(f, kind).filters
        if kind == "all":
            out = universe
            for sub in sorted(subs, key=lambda s: s.WhichOneof("kind") != "condition"):  # cheap conditions first
                if not len(out):
                    break
                out = np.intersect1d(out, self.resolve(sub, out), assume_unique=True)
            return out
        parts = [self.resolve(sub, universe) for sub in subs]
        return np.unique(np.concatenate(parts)) if parts else _EMPTY

    def _condition(self, c: common_pb2.Condition, universe: np.ndarray) -> np.ndarray:
        idx = self._fields.get(c.field)
        if idx is None:  # not filterable: check_filter refuses it first
            raise InvalidArgument(f"field {c.field!r} is not filterable")
        op = c.WhichOneof("op")
        if op == "exists":
            has = np.intersect1d(universe, idx.exists(), assume_unique=True)
            return has if c.exists else np.setdiff1d(universe, has, assume_unique=True)
        if op == "range":
            r = c.range
            lo = hi = None
            lo_open = hi_open = False
            if r.HasField("gt"):
                lo, lo_open = plain(r.gt), True
            if r.HasField("gte") and (lo is None or plain(r.gte) > lo):
                lo, lo_open = plain(r.gte), False
            if r.HasField("lt"):
                hi, hi_open = plain(r.lt), True
            if r.HasField("lte") and (hi is None or plain(r.lte) < hi):
                hi, hi_open = plain(r.lte), False
            return self._within(idx.labels(*idx.range(lo, lo_open, hi, hi_open)), universe)
        values = [c.eq] if op == "eq" else list(getattr(c, op).values)
        hits = [self._equal(idx, plain(v)) for v in values]
        found = np.unique(np.concatenate(hits)) if hits else _EMPTY
        if op == "not_in":
            return np.setdiff1d(universe, found, assume_unique=True)
        return self._within(found, universe)

    @staticmethod
    def _equal(idx, v) -> np.ndarray:
        if isinstance(idx, _Numeric):
            return idx.labels(*idx.range(v, False, v, False))
        return idx.eq(v)

    @staticmethod
    def _within(labels: np.ndarray, universe: np.ndarray) -> np.ndarray:
        if len(labels) == len(universe):
            return labels
        return np.intersect1d(universe, labels, assume_unique=True)
