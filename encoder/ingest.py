"""Ingest a folder tree of images into a collection with an encoder: batches, progress, resume, a report.

Ids are the files' paths relative to the folder (with "/"), payload ``uri`` the file's absolute path (or
``uri_prefix`` + relative path). Resuming is free: every batch first asks which of its ids are stored
and sends only the others, so a second run after an interruption encodes only what is missing.

`lookalike ingest` runs it; it sits here, under the tools, because the benchmarks measure it too
(bench/encoder_bench.py) and bench sits below tools. May use: encoder (the image size limit); the client is passed in.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib

from tqdm import tqdm

from encoder.decode import MAX_IMAGE_BYTES

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".jfif", ".ppm", ".pgm"}
_BATCH_BYTES = 32 << 20  # well under the 64 MiB message limit


@dataclasses.dataclass
class IngestReport:
    files: int = 0                  # files seen under the folder
    stored: int = 0                 # images stored by this run
    already_stored: int = 0         # skipped: stored by an earlier run
    not_images: int = 0             # skipped: not an image file name
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> reason

    def summary(self) -> str:
        lines = [f"{self.files} files: {self.stored} stored now, {self.already_stored} already stored, "
                 f"{self.not_images} not images (by extension), {len(self.failed)} failed"]
        reasons = collections.Counter(r.split(":")[0] for r in self.failed.values())
        for reason, n in reasons.most_common():
            lines.append(f"  {n} x {reason}")
        for uid, reason in list(self.failed.items())[:10]:
            lines.append(f"    {uid}: {reason}")
        return "\n".join(lines)


def walk_images(root: pathlib.Path):
    """(relative id, path) of every file under root, sorted; and a flag for an image extension."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = pathlib.Path(dirpath) / name
            yield path.relative_to(root).as_posix(), path, path.suffix.lower() in IMAGE_EXTENSIONS


def ingest(client, collection: str, root: str | os.PathLike, batch: int = 64, uri_prefix: str | None = None,
           progress: bool = True) -> IngestReport:
    """Walks ``root`` and stores its images in ``collection`` (which must have an encoder)."""
    root = pathlib.Path(root)
    files = list(walk_images(root))
    report = IngestReport(files=len(files))
    bar = tqdm(total=len(files), unit="img", desc=f"ingest {collection}", disable=not progress)
    pending: list[tuple[str, pathlib.Path]] = []

    def flush():
        if not pending:
            return
        stored = set(client.get(collection, [uid for uid, _ in pending], include_vectors=False)[0])
        report.already_stored += len(stored)
        items, size = [], 0
        for uid, path in pending:
            if uid in stored:
                continue
            nbytes = path.stat().st_size
            if nbytes > MAX_IMAGE_BYTES:
                report.failed[uid] = f"too large: {nbytes} bytes, at most {MAX_IMAGE_BYTES}"
                continue
            uri = (uri_prefix + uid) if uri_prefix is not None else str(path.resolve())
            items.append((uid, path.read_bytes(), {"uri": uri}))
            size += nbytes
            if size > _BATCH_BYTES:
                _send(items)
                items, size = [], 0
        _send(items)
        bar.update(len(pending))
        pending.clear()

    def _send(items):
        if items:
            count, failures = client.upsert_images(collection, items, skip_bad=True)
            report.stored += count
            report.failed.update(failures)

    for uid, path, is_image in files:
        if not is_image:
            report.not_images += 1
            bar.update(1)
            continue
        pending.append((uid, path))
        if len(pending) >= batch:
            flush()
    flush()
    bar.close()
    return report
