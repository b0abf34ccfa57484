"""`lookalike backup` and `lookalike restore`: a collection to a directory of files and back, through the router.

A backup is a directory::

    manifest.json        the collection's spec (dim, metric, index, buckets, replication, encoder...), when the
                         backup started and finished, and per chunk: its buckets, items and the SHA-256 of each file
    chunk-00000.npy      the vectors of a run of consecutive buckets, shape (n, d) float32 (uint8 codes for hamming)
    chunk-00000.jsonl    one line per row of the .npy: {"id": ..., "payload": {...}}

``backup`` reads the collection with the Export call (every bucket once, from one of its owners, page by page), so
every item acknowledged before it started, and not deleted or replaced since, is in the backup; items written
while it runs may or may not be. The manifest is replaced (atomically) after each chunk: the same command run again
after an interruption goes on from the last chunk written. ``restore`` checks every file against the manifest
first, creates the collection with the backed-up spec (in any cluster: the buckets are placed on its shards), and
upserts the chunks; an interrupted restore run again skips the chunks it recorded as done (in
``restored-<collection>.json`` in the backup directory) and upserts the rest (an upsert replaces by id).

May use: the base package (lookalike), protos, tools.cli.common and tools.cli.flags.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import pathlib
import sys

import numpy as np
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from tqdm import tqdm

from lookalike.config import LIMITS
from lookalike.files import write_atomic
from protos import common_pb2, lookalike_pb2
from tools.cli.common import UserError, open_client
from tools.cli.flags import number, positive_int, with_target

FORMAT = 1
MANIFEST = "manifest.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _save_chunk(out: pathlib.Path, n: int, ids: list[str], vectors: list[np.ndarray], payloads: list[dict],
                cols: tuple[int, type]) -> dict:
    """Writes chunk ``n`` (its .npy and .jsonl) and returns its manifest entry, without the buckets."""
    name = f"chunk-{n:05d}"
    x = np.concatenate(vectors) if vectors else np.empty((0, cols[0]), dtype=cols[1])
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    write_atomic(out / f"{name}.npy", buf.getvalue())
    lines = "".join(json.dumps({"id": i, "payload": p}, ensure_ascii=False) + "\n" for i, p in zip(ids, payloads))
    write_atomic(out / f"{name}.jsonl", lines.encode("utf-8"))
    return {"name": name, "items": len(ids),
            "files": {f"{name}.npy": _sha256(out / f"{name}.npy"), f"{name}.jsonl": _sha256(out / f"{name}.jsonl")}}


def _read_manifest(out: pathlib.Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("chunks"), list):
            raise ValueError(f"format {manifest.get('format')!r}, not {FORMAT}")
        return manifest
    except (ValueError, AttributeError) as err:
        raise UserError(f"{path} is not a lookalike backup manifest ({err})") from None


def cmd_backup(args) -> int:
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_client(args) as c:
        info = c.describe_collection(args.name)
        spec = MessageToDict(info.spec, preserving_proto_field_name=True)
        manifest = _read_manifest(out)
        if manifest is None:
            manifest = {"format": FORMAT, "collection": args.name, "spec": spec, "items_at_start": info.count,
                        "started": _now(), "finished": None, "chunks": []}
        elif manifest["collection"] != args.name or manifest["spec"] != spec:
            raise UserError(f"{out} holds a backup of another collection ({manifest['collection']!r} with a "
                            "different spec): give an empty directory")
        elif manifest["finished"]:
            raise UserError(f"{out} holds a finished backup of {args.name!r} ({manifest['finished']}): give an empty "
                            "directory for a new one")
        done = {b for chunk in manifest["chunks"] for b in chunk["buckets"]}
        todo = [b for b in range(info.spec.buckets) if b not in done]
        binary = info.spec.metric == common_pb2.HAMMING
        cols = (info.spec.dim // 8, np.uint8) if binary else (info.spec.dim, np.float32)
        bar = tqdm(total=max(info.count, sum(ch["items"] for ch in manifest["chunks"])), unit="item",
                   desc=f"backup {args.name}", initial=sum(ch["items"] for ch in manifest["chunks"]),
                   disable=True if args.quiet else None)
        try:
            ids, vectors, payloads, buckets = [], [], [], []
            for i, b in enumerate(todo):
                for page_ids, x, page_payloads in c.export(args.name, [b], args.page):
                    ids += page_ids
                    vectors.append(x)
                    payloads += page_payloads
                    bar.update(len(page_ids))
                buckets.append(b)
                if len(ids) >= args.chunk_items or i == len(todo) - 1:
                    chunk = _save_chunk(out, len(manifest["chunks"]), ids, vectors, payloads, cols)
                    manifest["chunks"].append({"buckets": buckets, **chunk})
                    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
                    ids, vectors, payloads, buckets = [], [], [], []
        except KeyboardInterrupt:
            bar.close()
            print(f"\nstopped: {len(manifest['chunks'])} chunk(s) written; run the same command again to go on",
                  file=sys.stderr)
            return 130
        finally:
            bar.close()
    manifest["finished"] = _now()
    manifest["items"] = sum(ch["items"] for ch in manifest["chunks"])
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    print(f"backed up {manifest['items']} items of {args.name} in {len(manifest['chunks'])} chunk(s) to {out}")
    return 0


def check_backup(out: pathlib.Path) -> dict:
    """The manifest of a finished backup whose every file is there and matches its SHA-256; a UserError with a
    sentence naming the first file that does not."""
    manifest = _read_manifest(out)
    if manifest is None:
        raise UserError(f"{out} holds no backup ({MANIFEST} is missing)")
    if not manifest.get("finished"):
        raise UserError(f"{out} holds an unfinished backup of {manifest['collection']!r}: run `lookalike backup "
                        f"{manifest['collection']} {out}` again to finish it")
    for chunk in manifest["chunks"]:
        for name, digest in chunk["files"].items():
            path = out / name
            if not path.exists():
                raise UserError(f"backup {out} is damaged: {name} is missing")
            if _sha256(path) != digest:
                raise UserError(f"backup {out} is damaged: {name} does not match its SHA-256 in {MANIFEST} "
                                "(changed or corrupted since the backup)")
    return manifest


def _chunk(out: pathlib.Path, chunk: dict, spec) -> tuple[list[str], np.ndarray, list[dict]]:
    name = chunk["name"]
    x = np.load(out / f"{name}.npy", allow_pickle=False)
    rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text("utf-8").splitlines() if line]
    want = (spec.dim // 8, np.uint8) if spec.metric == common_pb2.HAMMING else (spec.dim, np.float32)
    if x.ndim != 2 or x.shape[1] != want[0] or x.dtype != want[1] or not len(x) == len(rows) == chunk["items"]:
        raise UserError(f"backup {out}: {name} holds {x.shape} {x.dtype} for {len(rows)} ids; the manifest says "
                        f"{chunk['items']} rows of {want[0]} {np.dtype(want[1])}")
    return [r["id"] for r in rows], x, [r["payload"] for r in rows]


def cmd_restore(args) -> int:
    out = pathlib.Path(args.dir)
    manifest = check_backup(out)
    try:
        spec = ParseDict(manifest["spec"], common_pb2.CollectionSpec())
    except ParseError as err:
        raise UserError(f"{out / MANIFEST}: the collection spec does not parse ({err})") from None
    spec.name = args.name or spec.name
    if args.replication:
        spec.replication = args.replication
    progress = out / f"restored-{spec.name}.json"
    with open_client(args) as c:
        existing = {i.spec.name: i.spec for i in c.list_collections()}
        done: set[str] = set()
        if spec.name in existing:
            if existing[spec.name] != spec:
                raise UserError(f"collection {spec.name!r} exists with another spec: drop it, or restore under "
                                "another name (--name)")
            if progress.exists():
                done = set(json.loads(progress.read_text()).get("chunks", []))
        else:
            c.stub.CreateCollection(lookalike_pb2.CreateCollectionRequest(spec=spec), timeout=c.timeout)
        total = sum(ch["items"] for ch in manifest["chunks"])
        bar = tqdm(total=total, unit="item", desc=f"restore {spec.name}", disable=True if args.quiet else None,
                   initial=sum(ch["items"] for ch in manifest["chunks"] if ch["name"] in done))
        try:
            for chunk in manifest["chunks"]:
                if chunk["name"] in done:
                    continue
                ids, x, payloads = _chunk(out, chunk, spec)
                batches = ((ids[i:i + args.batch], x[i:i + args.batch], payloads[i:i + args.batch])
                           for i in range(0, len(ids), args.batch))
                if ids:
                    c.upsert_stream(spec.name, batches)
                bar.update(len(ids))
                done.add(chunk["name"])
                try:  # progress for a run that goes on after an interruption; a read-only backup just has none
                    write_atomic(progress, json.dumps({"chunks": sorted(done)}).encode())
                except OSError:
                    pass
        except KeyboardInterrupt:
            bar.close()
            print(f"\nstopped: {len(done)} of {len(manifest['chunks'])} chunk(s) restored; run the same command "
                  "again to go on", file=sys.stderr)
            return 130
        finally:
            bar.close()
    print(f"restored {total} items of {manifest['collection']} (backed up {manifest['started']}) into {spec.name}")
    return 0


def add_backup(sub) -> None:
    """The `backup` and `restore` subcommands."""
    bk = with_target(sub.add_parser("backup", help="write every item of a collection and its spec to a directory"))
    bk.add_argument("name", help="the collection")
    bk.add_argument("dir", help="the backup directory (created; an unfinished backup there is carried on)")
    bk.add_argument("--page", type=number(int, low=1, high=LIMITS.max_batch), default=LIMITS.max_batch,
                    help="items per message from the router, at most; fewer where they would pass half the message "
                         "limit (default %(default)s)")
    bk.add_argument("--chunk-items", type=positive_int, default=100_000,
                    help="items per chunk file, about (a chunk ends with a bucket) (default %(default)s)")
    bk.add_argument("--quiet", action="store_true", help="no progress bar")
    bk.set_defaults(func=cmd_backup)
    rs = with_target(sub.add_parser("restore", help="create a collection from a backup directory and load it"))
    rs.add_argument("dir", help="the backup directory")
    rs.add_argument("--name", default="", help="the collection to create (default: the backed-up one's name)")
    rs.add_argument("--replication", type=positive_int, default=0,
                    help="copies of each item (default: the backed-up spec's)")
    rs.add_argument("--batch", type=number(int, low=1, high=LIMITS.max_batch), default=1000,
                    help="items per upsert (default %(default)s)")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    rs.set_defaults(func=cmd_restore)
