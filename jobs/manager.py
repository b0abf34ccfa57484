"""JobManager: runs catalog jobs on threads of the process that holds it, and keeps them in storage.

Each job has a folder ``<storage>/jobs/<job id>/`` (``job.json``: its kind and spec; ``result.json`` once it
succeeded); a job that was running when its process stopped resumes from its checkpoints. Items written while a
job runs may or may not be seen by it.

The manager lives in the router's own process in tests and ``LocalCluster``, and in a Ray actor
(``control.ray_actors.JobsActor``) in a cluster, so that every router sees the same jobs and a job outlives the
router that started it.

Uses lookalike.errors and the jobs (jobs.dedup, jobs.kmeans); the router it runs them over is passed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import re
import shutil
import threading
import time

from lookalike.files import write_atomic
from jobs.base import CANCELLED, FAILED, SUCCEEDED, CatalogJob, JobCancelled, JobStatus
from jobs.dedup import DedupJob
from jobs.kmeans import ClusterJob
from lookalike.errors import FailedPrecondition, InvalidArgument, LookalikeError, NotFound

log = logging.getLogger(__name__)

# Not "." or "..": a job id names a folder under <data_dir>/jobs (those two would be that folder and its parent).
_JOB_ID = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.-]{1,64}$")

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
        write_atomic(self.root / job_id / "job.json", json.dumps(meta).encode())

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
            write_atomic(job.workdir / "result.json", json.dumps(result).encode())
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
