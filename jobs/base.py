"""What every catalog job shares: its states and status, its work folder and page plan, atomic writes.

A job works page by page (a page is a group of consecutive buckets) and writes each finished page to its folder
under ``<storage>/jobs/<job id>/``, so a job that is interrupted resumes where it stopped: the plan (the pages) is
fixed when the job starts.

Uses numpy, the standard library and the base package (lookalike.files).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import threading

import numpy as np

from lookalike.files import write_atomic

RUNNING, SUCCEEDED, FAILED, CANCELLED = "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"


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


class JobCancelled(Exception):
    """Raised inside a job's run when it was asked to stop (it resumes when started again)."""


@dataclasses.dataclass
class JobStatus:
    """Where a job stands: its state (RUNNING, SUCCEEDED, FAILED, CANCELLED), items done of total, and its summary."""

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
        write_atomic(path, json.dumps(pages).encode())
        return pages

    def _page(self, i: int) -> pathlib.Path:
        return self.workdir / "pages" / f"{i:06d}.npz"

    def run(self, router, status: JobStatus, stop: threading.Event) -> dict:
        raise NotImplementedError

