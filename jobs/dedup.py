"""The dedup job: every item searched against the whole collection, pairs within a threshold joined into groups.

Items are searched in large batches (each batch one fan-out: every shard searches its part at once); pairs within
the threshold are joined into groups (union-find), largest first, and written to ``groups.jsonl`` in the job's
folder.

Uses lookalike (limits, errors) and jobs.base; the router it runs over is passed in (duck-typed).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading

import numpy as np

from lookalike.files import write_atomic
from jobs.base import CatalogJob, JobCancelled, JobStatus
from lookalike.config import max_search_rows
from lookalike.errors import InvalidArgument
from lookalike.filters import check_filter
from protos import common_pb2


def within(D: np.ndarray, larger_is_better: bool, threshold: float) -> np.ndarray:
    """Distances that count as duplicates: similarity >= threshold (ip, cosine), distance <= threshold."""
    return D >= threshold if larger_is_better else D <= threshold


def filter_of(spec: dict) -> common_pb2.Filter | None:
    """The job's filter (kept in its spec as base64 of the serialized Filter), or None."""
    text = spec.get("filter")
    if not text:
        return None
    try:
        return common_pb2.Filter.FromString(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as err:
        raise InvalidArgument(f"the dedup job's filter is not a serialized Filter ({err})") from None


def group_pairs(a, b, d, larger_is_better: bool) -> list[tuple[list[str], list[float]]]:
    """Connected components of the pairs (a[i], b[i]) with distance d[i] (union-find).

    Returns:
        Groups of two or more, largest first (ties: by first id); each is (member ids sorted, each member's
        distance to its nearest other member, aligned).
    """
    a, b, d = np.asarray(a, dtype=str), np.asarray(b, dtype=str), np.asarray(d, dtype=np.float32)
    if not len(a):
        return []
    names, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inv[:len(a)], inv[len(a):]
    parent = np.arange(len(names))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for x, y in zip(ia.tolist(), ib.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([find(x) for x in range(len(names))])
    best = np.full(len(names), -np.inf if larger_is_better else np.inf, dtype=np.float32)
    op = np.maximum if larger_is_better else np.minimum
    op.at(best, ia, d)
    op.at(best, ib, d)
    order = np.argsort(roots, kind="stable")
    cuts = np.flatnonzero(np.diff(roots[order])) + 1
    groups = []
    for members in np.split(order, cuts):
        if len(members) >= 2:
            groups.append(([str(names[m]) for m in members], [float(best[m]) for m in members]))
    groups.sort(key=lambda g: (-len(g[0]), g[0][0]))
    return groups


class DedupJob(CatalogJob):
    kind = "dedup"

    @staticmethod
    def check(raw: dict, coll) -> dict:
        spec = {"collection": coll.name, "threshold": float(raw["threshold"]), "k": int(raw.get("k") or 10),
                "nprobe": int(raw.get("nprobe") or 0), "ef_search": int(raw.get("ef_search") or 0),
                "batch": int(raw.get("batch") or 4096)}
        if not np.isfinite(spec["threshold"]):
            raise InvalidArgument("the dedup threshold must be a finite number")
        if not 1 <= spec["k"] <= 1023:
            raise InvalidArgument(f"dedup k must be between 1 and 1023, got {spec['k']}")
        if not 1 <= spec["batch"] <= 10000:
            raise InvalidArgument(f"dedup batch must be between 1 and 10000, got {spec['batch']}")
        filt = filter_of(raw)
        if filt is not None:  # only matching items, searched against each other (dedup within a category)
            check_filter(filt, coll.schema, coll.name)
            spec["filter"] = raw["filter"]
        return spec

    def run(self, router, status: JobStatus, stop: threading.Event) -> dict:
        sp = self.spec
        name = sp["collection"]
        coll = router.shard_map(name).collection
        filt = filter_of(sp)
        pages = self._plan(router, sp["batch"] * 4)
        status.total = int(router.bucket_counts(name, timeout=60).sum())
        k = sp["k"] + 1  # the item itself comes back too
        batch = min(sp["batch"], max_search_rows(k))  # an answer must fit in one gRPC message
        pairs = 0
        for i, buckets in enumerate(pages):
            path = self._page(i)
            if path.exists():
                with np.load(path) as z:
                    status.done += int(z["n"])
                    pairs += len(z["d"])
                continue
            ids, x, _ = router.scan(name, buckets, include_vectors=True, timeout=600, filt=filt)
            qa, qb, qd = [], [], []
            for s in range(0, len(ids), batch):
                if stop.is_set():
                    raise JobCancelled()
                q_ids = np.array(ids[s:s + batch], dtype=object)
                res = router.search(name, x[s:s + batch], k, sp["nprobe"], sp["ef_search"], timeout=600, filt=filt)
                nbr = np.array([row + [""] * (k - len(row)) for row in res.ids], dtype=object)
                hit = within(res.D, coll.larger_is_better, sp["threshold"]) & (nbr != "") & (nbr != q_ids[:, None])
                rows, cols = np.nonzero(hit)
                qa.append(q_ids[rows])
                qb.append(nbr[rows, cols])
                qd.append(res.D[rows, cols])
                status.done += len(q_ids)
            a = np.concatenate(qa).astype(str) if qa else np.empty(0, dtype=str)
            b = np.concatenate(qb).astype(str) if qb else np.empty(0, dtype=str)
            d = np.concatenate(qd).astype(np.float32) if qd else np.empty(0, dtype=np.float32)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, a=a, b=b, d=d, n=np.int64(len(ids)))
            os.replace(tmp, path)
            pairs += len(d)
            status.summary = {"pairs": pairs, "pages": f"{i + 1}/{len(pages)}"}
        status.total = status.done
        a, b, d = [], [], []
        for i in range(len(pages)):
            with np.load(self._page(i)) as z:
                a.append(z["a"])
                b.append(z["b"])
                d.append(z["d"])
        a, b, d = np.concatenate(a), np.concatenate(b), np.concatenate(d)
        first_a = a <= b  # each pair is usually found from both ends
        lo, hi = np.where(first_a, a, b), np.where(first_a, b, a)
        if len(lo):
            _, first = np.unique(np.char.add(np.char.add(lo, "\0"), hi), return_index=True)
            lo, hi, d = lo[first], hi[first], d[first]
        groups = group_pairs(lo, hi, d, coll.larger_is_better)
        lines = [json.dumps({"group": g, "ids": ids, "distances": dist}) for g, (ids, dist) in enumerate(groups)]
        write_atomic(self.workdir / "groups.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())
        return {"pairs": int(len(d)), "groups": len(groups), "grouped_items": sum(len(g[0]) for g in groups),
                "largest": len(groups[0][0]) if groups else 0}

