"""Catalog jobs: questions asked of a whole collection, run over the sharded index.

- **dedup**: every item is searched against the whole collection in large batches (each batch one fan-out: every
  shard searches its part at once), pairs within the threshold are joined into groups (union-find), largest first.
- **cluster**: FAISS k-means on a sample, then every shard labels its own items with their nearest centroid (in
  their payload), reading the stored vectors.

A job works page by page (a page is a group of buckets) and writes each finished page to its directory under
``<storage>/jobs/<job id>/``, so a job that is interrupted (its process killed, the cluster restarted, cancelled)
resumes where it stopped: the plan (the pages) and, for k-means, the centroids are fixed when the job starts.
Items written while a job runs may or may not be seen by it.

:class:`JobManager` runs jobs on threads of the process that holds it: the router's own process in tests and
``LocalCluster``, a Ray actor (``control.ray_cluster.JobsActor``) in a cluster, so that every router sees the
same jobs and a job outlives the router that started it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time

import numpy as np

from lookalike.config import max_search_rows
from lookalike.errors import FailedPrecondition, InvalidArgument, LookalikeError, NotFound
from lookalike.wire import squared_norms_in_range
from protos import common_pb2

log = logging.getLogger(__name__)

RUNNING, SUCCEEDED, FAILED, CANCELLED = "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
# Not "." or "..": a job id names a folder under <data_dir>/jobs (those two would be that folder and its parent).
_JOB_ID = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.-]{1,64}$")
_KMEANS_REDO = 3  # k-means starts; the one with the lowest objective wins
MAX_CLUSTERS = 65536


# --- vectors, payloads ------------------------------------------------------------------------------------------
def cluster_space(x: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as float32 rows for k-means: hamming codes as one 0/1 float per bit, cosine rows normalised."""
    import faiss

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
    return msg.SerializeToString()


def within(D: np.ndarray, larger_is_better: bool, threshold: float) -> np.ndarray:
    """Distances that count as duplicates: similarity >= threshold (ip, cosine), distance <= threshold."""
    return D >= threshold if larger_is_better else D <= threshold


# --- groups -----------------------------------------------------------------------------------------------------
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


def plan_pages(counts: np.ndarray, page_items: int) -> list[list[int]]:
    """Consecutive buckets grouped so that each group holds about ``page_items`` items (at least one bucket)."""
    pages, cur, n = [], [], 0
    for b, c in enumerate(counts.tolist()):
        if cur and n + c > page_items:
            pages.append(cur)
            cur, n = [], 0
        cur.append(b)
        n += c
    if cur:
        pages.append(cur)
    return pages


# --- jobs -------------------------------------------------------------------------------------------------------
class JobCancelled(Exception):
    pass


@dataclasses.dataclass
class JobStatus:
    id: str
    kind: str
    collection: str
    state: str = RUNNING
    done: int = 0
    total: int = 0
    message: str = ""
    started: float = 0.0
    elapsed: float = 0.0
    summary: dict = dataclasses.field(default_factory=dict)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CatalogJob:
    """One job's work, in ``workdir``; :meth:`run` reports progress in ``status`` and returns the summary."""

    kind = ""

    def __init__(self, spec: dict, workdir: pathlib.Path):
        self.spec = spec
        self.workdir = workdir
        (workdir / "pages").mkdir(parents=True, exist_ok=True)

    def _plan(self, router, page_items: int) -> list[list[int]]:
        path = self.workdir / "plan.json"
        if path.exists():
            return json.loads(path.read_text())
        pages = plan_pages(router.bucket_counts(self.spec["collection"], timeout=60), page_items)
        _write_atomic(path, json.dumps(pages).encode())
        return pages

    def _page(self, i: int) -> pathlib.Path:
        return self.workdir / "pages" / f"{i:06d}.npz"

    def run(self, router, status: JobStatus, stop: threading.Event) -> dict:
        raise NotImplementedError


