"""Load and benchmarks: `lookalike loadtest` (a running cluster under an open or closed loop of searches and
writes: rate, latency, errors, recall) and `lookalike bench` (bench.cluster_bench, with its own flags).

May use: bench (the load tester and the cluster benchmark), tools.cli.common, tools.cli.filtering and tools.cli.flags.
"""

from __future__ import annotations

import sys

import numpy as np

from bench import loadtest
from bench.cluster_bench import main as cluster_bench_main
from tools.cli.common import UserError, connection, load_npy, metric_name, open_client, os_error, read_lines
from tools.cli.filtering import cli_filter, filter_flag
from tools.cli.flags import Parser, non_negative_int, number, positive_float, positive_int, search_param_flags, with_target


def cmd_loadtest(args) -> int:
    conn = connection(args)
    try:
        mix = loadtest.parse_mix(args.mix)
        mode = args.mode or ("open" if args.rate else "closed")
        cfg = loadtest.LoadConfig(
            target=args.target, collection=args.name, mode=mode, rate=args.rate or 0.0,
            concurrency=args.concurrency, duration=args.duration, requests=args.requests, mix=mix, k=args.k,
            batch=args.batch, nprobe=args.nprobe, ef_search=args.ef_search, processes=args.processes,
            timeout=args.timeout, arrivals=args.arrivals, recall_sample=args.recall_sample,
            keep_writes=args.keep_writes, seed=args.seed, **conn)
        cfg.check()
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.ids and not args.data:
        raise UserError("--ids names the ids of the vectors of --data: give --data FILE.npy too")
    queries = load_npy(args.queries, "--queries") if args.queries else None
    data = load_npy(args.data, "--data", mmap=True) if args.data else None
    data_ids = read_lines(args.ids, "--ids") if args.ids else None
    if data_ids is not None and len(data_ids) != len(data):
        raise UserError(f"--ids {args.ids}: {len(data_ids)} ids for the {len(data)} vectors of --data {args.data}; "
                        "give the ids file the vectors were loaded with (one id a line)")
    with open_client(args, conn) as client:
        spec = client.describe_collection(args.name).spec
        filt = cli_filter(client, args.name, args.filter)
        cfg.filter = filt.SerializeToString(deterministic=True) if filt is not None else b""
        metric = metric_name(spec.metric) if spec.metric else "l2"  # METRIC_UNSPECIFIED: the default, l2
        for what, x in (("queries", queries), ("data", data)):
            if x is not None and (x.ndim != 2 or x.shape[1] != (spec.dim // 8 if metric == "hamming" else spec.dim)):
                raise UserError(f"--{what} has shape {x.shape}; collection {args.name!r} holds "
                                + (f"codes of {spec.dim} bits" if metric == "hamming" else f"{spec.dim}-d vectors"))
        recall_off = None
        if data is not None and cfg.recall_sample > 0 and cfg.mix.get("search", 0) > 0:
            recall_off = loadtest.recall_ids_problem(client, args.name, len(data), data_ids, args.ids, args.seed)
    if args.filter is not None:  # exact search over --data knows nothing of the items' payloads
        recall_off = "not measured under --filter (the vectors of --data carry no payloads to filter)"
    elif recall_off:
        print(f"warning: {recall_off}", file=sys.stderr)
    if data is not None:
        data = np.ascontiguousarray(data)
    try:
        queries, mean, std = loadtest.prepare(
            cfg, queries, data, n_queries=args.query_count, noise=args.noise,
            fetch=lambda n: loadtest.fetch_stored(args.target, args.name, n, args.seed, conn))
    except ValueError as err:
        raise UserError(str(err)) from None
    try:
        before = loadtest.read_metrics(args.metrics_url, conn["tls"]) if args.metrics_url else None
    except ValueError as err:
        raise UserError(str(err)) from None
    report, rec = loadtest.run(cfg, queries, mean, std, data, data_ids, metric, show_progress=not args.quiet,
                               recall_off=recall_off)
    if before is not None:
        try:
            report["server_latency_ms"] = loadtest.server_latency(before, loadtest.read_metrics(args.metrics_url,
                                                                                                conn["tls"]))
        except ValueError as err:  # the run is done: report it without the server's side
            print(f"warning: {err}", file=sys.stderr)
    print(loadtest.format_report(report))
    if args.out:
        try:
            loadtest.save(report, args.out)
        except OSError as err:
            raise UserError(os_error(err, "--out")) from None
        print(f"report: {args.out}")
    if args.plot:
        try:
            loadtest.plot(report, rec, args.plot)
            print(f"plot: {args.plot}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'lookalike[plot]')", file=sys.stderr)
    return 0


def add_loadtest(sub) -> None:
    """The `loadtest` subcommand."""
    lt = with_target(sub.add_parser("loadtest", help="load a running cluster; report rate, latency, errors, recall"))
    lt.add_argument("name", help="the collection")
    lt.add_argument("--mode", choices=["open", "closed"], default=None,
                    help="open: send at --rate whatever the server does; closed: --concurrency requests in flight "
                         "(default: open when --rate is given)")
    lt.add_argument("--rate", type=number(float, low=0), default=0.0,
                    help="open loop: requests per second, all processes together (default 0: closed loop)")
    lt.add_argument("--arrivals", choices=["uniform", "poisson"], default="uniform",
                    help="open loop: evenly spaced or Poisson send times (default %(default)s)")
    lt.add_argument("--concurrency", type=positive_int, default=8, help="closed loop: requests in flight (default "
                    "%(default)s)")
    lt.add_argument("--duration", type=number(float, low=0), default=10.0,
                    help="seconds of load (default %(default)s; 0: until --requests)")
    lt.add_argument("--requests", type=non_negative_int, default=0, help="stop after this many requests (default 0: no "
                    "count)")
    lt.add_argument("--mix", default="search=1",
                    help="shares of search, upsert, delete (default %(default)s), e.g. search=0.9,upsert=0.08,"
                         "delete=0.02")
    lt.add_argument("-k", type=positive_int, default=10, help="neighbours per search (default %(default)s)")
    lt.add_argument("--batch", type=positive_int, default=1, help="queries (or items) per request (default %(default)s)")
    search_param_flags(lt)
    filter_flag(lt)  # recall is then not measured (--data holds no payloads)
    lt.add_argument("--processes", type=positive_int, default=2, help="client processes (default %(default)s)")
    lt.add_argument("--timeout", type=positive_float, default=10.0,
                    help="deadline of each request in seconds (default %(default)s)")
    lt.add_argument("--queries", metavar="FILE.npy", help=".npy of query vectors (default: rows of --data plus "
                    "noise, or stored vectors)")
    lt.add_argument("--data", metavar="FILE.npy",
                    help=".npy of the vectors loaded: queries are its rows plus noise, and recall@k is measured "
                         "against exact search over it (default: no recall)")
    lt.add_argument("--ids", metavar="FILE", help="with --data: the ids its rows were loaded with, one per line, as "
                    "given to `lookalike upsert --ids` (default: row numbers)")
    lt.add_argument("--noise", type=number(float, low=0), default=0.05,
                    help="query noise, times the data's deviation (hamming: bit-flip probability; default "
                         "%(default)s)")
    lt.add_argument("--query-count", type=positive_int, default=10000, help="distinct queries to draw (default "
                    "%(default)s)")
    lt.add_argument("--recall-sample", type=non_negative_int, default=100,
                    help="queries checked against exact search (default %(default)s; 0: none)")
    lt.add_argument("--metrics-url", default=None, metavar="URL",
                    help="the router's Prometheus metrics (e.g. http://127.0.0.1:9090/metrics, serve --metrics-port): "
                         "its latency histograms are read before and after the run, and the report shows server-side "
                         "latency beside the client's (https: the --tls-* files)")
    lt.add_argument("--keep-writes", action="store_true", help="keep the items the test wrote (default: deleted)")
    lt.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    lt.add_argument("--out", default="loadtest.json", help="JSON report (default %(default)s; '' for none)")
    lt.add_argument("--plot", default="loadtest.png", help="PNG of latency over time and its distribution "
                                                         "(default %(default)s; '' for none)")
    lt.add_argument("--quiet", action="store_true", help="no progress bar")
    lt.set_defaults(func=cmd_loadtest)


def add_bench(sub) -> None:
    """The `bench` subcommand: listed in the help; main() hands its flags to the benchmark."""
    sub.add_parser("bench", add_help=False,
                   help="cluster vs in-process FAISS benchmark; `lookalike bench --help` (docs/BENCHMARKS.md)")


def bench_main(argv: list[str]) -> int:
    return int(cluster_bench_main(argv, prog="lookalike bench", parser_class=Parser) or 0)
