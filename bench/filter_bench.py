"""Filtered search through the cluster: QPS and recall at selectivities of 50%, 10%, 1% and 0.1%, against
unfiltered search and against filtering the unfiltered top k afterwards.

    python -m bench.filter_bench [--n 1000000] [--dim 128] [--shards 4] [--index 'IVF1024,Flat'] [--index HNSW32]
                                 [--queries 200] [--seconds 10] [--out bench/out/filter.json]

What it does, in one process:

1. generates ``n`` clustered float32 vectors and ``queries`` queries (bench.timing.make_data), and for each item a
   payload with a ``category`` (one of 1,000, uniform, independent of the vector) and a ``price`` (uniform in
   [0, 1000));
2. starts an embedded local Ray with a real cluster (controller and ``shards`` shard actors serving gRPC) and the
   router's gRPC server in this process (bench.common), and for each ``--index`` creates a collection with
   ``--filterable category:string,price:float`` and loads the items with their payloads;
3. for each filter: ``price<500`` (50%), ``price<100`` (10%), ``category in (c0..c9)`` (1%), ``category=c0``
   (0.1%), and for unfiltered search as the baseline: QPS and latency of sequential requests of ``--batch`` queries
   (bench.timing.measure), recall@k against the exact top k over the matching items (FAISS flat, in this
   process), and the plans the shards chose;
4. post-filtering for comparison: the unfiltered top k (and top 10k) filtered afterwards: how many queries come
   back short (fewer than k matching results), and recall@k against the same exact filtered answers.

A Markdown table goes to stdout, every number to ``--out`` (JSON). Memory: the vectors, their payloads and the exact
ground truth's copies; at the default 1M x 128 about 2 GiB in this process plus the shards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from bench.common import init_ray, start_local, teardown
from bench.timing import ids_to_array, make_data, measure, recall_at_k, write_results

CATEGORIES = 1000
# (label, filter text, the items it matches as a numpy predicate over (category number, price))
FILTERS = [
    ("50%", "price<500", lambda cat, price: price < 500),
    ("10%", "price<100", lambda cat, price: price < 100),
    ("1%", "category in (" + ", ".join(f"c{i}" for i in range(10)) + ")", lambda cat, price: cat < 10),
    ("0.1%", "category=c0", lambda cat, price: cat == 0),
]


def payloads_of(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(category numbers, prices) of n items, seeded."""
    rng = np.random.default_rng(seed + 1)
    return rng.integers(0, CATEGORIES, n), np.round(rng.uniform(0, 1000, n), 2)


def exact_filtered(xb: np.ndarray, xq: np.ndarray, k: int, mask: np.ndarray) -> np.ndarray:
    """Ids (row numbers) of the exact top k among the rows of ``mask`` (l2), shape (nq, k), -1 past the matches."""
    import faiss

    rows = np.flatnonzero(mask)
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb[rows])
    _, I = index.search(xq, min(k, len(rows)))
    out = np.full((len(xq), k), -1, dtype=np.int64)
    out[:, :I.shape[1]] = np.where(I >= 0, rows[np.maximum(I, 0)], -1)
    return out


def search_all(client, name: str, xq: np.ndarray, k: int, filt=None, batch: int = 50):
    """(ids as an (nq, k) int64 array, the plans of the first request) for every query through the router."""
    Is, plans = [], []
    for s in range(0, len(xq), batch):
        res = client.search(name, xq[s:s + batch], k=k, filter=filt)
        Is.append(ids_to_array(res.ids, k))
        plans = plans or res.plans
    return np.concatenate(Is), plans


