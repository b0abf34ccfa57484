"""Catalog jobs, run by the cluster: `lookalike dedup` (near-duplicate groups, a CSV, JSON lines and a contact sheet),
`cluster` (k-means into a payload field), `job` (list, status, cancel) and `map` (a 2-D picture of a sample).

May use: protos, jobs (the space k-means and maps work in), tools.catalog_report, tools.sheet, tools.cli.common,
tools.cli.filtering and tools.cli.flags.
"""

from __future__ import annotations

import json
import sys

from tqdm import tqdm

from jobs import cluster_space
from protos import lookalike_pb2
from tools.catalog_report import draw_map, groups_sheet, project, write_groups
from tools.cli.common import UserError, metric_name, open_client
from tools.cli.filtering import cli_filter, filter_flag
from tools.cli.flags import non_negative_int, number, positive_int, search_param_flags, with_target
from tools.sheet import read_uri


def _follow_job(c, job, quiet: bool = False):
    """A progress bar over a job until it ends. Ctrl-C leaves the job running in the cluster."""
    desc = f"{job.kind} {job.collection}"
    with tqdm(total=job.total or None, unit="item", desc=desc, disable=True if quiet else None) as bar:
        def show(j):
            bar.total = j.total or bar.total
            bar.n = j.done
            note = json.loads(j.summary_json or "{}")
            bar.set_postfix_str(j.message or ", ".join(f"{k} {v}" for k, v in note.items() if k != "sizes"),
                                refresh=False)
            bar.refresh()

        try:
            job = c.wait_job(job.id, on_progress=show)
        except KeyboardInterrupt:
            bar.close()
            print(f"\nleft job {job.id} running in the cluster: run the same command again to follow it, "
                  f"`lookalike job cancel {job.id}` to stop it", file=sys.stderr)
            raise SystemExit(130) from None
    if job.state != lookalike_pb2.Job.SUCCEEDED:
        state = lookalike_pb2.Job.State.Name(job.state)
        print(f"error: job {job.id} {state.lower()}: {job.message}", file=sys.stderr)
    return job


def _started(c, args, job):
    """Says which job started; with --no-wait returns None, else follows it to its end and returns it."""
    print(f"job {job.id}", file=sys.stderr)
    return None if args.no_wait else _follow_job(c, job, args.quiet)


def cmd_dedup(args) -> int:
    with open_client(args) as c:
        job = _started(c, args, c.start_dedup(args.name, args.threshold, k=args.k, nprobe=args.nprobe,
                                              ef_search=args.ef_search, batch=args.batch, job_id=args.job or "",
                                              filter=cli_filter(c, args.name, args.filter)))
        if job is None or job.state != lookalike_pb2.Job.SUCCEEDED:
            return 0 if job is None else 1
        groups = list(c.dedup_groups(job.id))
        out = args.out or f"dedup-{args.name}"
        csv_path, jsonl_path = write_groups(groups, out)
        summary = json.loads(job.summary_json)
        print(f"{summary['groups']} group(s) of near-duplicates, {summary['grouped_items']} items, from "
              f"{summary['pairs']} pair(s) within {args.threshold:g}; {job.total} items in {job.elapsed_s:.1f}s "
              f"({job.total / max(job.elapsed_s, 1e-9):,.0f} items/s)")
        print(f"groups: {csv_path}, {jsonl_path}")
        if groups and args.sheet != "none":
            sheet = args.sheet or f"{out}.png"

            def payloads_of(ids):
                found, _, payloads = c.get(args.name, ids, include_vectors=False)
                by_id = dict(zip(found, payloads))
                return [by_id.get(i, {}) for i in ids]

            with open(sheet, "wb") as f:
                f.write(groups_sheet([(g.ids, g.distances) for g in groups], payloads_of, args.sheet_groups))
            print(f"contact sheet of the {min(len(groups), args.sheet_groups)} largest groups: {sheet}")
        for g in groups[:args.show]:
            print(f"  group {g.group} ({len(g.ids)}): {' '.join(g.ids[:10])}{' ...' if len(g.ids) > 10 else ''}")
    return 0


def cmd_cluster(args) -> int:
    with open_client(args) as c:
        job = _started(c, args, c.start_cluster(args.name, args.k, sample=args.sample, field=args.field,
                                                niter=args.niter, seed=args.seed, job_id=args.job or ""))
        if job is None or job.state != lookalike_pb2.Job.SUCCEEDED:
            return 0 if job is None else 1
    summary = json.loads(job.summary_json)
    sizes = summary["sizes"]
    if args.json:
        print(json.dumps({"job": job.id, "field": summary["field"], "sizes": sizes}))
        return 0
    print(f"{len(sizes)} clusters of {sum(sizes)} items in payload field {summary['field']!r} ({job.elapsed_s:.1f}s)")
    print(f"{'cluster':>8} {'items':>10} {'share':>7}")
    for n, size in sorted(enumerate(sizes), key=lambda t: -t[1]):
        print(f"{n:>8} {size:>10} {size / max(sum(sizes), 1):>7.1%}")
    return 0


def cmd_job(args) -> int:
    if args.action != "list" and not args.id:
        raise UserError(f"job {args.action} needs the job's ID: `lookalike job {args.action} ID` (`lookalike job list` "
                        "shows them)")
    if args.action == "list" and args.id:
        raise UserError(f"job list takes no ID (`lookalike job status {args.id}` shows one job)")
    with open_client(args) as c:
        if args.action == "list":
            jobs = c.list_jobs()
        elif args.action == "cancel":
            jobs = [c.cancel_job(args.id)]
        else:
            jobs = [c.get_job(args.id)]
    if args.action == "list" and not jobs:
        print("no jobs (`lookalike dedup` and `lookalike cluster` start them)")
        return 0
    print(f"{'job':<40} {'kind':<8} {'collection':<16} {'state':<10} {'done/total':>21} {'elapsed':>9} message")
    for j in jobs:
        print(f"{j.id:<40} {j.kind:<8} {j.collection:<16} {lookalike_pb2.Job.State.Name(j.state):<10} "
              f"{j.done:>10}/{j.total:<10} {j.elapsed_s:>8.1f}s {j.message or j.summary_json}")
    return 0


