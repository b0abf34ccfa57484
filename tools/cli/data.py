"""The items of a collection: `lookalike upsert` (a .npy file, streamed), `delete`, `get`, `search` (vectors or
query images, with a contact sheet) and `ingest` (a folder of images through the collection's encoder).

May use: encoder (folder ingest, the match rule drawn on a sheet), tools.sheet, tools.cli.common and tools.cli.flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys

import grpc
import numpy as np
from tqdm import tqdm

from encoder.ingest import ingest
from encoder.match import default_match
from tools.cli.common import UserError, load_npy, one_line, open_client, os_error, read_lines, read_payloads
from tools.cli.filtering import check_payload_file, cli_filter, filter_flag
from tools.cli.flags import number, positive_int, search_param_flags, with_target
from tools.sheet import contact_sheet, read_uri


def cmd_upsert(args) -> int:
    xb = load_npy(args.vectors, "vectors file", mmap=True)
    if xb.ndim != 2:
        raise UserError(f"{args.vectors} holds an array of shape {xb.shape}; expected (n, d): one vector a row")
    n = len(xb)
    ids = read_lines(args.ids, "--ids") if args.ids else [str(i) for i in range(n)]
    if len(ids) != n:
        raise UserError(f"--ids {args.ids}: {len(ids)} ids for the {n} vectors of {args.vectors}; give one id a line")
    payloads = read_payloads(args.payload) if args.payload else None
    if payloads is not None and len(payloads) != n:
        raise UserError(f"--payload {args.payload}: {len(payloads)} payload lines for the {n} vectors of "
                        f"{args.vectors}; give one JSON object a line")
    if payloads is not None:
        check_payload_file(payloads, args.payload)
    # no bar where stderr is not a terminal (a log, a pipe): it would be a line per update among the errors
    bar = tqdm(total=n, unit="vec", desc=f"upsert {args.name}", disable=True if args.quiet else None)

    def batches():
        for i in range(0, n, args.batch):
            j = min(n, i + args.batch)
            x = np.ascontiguousarray(xb[i:j])
            x = x if x.dtype == np.uint8 else x.astype(np.float32)
            yield ids[i:j], x, (payloads[i:j] if payloads else None)
            bar.update(j - i)

    try:
        with open_client(args) as c:
            count = c.upsert_stream(args.name, batches())
    except KeyboardInterrupt:
        bar.close()  # before the sentence
        print(f"\nstopped: up to {bar.n} of {n} vectors were sent; run the same command again to load them all "
              "(an upsert replaces the item of the same id)", file=sys.stderr)
        return 130
    finally:
        bar.close()  # before any error is printed
    print(f"upserted {count} vectors into {args.name}")
    return 0


def cmd_delete(args) -> int:
    ids = list(args.ids or [])
    if args.ids_file:
        ids += read_lines(args.ids_file, "--ids-file")
    if not ids:
        raise UserError(f"give the ids to delete: `lookalike delete {args.name} ID [ID ...]` or --ids-file FILE "
                        "(one id a line)")
    with open_client(args) as c:
        removed, missing = c.delete(args.name, ids)
    print(f"deleted {removed}, {missing} not found")
    return 0


def _read_images(paths: list[str]) -> list[bytes]:
    out = []
    for path in paths:
        try:
            out.append(pathlib.Path(path).read_bytes())
        except OSError as err:
            raise UserError(os_error(err, "--image")) from None
    return out


def _search_images(c, args, images: list[bytes], include_payloads: bool, filt=None):
    """search_by_image; the server's "query image N: ..." becomes "--image FILE: ..." (the file the user named)."""
    try:
        return c.search_by_image(args.name, images, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                                 include_payloads=include_payloads, min_coverage=args.min_coverage, filter=filt)
    except grpc.RpcError as err:
        m = re.match(r"query image (\d+): (.*)", err.details() or "", re.S)
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and m and int(m[1]) < len(args.image):
            raise UserError(f"--image {args.image[int(m[1])]}: {one_line(m[2])}") from None
        raise


def cmd_search(args) -> int:
    if (args.queries is None) == (not args.image):
        raise UserError("give either QUERIES.npy (one query vector a row) or --image FILE (repeatable), not "
                        f"{'both' if args.image else 'neither'}")
    include_payloads = args.payloads or bool(args.sheet)  # the sheet finds neighbour images by payload uri
    images = _read_images(args.image) if args.image else None
    xq = None
    if images is None:
        xq = load_npy(args.queries, "queries file")
        if xq.ndim not in (1, 2):
            raise UserError(f"{args.queries} holds an array of shape {xq.shape}; expected (nq, d) or (d,)")
        xq = xq[None, :] if xq.ndim == 1 else xq
        xq = xq if xq.dtype == np.uint8 else xq.astype(np.float32)
    encoder_spec = ""  # the collection's encoder: its rule of what counts as a match, drawn on the sheet
    with open_client(args) as c:
        filt = cli_filter(c, args.name, args.filter)
        if images is not None:
            res = _search_images(c, args, images, include_payloads, filt)
            if args.sheet:
                encoder_spec = c.describe_collection(args.name).spec.encoder
        else:
            res = c.search(args.name, xq, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                           include_payloads=include_payloads, min_coverage=args.min_coverage, filter=filt)
    if args.sheet:
        rows = [[(uid, float(res.D[q, j]), read_uri(res.payloads[q][j].get("uri"))) for j, uid in enumerate(ids)]
                for q, ids in enumerate(res.ids)]
        sheet = contact_sheet(images or [None] * len(rows), rows, labels=args.image or None,
                              match=default_match(encoder_spec))
        try:
            pathlib.Path(args.sheet).write_bytes(sheet)
        except OSError as err:
            raise UserError(os_error(err, "--sheet")) from None
        print(f"contact sheet: {args.sheet}", file=sys.stderr)
    if args.json:
        out = [{"ids": ids, "distances": [float(d) for d in res.D[q, :len(ids)]],
                **({"payloads": res.payloads[q]} if args.payloads else {})} for q, ids in enumerate(res.ids)]
        print(json.dumps({"coverage": res.coverage, "results": out, **({"plans": res.plans} if res.plans else {})},
                         default=str))
        return 0
    if args.explain:
        for plan in res.plans:
            print(f"plan {plan}", file=sys.stderr)
    for q, ids in enumerate(res.ids):
        print(f"query {q}" + (f": {args.image[q]}" if args.image else ""))
        for rank, uid in enumerate(ids):
            extra = f"\t{json.dumps(res.payloads[q][rank], default=str)}" if args.payloads else ""
            print(f"  {rank + 1:>3}  {uid:<24} {res.D[q, rank]:.6g}{extra}")
    if res.coverage < 1:
        print(f"coverage {res.coverage:.3f}: some shards did not answer", file=sys.stderr)
    return 0