class DedupJob(CatalogJob):
    kind = "dedup"

    @staticmethod
    def check(spec: dict, coll) -> dict:
        spec = {"collection": coll.name, "threshold": float(spec["threshold"]), "k": int(spec.get("k") or 10),
                "nprobe": int(spec.get("nprobe") or 0), "ef_search": int(spec.get("ef_search") or 0),
                "batch": int(spec.get("batch") or 4096)}
        if not np.isfinite(spec["threshold"]):
            raise InvalidArgument("the dedup threshold must be a finite number")
        if not 1 <= spec["k"] <= 1023:
            raise InvalidArgument(f"dedup k must be between 1 and 1023, got {spec['k']}")
        if not 1 <= spec["batch"] <= 10000:
            raise InvalidArgument(f"dedup batch must be between 1 and 10000, got {spec['batch']}")
        return spec

    def run(self, router, status: JobStatus, stop: threading.Event) -> dict:
        sp = self.spec
        name = sp["collection"]
        coll = router.shard_map(name).collection
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
            ids, x, _ = router.scan(name, buckets, include_vectors=True, timeout=600)
            qa, qb, qd = [], [], []
            for s in range(0, len(ids), batch):
                if stop.is_set():
                    raise JobCancelled()
                q_ids = np.array(ids[s:s + batch], dtype=object)
                res = router.search(name, x[s:s + batch], k, sp["nprobe"], sp["ef_search"], timeout=600)
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
        _write_atomic(self.workdir / "groups.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())
        return {"pairs": int(len(d)), "groups": len(groups), "grouped_items": sum(len(g[0]) for g in groups),
                "largest": len(groups[0][0]) if groups else 0}


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
        return spec

    def _centroids(self, router, coll) -> np.ndarray:
        """k-means on a seeded sample, best of a few starts (one start can merge two true clusters and split a
        third); saved so a resumed job labels with the same centroids."""
        import faiss

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


KINDS = {DedupJob.kind: DedupJob, ClusterJob.kind: ClusterJob}


def default_job_id(kind: str, spec: dict) -> str:
    """The same request gets the same id, so that running it again resumes or returns that job."""
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"{kind}-{spec['collection']}-{digest}"[:64]


class JobManager:
    """Catalog jobs on threads of this process, checkpointed under ``<data_dir>/jobs``.

    Args:
        router: a :class:`router.core.Router` (its control plane, shards and maps).
        data_dir: the storage root.
        resume: restart, at once, jobs that were running when this process (or the last one) stopped.
    """

    def __init__(self, router, data_dir, resume: bool = False):
        self.router = router
        self.root = pathlib.Path(data_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._running: dict[str, tuple[JobStatus, threading.Event, threading.Thread]] = {}
        self._finished: dict[str, JobStatus] = {}  # ended here without a result file (failed, cancelled)
        if resume:
            for d in sorted(self.root.iterdir()):
                meta = self._meta(d.name)
                if meta and not (d / "result.json").exists() and not meta.get("cancelled"):
                    log.info("resuming job %s", d.name)
                    self._launch(d.name, meta)

    def _meta(self, job_id: str) -> dict | None:
        if not _JOB_ID.match(job_id):  # never a path outside the jobs folder ("../x", "/etc", "")
            return None
        try:
            return json.loads((self.root / job_id / "job.json").read_text())
        except (OSError, ValueError):
            return None

    def _write_meta(self, job_id: str, meta: dict) -> None:
        _write_atomic(self.root / job_id / "job.json", json.dumps(meta).encode())

    def start(self, kind: str, spec: dict, job_id: str = "") -> JobStatus:
        """Starts a job, resumes an interrupted one of that id, or returns the running or finished one.

        Raises:
            InvalidArgument: a bad spec or id; an id in use for a different job.
            NotFound: unknown collection.
        """
        if kind not in KINDS:
            raise InvalidArgument(f"unknown job kind {kind!r}; kinds: {', '.join(KINDS)}")
        coll = self.router.shard_map(spec.get("collection", "")).collection
        spec = KINDS[kind].check(spec, coll)
        job_id = job_id or default_job_id(kind, spec)
        if not _JOB_ID.match(job_id):
            raise InvalidArgument(f"job id {job_id!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
        with self._lock:
            meta = self._meta(job_id)
            if meta is not None and (meta["kind"], meta["spec"]) != (kind, spec):
                raise InvalidArgument(f"job {job_id!r} exists with another spec ({meta['kind']} {meta['spec']}); "
                                      "choose another id")
            if job_id in self._running or (meta and (self.root / job_id / "result.json").exists()):
                return self.get(job_id)
            meta = meta or {"id": job_id, "kind": kind, "spec": spec, "started": time.time()}
            meta["cancelled"] = False
            (self.root / job_id).mkdir(parents=True, exist_ok=True)
            self._write_meta(job_id, meta)
            return self._launch(job_id, meta)

    def _launch(self, job_id: str, meta: dict) -> JobStatus:
        status = JobStatus(job_id, meta["kind"], meta["spec"]["collection"], started=meta["started"])
        stop = threading.Event()
        job = KINDS[meta["kind"]](meta["spec"], self.root / job_id)
        thread = threading.Thread(target=self._run, args=(job, status, stop), daemon=True, name=f"job-{job_id}")
        self._running[job_id] = (status, stop, thread)
        self._finished.pop(job_id, None)
        thread.start()
        return dataclasses.replace(status)

    def _run(self, job: CatalogJob, status: JobStatus, stop: threading.Event) -> None:
        t0 = time.monotonic()
        try:
            summary = job.run(self.router, status, stop)
            result = {"state": SUCCEEDED, "summary": summary, "done": status.done, "total": status.total}
        except JobCancelled:
            result = {"state": CANCELLED, "message": "cancelled; start it again to resume"}
        except Exception as err:  # a job's failure is its own: reported in its status, the server goes on
            if isinstance(err, LookalikeError):  # the input's fault (a dropped collection, too few items)
                log.warning("job %s failed: %s", status.id, err)
                result = {"state": FAILED, "message": f"{type(err).__name__}: {err}"}
            else:
                log.exception("job %s failed", status.id)
                result = {"state": FAILED, "message": f"{type(err).__name__}: {err}; start it again to resume"}
        result["elapsed"] = time.monotonic() - t0
        if result["state"] == SUCCEEDED:
            _write_atomic(job.workdir / "result.json", json.dumps(result).encode())
        with self._lock:
            status.state, status.message = result["state"], result.get("message", "")
            status.summary = result.get("summary", status.summary)
            status.elapsed = result["elapsed"]
            self._running.pop(status.id, None)
            self._finished[status.id] = status

    def get(self, job_id: str) -> JobStatus:
        """Raises NotFound for an unknown job."""
        run = self._running.get(job_id)
        if run is not None:
            status = dataclasses.replace(run[0])
            status.elapsed = time.time() - status.started
            return status
        meta = self._meta(job_id)
        if meta is None:
            raise NotFound(f"no job {job_id!r}")
        status = JobStatus(job_id, meta["kind"], meta["spec"]["collection"], started=meta["started"])
        try:
            result = json.loads((self.root / job_id / "result.json").read_text())
        except (OSError, ValueError):
            here = self._finished.get(job_id)
            if here is not None:
                return dataclasses.replace(here)
            status.state = CANCELLED
            status.message = "interrupted; start it again to resume"
            return status
        status.state, status.summary, status.elapsed = result["state"], result["summary"], result["elapsed"]
        status.done, status.total = result["done"], result["total"]
        return status

    def list(self) -> list[JobStatus]:
        return [self.get(d.name) for d in sorted(self.root.iterdir()) if (d / "job.json").exists()]

    def cancel(self, job_id: str) -> JobStatus:
        """Stops a running job at its next checkpoint (it can be started again to resume)."""
        with self._lock:
            meta = self._meta(job_id)
            if meta is None:
                raise NotFound(f"no job {job_id!r}")
            run = self._running.get(job_id)
            if run is not None:
                meta["cancelled"] = True
                self._write_meta(job_id, meta)
                run[1].set()
                thread = run[2]
            else:
                thread = None
        if thread is not None:
            thread.join(timeout=30)
        return self.get(job_id)

    def groups(self, job_id: str, offset: int = 0, limit: int = 0) -> list[dict]:
        """The groups of a finished dedup job: dicts {group, ids, distances}, largest first.

        Raises:
            NotFound: no such job. FailedPrecondition: not a dedup job, or not finished.
        """
        status = self.get(job_id)
        if status.kind != DedupJob.kind:
            raise FailedPrecondition(f"job {job_id!r} is a {status.kind} job: it has no duplicate groups")
        if status.state != SUCCEEDED:
            raise FailedPrecondition(f"job {job_id!r} is {status.state.lower()}: its groups come when it succeeds")
        out = []
        with open(self.root / job_id / "groups.jsonl") as f:
            for n, line in enumerate(f):
                if n < offset or not line.strip():
                    continue
                if limit and len(out) >= limit:
                    break
                out.append(json.loads(line))
        return out

    def delete(self, job_id: str) -> None:
        self.cancel(job_id)
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def close(self) -> None:
        for _status, stop, thread in list(self._running.values()):
            stop.set()
            thread.join(timeout=30)
