"""The k-means (cluster) job: FAISS k-means on a sample, then every shard labels its own items with their nearest
centroid, in their payload; and the pieces shards use for that labelling.

The centroids are saved in the job's folder when trained, so a resumed job labels with the same ones.

Uses faiss, lookalike (errors, wire), protos and jobs.base; the router it runs over is passed in (duck-typed).
"""

from __future__ import annotations

import os
import threading

import faiss
import numpy as np

from jobs.base import CatalogJob, JobCancelled, JobStatus
from lookalike.errors import FailedPrecondition, InvalidArgument
from lookalike.wire import squared_norms_in_range
from protos import common_pb2

_KMEANS_REDO = 3  # k-means starts; the one with the lowest objective wins
MAX_CLUSTERS = 65536


def cluster_space(x: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as float32 rows for k-means: hamming codes as one 0/1 float per bit, cosine rows normalised."""
    if metric == "hamming":
        return np.unpackbits(np.asarray(x, dtype=np.uint8), axis=1).astype(np.float32)
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def cluster_dim(coll) -> int:
    """Columns of :func:`cluster_space` rows: the collection's dim (bits, for hamming)."""
    return coll.dim


def check_centroids(c: np.ndarray, coll) -> np.ndarray:
    """Raises InvalidArgument unless ``c`` is 1-65536 finite float32 rows of the collection's k-means dim."""
    if c.dtype != np.float32 or c.ndim != 2 or c.shape[1] != cluster_dim(coll):
        raise InvalidArgument(f"centroids must be float32 rows of {cluster_dim(coll)} components")
    if not 1 <= len(c) <= MAX_CLUSTERS:
        raise InvalidArgument(f"between 1 and {MAX_CLUSTERS} centroids, got {len(c)}")
    if not np.isfinite(c).all():
        raise InvalidArgument("centroids must be finite")
    return c


def set_payload_field(payload: bytes | None, field: str, value: str) -> bytes:
    """A serialized Payload with ``field`` set to ``value`` (the other fields kept)."""
    msg = common_pb2.Payload.FromString(payload) if payload else common_pb2.Payload()
    msg.fields[field] = value
    if field in msg.values:  # a typed value of the same name is replaced (a name lives in one map only)
        del msg.values[field]
    return msg.SerializeToString(deterministic=True)


class ClusterJob(CatalogJob):
    kind = "cluster"

    @staticmethod
    def check(spec: dict, coll) -> dict:
        spec = {"collection": coll.name, "k": int(spec.get("k") or 0), "sample": int(spec.get("sample") or 0),
                "field": spec.get("field") or "cluster", "niter": int(spec.get("niter") or 20),
                "seed": int(spec.get("seed") or 1234)}
        if not 1 <= spec["k"] <= MAX_CLUSTERS:
            raise InvalidArgument(f"the number of clusters k must be between 1 and {MAX_CLUSTERS}, got {spec['k']}")
        if not 1 <= spec["niter"] <= 1000:
            raise InvalidArgument("niter must be between 1 and 1000")
        if len(spec["field"].encode()) > 64:
            raise InvalidArgument("the payload field name is at most 64 bytes")
        declared = coll.schema.get(spec["field"], "string")
        if declared != "string":  # labels are strings ("3")
            raise InvalidArgument(f"payload field {spec['field']!r} is declared {declared}; cluster labels are "
                                  "strings: name another field, or one declared string")
        return spec

    def _centroids(self, router, coll) -> np.ndarray:
        """k-means on a seeded sample, best of a few starts (one start can merge two true clusters and split a
        third); saved so a resumed job labels with the same centroids."""
        path = self.workdir / "centroids.npy"
        if path.exists():
            return np.load(path)
        sp = self.spec
        total = int(router.bucket_counts(sp["collection"], timeout=60).sum())
        size = min(total, sp["sample"] or 256 * sp["k"])
        if size < sp["k"]:
            raise FailedPrecondition(f"collection {coll.name!r} holds {total} items: too few for {sp['k']} clusters")
        _, x, _ = router.sample(sp["collection"], size, seed=sp["seed"], include_vectors=True, timeout=600)
        x = cluster_space(x, coll.metric)
        # Vectors too long for finite distances (stored before the API refused them) would make k-means abort.
        x = x[squared_norms_in_range(x)]
        if len(x) < sp["k"]:
            raise FailedPrecondition(f"collection {coll.name!r}: {len(x)} items sampled with finite distances; too "
                                     f"few for {sp['k']} clusters")
        # The API's seed is a uint64; FAISS takes a C int (a larger one raised OverflowError and failed the job).
        km = faiss.Kmeans(x.shape[1], sp["k"], niter=sp["niter"], seed=sp["seed"] % 2**31,
                          spherical=coll.metric == "cosine",
                          nredo=_KMEANS_REDO,
                          max_points_per_centroid=max(256, -(-len(x) // sp["k"])))
        km.train(x)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        tmp = self.workdir / "centroids.tmp.npy"
        np.save(tmp, centroids)
        os.replace(tmp, path)
        return centroids

    def run(self, router, status: JobStatus, stop: threading.Event) -> dict:
        sp = self.spec
        name = sp["collection"]
        coll = router.shard_map(name).collection
        counts = router.bucket_counts(name, timeout=60)
        status.total = int(counts.sum())
        status.message = "training k-means"
        centroids = self._centroids(router, coll)
        status.message = "labelling items"
        pages = self._plan(router, 65536)
        sizes = np.zeros(len(centroids), dtype=np.int64)
        for i, buckets in enumerate(pages):
            path = self._page(i)
            if path.exists():
                with np.load(path) as z:
                    sizes += z["sizes"]
            else:
                if stop.is_set():
                    raise JobCancelled()
                page = router.assign_clusters(name, centroids, sp["field"], buckets, timeout=600)
                tmp = path.with_name(path.stem + ".tmp.npz")
                np.savez(tmp, sizes=page)
                os.replace(tmp, path)
                sizes += page
            status.done = int(sizes.sum())
            status.summary = {"sizes": sizes.tolist()}
        status.message = ""
        status.total = status.done
        return {"sizes": sizes.tolist(), "field": sp["field"]}