def cmd_get(args) -> int:
    with open_client(args) as c:
        ids, vectors, payloads = c.get(args.name, args.ids, include_vectors=args.vectors)
    for i, uid in enumerate(ids):
        row = {"id": uid, "payload": payloads[i]}
        if vectors is not None:
            row["vector"] = vectors[i].tolist()
        print(json.dumps(row, default=str))  # timestamps as "2026-01-01 00:00:00+00:00"
    return 0


def cmd_ingest(args) -> int:
    """Exits 1 when any image was not stored (the last line says how many), 0 when all were."""
    if not os.path.isdir(args.dir):
        raise UserError(f"folder {args.dir}: {'not a folder' if os.path.exists(args.dir) else 'no such folder'}")
    with open_client(args) as c:
        report = ingest(c, args.name, args.dir, batch=args.batch, uri_prefix=args.uri_prefix,
                        progress=not args.quiet)
    print(report.summary())
    if args.report:
        try:
            pathlib.Path(args.report).write_text(json.dumps(dataclasses.asdict(report), indent=1))
        except OSError as err:
            raise UserError(os_error(err, "--report")) from None
    if report.failed:
        where = f"; {args.report} lists them all" if args.report else " (--report FILE.json lists them all)"
        print(f"error: {len(report.failed)} of {report.files - report.not_images} image file(s) failed{where}",
              file=sys.stderr)
        return 1
    return 0


def add_items(sub) -> None:
    """The `upsert`, `delete`, `get`, `search` and `ingest` subcommands."""
    u = with_target(sub.add_parser("upsert", help="bulk-load vectors from a .npy file"))
    u.add_argument("name", help="the collection")
    u.add_argument("vectors", help=".npy of shape (n, d) float32 (or uint8 codes for hamming)")
    u.add_argument("--ids", metavar="FILE", help="text file, one id per line (default: row numbers 0, 1, ...)")
    u.add_argument("--payload", metavar="FILE.jsonl",
                   help="JSON lines, one object of fields per vector: strings, numbers, true/false, lists of strings "
                        "or integers; ISO-8601 strings for timestamp fields (default: no payloads)")
    u.add_argument("--batch", type=positive_int, default=5000, help="vectors per message of the stream (default %(default)s)")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_upsert)

    d = with_target(sub.add_parser("delete", help="delete items by id"))
    d.add_argument("name", help="the collection")
    d.add_argument("ids", nargs="*", help="ids to delete")
    d.add_argument("--ids-file", metavar="FILE", help="text file of more ids to delete, one per line")
    d.set_defaults(func=cmd_delete)

    g = with_target(sub.add_parser("get", help="fetch items by id (JSON lines)"))
    g.add_argument("name", help="the collection")
    g.add_argument("ids", nargs="+", help="ids to fetch")
    g.add_argument("--vectors", action="store_true", help="include vectors")
    g.set_defaults(func=cmd_get)

    q = with_target(sub.add_parser("search", help="k-NN search for the queries in a .npy file, or query images"))
    q.add_argument("name", help="the collection")
    q.add_argument("queries", nargs="?", help=".npy of shape (nq, d) or (d,) (or --image)")
    q.add_argument("--image", action="append", metavar="FILE",
                   help="query image (repeatable); the collection's encoder turns it into a vector")
    q.add_argument("--sheet", metavar="OUT.png", help="write a contact sheet of the queries and their neighbours")
    q.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default %(default)s)")
    search_param_flags(q)
    q.add_argument("--min-coverage", type=number(float, low=0, high=1), default=None,
                   help="fraction of buckets that must answer, 0 to 1, else the search fails with UNAVAILABLE "
                        "(default: all, 1)")
    filter_flag(q)
    q.add_argument("--explain", action="store_true",
                   help="with --filter: print the plan each shard used to stderr (default: off)")
    q.add_argument("--payloads", action="store_true", help="show each neighbour's payload")
    q.add_argument("--json", action="store_true", help="print JSON (coverage, ids, distances) instead of a table")
    q.set_defaults(func=cmd_search)

    i = with_target(sub.add_parser("ingest", help="encode and store every image under a folder (resumable)"))
    i.add_argument("name", help="a collection with an encoder")
    i.add_argument("dir", help="folder of images (walked recursively; ids are paths relative to it)")
    i.add_argument("--batch", type=positive_int, default=64, help="images per request (default %(default)s)")
    i.add_argument("--uri-prefix", help="payload uri = PREFIX + relative path (default: the file's absolute path)")
    i.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_ingest)