def post_filter(I: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """The first k ids of each row of an unfiltered answer that satisfy ``mask``: (ids (nq, k), rows short of k)."""
    out = np.full((len(I), k), -1, dtype=np.int64)
    short = 0
    for q, row in enumerate(I):
        keep = row[(row >= 0) & mask[np.maximum(row, 0)]][:k]
        out[q, :len(keep)] = keep
        short += len(keep) < k
    return out, short


def wait_trained(client, name: str, timeout: float) -> str:
    """Waits until the collection's index is trained (or needs no training) on every shard; its state, as a word."""
    deadline = time.monotonic() + timeout
    while True:
        t = client.describe_collection(name).training
        if t.state == t.NOT_NEEDED or (t.state == t.TRAINED and t.shards_ready == t.shards):
            return t.State.Name(t.state).lower()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: not trained after {timeout:.0f}s: {t.message}")
        time.sleep(1.0)


def run(args) -> dict:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    out: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    xb, xq = make_data(args.n, args.dim, args.queries, args.seed)
    cat, price = payloads_of(args.n, args.seed)
    masks = {label: pred(cat, price) for label, _, pred in FILTERS}
    truth = {label: exact_filtered(xb, xq, args.k, m) for label, m in masks.items()}
    truth["none"] = exact_filtered(xb, xq, args.k, np.ones(args.n, dtype=bool))
    log(f"generated {args.n} x {args.dim} vectors with payloads and the exact answers of {args.queries} queries")
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="lookalike-filter-bench-")
    init_ray(os.cpu_count() or 2)
    handle = router = server = client = None
    try:
        handle, router, server, _port, client = start_local(data_dir, args.shards, args.shard_cpus, "filter-bench")
        for spec in args.index:
            name = "f" + "".join(ch for ch in spec.lower() if ch.isalnum())
            client.create_collection(name, dim=args.dim, index=spec, nprobe=args.nprobe, ef_search=args.ef_search,
                                     filterable="category:string,price:float")
            t = time.perf_counter()

            def batches():
                for s in range(0, args.n, args.load_batch):
                    e = min(args.n, s + args.load_batch)
                    yield ([str(i) for i in range(s, e)], xb[s:e],
                           [{"category": f"c{c}", "price": float(p)} for c, p in zip(cat[s:e], price[s:e])])
            client.upsert_stream(name, batches(), timeout=None)
            training = wait_trained(client, name, 1800)
            log(f"{spec}: loaded {args.n} items with payloads in {time.perf_counter() - t:.1f}s ({training})")
            unfiltered, _ = search_all(client, name, xq, args.k)
            wide, _ = search_all(client, name, xq, min(1024, 10 * args.k), batch=10)
            base = measure(lambda q: client.search(name, q, k=args.k), xq, args.batch, args.seconds, args.max_requests)
            row = {"index": spec, "selectivity": "none", "filter": "", "qps": base["qps"], "p50_ms": base["p50_ms"],
                   "p99_ms": base["p99_ms"], "recall": recall_at_k(unfiltered, truth["none"]), "plans": []}
            out["results"].append(row)
            for label, text, _ in FILTERS:
                got, plans = search_all(client, name, xq, args.k, text)
                m = measure(lambda q: client.search(name, q, k=args.k, filter=text), xq, args.batch, args.seconds,
                            args.max_requests)
                post, short = post_filter(unfiltered, masks[label], args.k)
                post_wide, short_wide = post_filter(wide, masks[label], args.k)
                row = {"index": spec, "selectivity": label, "filter": text, "matches": int(masks[label].sum()),
                       "qps": m["qps"], "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"],
                       "recall": recall_at_k(got, truth[label]), "qps_vs_unfiltered": m["qps"] / base["qps"],
                       "post_filter_recall": recall_at_k(post, truth[label]),
                       "post_filter_short": short / len(xq),
                       "post_filter_10x_recall": recall_at_k(post_wide, truth[label]),
                       "post_filter_10x_short": short_wide / len(xq), "plans": plans}
                out["results"].append(row)
                log(f"{spec} {label}: {m['qps']:.0f} QPS, recall {row['recall']:.3f}; post-filtering top {args.k} "
                    f"short on {100 * row['post_filter_short']:.0f}% of queries; plans {plans[:2]}")
            client.drop_collection(name)
    finally:
        teardown(client, server, router, handle)
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    return out


def report(out: dict) -> str:
    cfg = out["config"]
    k = cfg["k"]
    lines = [f"Filtered search, {cfg['n']:,} x {cfg['dim']}, {cfg['shards']} shards, k={k}, batch {cfg['batch']} "
             f"(`{cfg.get('command', '')}`)", "",
             f"| index | selectivity | filter | QPS | vs unfiltered | p50 ms | p99 ms | recall@{k} | "
             f"post-filter top {k}: recall / short | post-filter top {10 * k}: recall / short | plan (a shard) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        if r["selectivity"] == "none":
            lines.append(f"| {r['index']} | unfiltered | | {r['qps']:.0f} | 1.00 | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['recall']:.3f} | | | |")
            continue
        lines.append(f"| {r['index']} | {r['selectivity']} | `{r['filter'][:40]}` | {r['qps']:.0f} | "
                     f"{r['qps_vs_unfiltered']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall']:.3f} | "
                     f"{r['post_filter_recall']:.3f} / {100 * r['post_filter_short']:.0f}% | "
                     f"{r['post_filter_10x_recall']:.3f} / {100 * r['post_filter_10x_short']:.0f}% | "
                     f"{(r['plans'] or [''])[0]} |")
    return "\n".join(lines)


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser(prog: str = "python -m bench.filter_bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Filtered search through the cluster at four selectivities.")
    p.add_argument("--n", type=_count, default=1_000_000, help="items (default %(default)s)")
    p.add_argument("--dim", type=_count, default=128, help="components per vector (default %(default)s)")
    p.add_argument("--shards", type=_count, default=4, help="shards of the cluster (default %(default)s)")
    p.add_argument("--index", action="append", default=None,
                   help="index spec, repeatable (default: 'IVF1024,Flat' and HNSW32)")
    p.add_argument("--nprobe", type=_count, default=16, help="IVF lists probed unfiltered (default %(default)s)")
    p.add_argument("--ef-search", type=_count, default=64, help="HNSW breadth unfiltered (default %(default)s)")
    p.add_argument("--queries", type=_count, default=200, help="distinct queries (default %(default)s)")
    p.add_argument("--k", type=_count, default=10, help="neighbours per query (default %(default)s)")
    p.add_argument("--batch", type=_count, default=1, help="queries per timed request (default %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of timed requests per row (default %(default)s)")
    p.add_argument("--max-requests", type=_count, default=5000, help="timed requests per row at most (default %(default)s)")
    p.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor (default %(default)s)")
    p.add_argument("--load-batch", type=_count, default=10_000, help="items per upsert message (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="cluster storage (default: a temporary directory, removed)")
    p.add_argument("--out", default="bench/out/filter.json", help="JSON results (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.index = args.index or ["IVF1024,Flat", "HNSW32"]
    args.command = "python -m bench.filter_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    out = run(args)
    out["config"]["command"] = args.command
    print(report(out))
    write_results(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
