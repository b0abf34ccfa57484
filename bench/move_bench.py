"""Growth benchmark: time to move buckets onto new shards while serving, and search latency during the move.

Loads N x D vectors into a cluster of S shards (embedded local Ray), measures batch-1 search latency at steady
state, then asks for ``--add-shards`` more shards and a rebalance and measures the same searches while the buckets
move, until the last move is done, then again at steady state on the grown cluster. Prints the time to move, the
vectors moved per second, search p50/p99 before, during and after, the ratio of p99 during the move to steady
state (target <= 2), and for scale the time in-process FAISS takes to add the same vectors to an index. Checks at
the end that nothing was lost: the count, and exact search equal to in-process FAISS.

    python -m bench.move_bench                          # 2M x 128 on 2 shards, +2 shards: about 1M vectors move
    python -m bench.move_bench --n 100000 --seconds 3   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time

import numpy as np

from bench.common import load, shard_memory, teardown, wait_idle
from bench.timing import make_data
from control.ray_cluster import start_cluster
from lookalike.client import Client
from lookalike.config import ClusterConfig, MovePolicy
from router.core import Router
from router.server import create_router_server


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _latencies(search, xq: np.ndarray, until) -> list[tuple[float, float]]:
    """(start time, seconds) of sequential batch-1 searches, cycling over xq, until ``until()`` is true."""
    out = []
    i = 0
    while not until():
        q = xq[i % len(xq):i % len(xq) + 1]
        t = time.perf_counter()
        search(q)
        out.append((t, time.perf_counter() - t))
        i += 1
    return out


def _summary(lat: list[tuple[float, float]]) -> dict:
    ms = np.array([d for _, d in lat]) * 1e3
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def run(args) -> dict:
    import faiss
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    threads = os.cpu_count() or 1
    out: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"},
                 "machine": {"cpus": threads, "platform": platform.platform(), "python": platform.python_version(),
                             "faiss": faiss.__version__, "ray": ray.__version__,
                             "date": datetime.date.today().isoformat()}}
    xb, xq = make_data(args.n, args.dim, args.queries, args.seed)
    _log(f"generated {args.n} x {args.dim} vectors")

    # In-process reference: FAISS adding the vectors that will move (half of them for 2 -> 4 shards) to an index.
    share = args.add_shards / (args.shards + args.add_shards)
    n_ref = int(args.n * share)
    index = faiss.IndexFlatL2(args.dim)
    t = time.perf_counter()
    index.add(xb[:n_ref])
    out["inprocess_add"] = {"vectors": n_ref, "seconds": time.perf_counter() - t}
    del index

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="lookalike-move-")
    ray.init(address="local", namespace="lookalike", include_dashboard=False,
             num_cpus=max(threads, args.shards + args.add_shards + 1), log_to_driver=False)
    handle = server = router = client = None
    try:
        policy = MovePolicy(max_moves=args.max_moves, move_buckets=args.move_buckets, grace_s=args.grace,
                            copy_mb_s=args.copy_mb_s)
        handle, control = start_cluster(ClusterConfig(data_dir=data_dir, shards=args.shards, cluster_name="movebench",
                                                      shard_num_cpus=args.shard_cpus, policy=policy))
        router = Router(control)
        server, port, _ = create_router_server(router, "127.0.0.1:0")
        client = Client(f"127.0.0.1:{port}", timeout=600)
        client.create_collection("m", dim=args.dim, metric="l2", index=args.index, buckets=args.buckets)
        out["load"] = load(client, "m", xb, args.load_batch, None)
        _log(f"loaded {args.n} vectors in {out['load']['seconds']:.0f}s")
        pids = list(ray.get(handle.shard_pids.remote()).values())
        wait_idle(pids)

        def search(q):
            return client.search("m", q, k=args.k)

        t_end = time.perf_counter() + args.seconds
        out["before"] = _summary(_latencies(search, xq, lambda: time.perf_counter() > t_end))
        _log(f"steady state on {args.shards} shards: p50 {out['before']['p50_ms']:.1f} ms, "
             f"p99 {out['before']['p99_ms']:.1f} ms")

        done = threading.Event()
        progress: list[tuple[float, int]] = []
        serving_at: list[float] = []  # when every new shard serves: the moves can start

        def watch():
            from tqdm import tqdm

            total = None
            bar = None
            while True:
                st = client.status()
                left = len(st.moves)
                if not serving_at and len(st.shards) == args.shards + args.add_shards and all(
                        s.serving for s in st.shards):
                    serving_at.append(time.perf_counter())
                if total is None and left:
                    total = left
                    bar = tqdm(total=total, unit="bucket", desc="moving", file=sys.stderr)
                if bar is not None:
                    bar.n = total - left
                    bar.refresh()
                progress.append((time.perf_counter(), left))
                if total is not None and not left:
                    break
                time.sleep(1.0)
            if bar is not None:
                bar.close()
            done.set()

        t0 = time.perf_counter()
        resp = client.rebalance("m", add_shards=args.add_shards)
        out["moves_queued"] = resp.moves
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        during = _latencies(search, xq, done.is_set)
        move_s = time.perf_counter() - t0
        st = client.status()
        shards = shard_memory(client)
        new_ids = {f"shard-{i}" for i in range(args.shards, args.shards + args.add_shards)}
        moved = sum(s["vectors"] for s in shards if s["shard_id"] in new_ids)
        out["move"] = {"seconds": move_s, "vectors_moved": moved, "vectors_per_s": moved / move_s,
                       "moves": resp.moves, "moves_done": st.moves_done, "moves_failed": st.moves_failed,
                       "shards": shards}
        out["during"] = _summary(during)
        t_serving = serving_at[0] if serving_at else t0
        out["shards_start_seconds"] = t_serving - t0
        out["during_moves"] = _summary([x for x in during if x[0] >= t_serving])
        out["timeline"] = {"search_start_s_and_ms": [[round(t - t0, 3), round(d * 1e3, 2)] for t, d in during],
                           "buckets_left": [[round(t - t0, 3), n] for t, n in progress]}
        _log(f"moved {moved} vectors in {move_s:.1f}s; search during the move: p50 {out['during']['p50_ms']:.1f} ms, "
             f"p99 {out['during']['p99_ms']:.1f} ms")
        wait_idle(list(ray.get(handle.shard_pids.remote()).values()))
        t_end = time.perf_counter() + args.seconds
        out["after"] = _summary(_latencies(search, xq, lambda: time.perf_counter() > t_end))

        # Nothing lost: every vector there, and exact search equal to in-process FAISS.
        count = client.describe_collection("m").count
        flat = faiss.IndexFlatL2(args.dim)
        flat.add(xb)
        _, gt = flat.search(xq[:50], args.k)
        hits = client.search("m", xq[:50], k=args.k)
        same = all(hits.ids[q] == [str(i) for i in gt[q]] for q in range(50)) if args.index == "Flat" else None
        out["check"] = {"count": int(count), "expected": args.n, "exact_equal_50_queries": same,
                        "coverage": hits.coverage}
        out["ratios"] = {"p99_during_over_before": out["during"]["p99_ms"] / out["before"]["p99_ms"],
                         "p99_moves_over_before": out["during_moves"]["p99_ms"] / out["before"]["p99_ms"],
                         "p50_during_over_before": out["during"]["p50_ms"] / out["before"]["p50_ms"],
                         "move_over_inprocess_add": move_s / max(out["inprocess_add"]["seconds"], 1e-9)
                         * n_ref / max(moved, 1)}
    finally:
        teardown(client, server, router, handle)
    return out


def markdown(out: dict) -> str:
    c, m = out["config"], out["move"]
    lines = [
        f"Moving {m['vectors_moved']:,} of {c['n']:,} x {c['dim']} vectors ({c['index']}, {c['buckets']} buckets) from "
        f"{c['shards']} shards onto {c['add_shards']} new ones: {m['seconds']:.1f} s "
        f"({m['vectors_per_s']:,.0f} vectors/s; {m['moves']} moves, {m['moves_failed']} failed). In-process FAISS adds "
        f"{out['inprocess_add']['vectors']:,} of them to an IndexFlatL2 in {out['inprocess_add']['seconds']:.2f} s.",
        "",
        "| search, batch 1, k=%d | requests | p50 ms | p99 ms | max ms |" % c["k"],
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("before", f"steady, {c['shards']} shards"),
                       ("during", "during the rebalance (new shards starting, then moves)"),
                       ("during_moves", "during the moves (new shards serving)"),
                       ("after", f"steady, {c['shards'] + c['add_shards']} shards")):
        r = out[key]
        lines.append(f"| {label} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |")
    r = out["ratios"]
    lines += ["", f"p99 during the moves / steady before: **{r['p99_moves_over_before']:.2f}x** (target <= 2); over "
              f"the whole rebalance, including the {out['shards_start_seconds']:.1f} s in which the new shard actors "
              f"start: {r['p99_during_over_before']:.2f}x; p50: {r['p50_during_over_before']:.2f}x.",
              f"Check: count {out['check']['count']:,} of {out['check']['expected']:,}; exact search equal to "
              f"in-process FAISS on 50 queries: {out['check']['exact_equal_50_queries']}; coverage "
              f"{out['check']['coverage']}."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.move_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2_000_000, help="vectors (default 2000000: about 1M move)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--index", default="Flat")
    p.add_argument("--buckets", type=int, default=1024)
    p.add_argument("--shards", type=int, default=2, help="shards before (default 2)")
    p.add_argument("--add-shards", type=int, default=2, help="shards added (default 2)")
    p.add_argument("--shard-cpus", type=float, default=0.5)
    p.add_argument("--max-moves", type=int, default=2)
    p.add_argument("--move-buckets", type=int, default=16)
    p.add_argument("--grace", type=float, default=2.0)
    p.add_argument("--copy-mb-s", type=float, default=0.0, help="rate limit of a move's copy (0: none)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each steady-state measurement")
    p.add_argument("--load-batch", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="bench/out/move.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(markdown(out))
    return 0 if out["check"]["count"] == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