def cmd_map(args) -> int:
    need_plot_extra("map")
    with open_client(args) as c:
        coll = c.describe_collection(args.name).spec
        ids, x, payloads = c.sample(args.name, args.sample, seed=args.seed)
    if not ids:
        raise UserError(f"collection {args.name} is empty: nothing to map", 1)
    metric = metric_name(coll.metric)
    coords, method = project(cluster_space(x, metric), args.method, seed=args.seed)
    labels = [p.get(args.field) for p in payloads]
    thumbs = [read_uri(p.get("uri")) for p in payloads] if args.thumbnails else None
    draw_map(coords, labels, args.out, args.width, args.height, thumbs=thumbs,
             title=f"{args.name}: {len(ids)} items, {method.upper()}"
                   + (f", coloured by {args.field}" if any(v is not None for v in labels) else ""))
    print(f"map of {len(ids)} items ({method}): {args.out}")
    return 0


def need_plot_extra(command: str) -> None:
    """Checks, before any work, that the plot extra (matplotlib, scikit-learn) is installed."""
    for module in ("matplotlib", "sklearn"):
        try:
            __import__(module)  # here, not at the top: only the commands that draw need it
        except ImportError:
            raise UserError(f"`lookalike {command}` needs matplotlib and scikit-learn, and {module} is not installed: "
                            "pip install 'lookalike[plot]' (from a checkout: pip install -e '.[plot]')") from None


def add_catalog(sub) -> None:
    """The `dedup`, `cluster`, `job` and `map` subcommands."""
    dd = with_target(sub.add_parser("dedup", help="near-duplicate groups over a whole collection (a cluster job)"))
    dd.add_argument("name", help="the collection")
    dd.add_argument("--threshold", type=number(float), required=True,
                    help="l2: squared distance at most T; hamming: bits at most T; ip/cosine: similarity at least T")
    dd.add_argument("-k", "--k", type=positive_int, default=10, help="neighbours looked at per item (default %(default)s)")
    search_param_flags(dd)
    dd.add_argument("--batch", type=non_negative_int, default=0, help="items per search batch (default 0: 4096)")
    filter_flag(dd)  # dedup within a category: --filter category=shoes
    dd.add_argument("--out", help="write OUT.csv, OUT.jsonl and OUT.png (default dedup-NAME)")
    dd.add_argument("--sheet", help="contact sheet PNG path (default OUT.png; 'none': no sheet)")
    dd.add_argument("--sheet-groups", type=positive_int, default=12, help="largest groups on the sheet (default %(default)s)")
    dd.add_argument("--show", type=non_negative_int, default=10, help="groups to print (default %(default)s)")
    dd.add_argument("--job", help="job id (default: derived from the arguments, so the same command resumes)")
    dd.add_argument("--no-wait", action="store_true", help="start the job and return")
    dd.add_argument("--quiet", action="store_true", help="no progress bar")
    dd.set_defaults(func=cmd_dedup)

    cl = with_target(sub.add_parser("cluster", help="k-means over a collection; each item's cluster in its payload"))
    cl.add_argument("name", help="the collection")
    cl.add_argument("-k", "--k", type=positive_int, required=True, help="number of clusters (required)")
    cl.add_argument("--sample", type=non_negative_int, default=0, help="training sample (default 0: min(count, 256 k))")
    cl.add_argument("--field", default="", help="payload field (default: cluster)")
    cl.add_argument("--niter", type=non_negative_int, default=0, help="k-means iterations (default 0: 20)")
    cl.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    cl.add_argument("--job", help="job id (default: derived from the arguments)")
    cl.add_argument("--no-wait", action="store_true", help="start the job and return")
    cl.add_argument("--json", action="store_true", help="print the cluster sizes as JSON")
    cl.add_argument("--quiet", action="store_true", help="no progress bar")
    cl.set_defaults(func=cmd_cluster)

    jb = with_target(sub.add_parser("job", help="catalog jobs: list, status ID, cancel ID"))
    jb.add_argument("action", choices=["list", "status", "cancel"], help="list every job, or show or cancel one")
    jb.add_argument("id", nargs="?", default="", help="the job's id (status, cancel)")
    jb.set_defaults(func=cmd_job)

    mp = with_target(sub.add_parser("map", help="a 2-D map of a sample of the collection as a PNG (needs the plot "
                                                "extra)"))
    mp.add_argument("name", help="the collection")
    mp.add_argument("--out", required=True, help="PNG to write")
    mp.add_argument("--sample", type=number(int, low=1, high=10000), default=2000,
                    help="items to draw (default %(default)s, at most 10000)")
    mp.add_argument("--method", choices=["auto", "tsne", "pca"], default="auto",
                    help="auto: t-SNE up to 3000 items, PCA above (default %(default)s)")
    mp.add_argument("--field", default="cluster", help="payload field to colour by (default %(default)s)")
    mp.add_argument("--thumbnails", action="store_true", help="draw images (payload uri) at their points")
    mp.add_argument("--width", type=positive_int, default=1200, help="pixels (default %(default)s)")
    mp.add_argument("--height", type=positive_int, default=900, help="pixels (default %(default)s)")
    mp.add_argument("--seed", type=int, default=0, help="random seed of the sample and the projection "
                    "(default %(default)s)")
    mp.set_defaults(func=cmd_map)
