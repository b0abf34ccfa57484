"""Where a batch of searches spends its CPU: the router's process and each shard's, against FAISS's own search.

    python -m bench.cpu_split_bench --data-dir /tmp/split --n 500000 --index IVF1024,Flat --nprobe 8 --shards 8

Loads ``n`` generated vectors (bench.scale_bench's data) into an embedded cluster of ``shards`` shard actors, waits
until it is trained and its shards are idle, measures their idle CPU, then sends batches of ``batch`` queries from
this process (one request in flight) and reads every process's CPU time (user + system) before and after: CPU
milliseconds per batch for the router's process (the router and this benchmark's client) and for each shard. The
same spec in-process (FAISS, one thread, trained on 100 points a list) gives the CPU a batch costs one index at the
same nprobe. That is a breakdown of the CPU, not a speed comparison: the two are trained on different samples and
their recall is not measured here (bench/scale_bench.py compares at equal recall). On a machine whose cores the
router and the shards share, QPS follows the sum of these. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from bench.common import init_ray, load, start_local, teardown, wait_idle
from bench.scale_bench import dataset, wait_trained
from bench.timing import measure, write_results
from shard.specs import without_polysemous_training


def _cpu(procs) -> dict[str, float]:
    out = {}
    for tag, p in procs:
        t = p.cpu_times()
        out[tag] = t.user + t.system
    return out


def cluster(args, xb: np.ndarray, xq: np.ndarray) -> dict:
    import psutil
    import ray

    storage = pathlib.Path(args.data_dir) / "cpu-split-storage"
    shutil.rmtree(storage, ignore_errors=True)
    init_ray(max(2, args.shards + 1))
    handle, router, server, port, client = start_local(str(storage), args.shards, args.shard_cpus,
                                                       cluster_name="cpusplit", per_process=args.per_process)
    res: dict = {}
    try:
        client.create_collection("split", dim=xb.shape[1], metric="l2", index=args.index)
        res["load"] = load(client, "split", xb, 10_000, None)
        res["trained"] = wait_trained(client, "split", args.index, 900)
        # a process of several shards once
        pids = list(dict.fromkeys(ray.get(handle.shard_pids.remote()).values()))
        res["idle_wait_seconds"] = wait_idle(pids, max_s=900)
        procs = [("router", psutil.Process(os.getpid()))] + [(f"shard{i}", psutil.Process(p))
                                                              for i, p in enumerate(pids)]
        c0 = _cpu(procs)
        time.sleep(args.seconds)
        c1 = _cpu(procs)
        res["idle_cores"] = {t: (c1[t] - c0[t]) / args.seconds for t in c0}
        search = lambda q: client.search("split", q, k=args.k, nprobe=args.nprobe)  # noqa: E731
        res["runs"] = []
        for rep in range(args.reps):
            c0 = _cpu(procs)
            r = measure(search, xq, args.batch, args.seconds, 10 ** 9)
            c1 = _cpu(procs)
            per = {t: 1e3 * (c1[t] - c0[t]) / r["requests"] for t in c0}
            run = {"qps": r["qps"], "requests": r["requests"], "router_ms": per["router"],
                   "shard_ms": [per[t] for t, _ in procs[1:]]}
            res["runs"].append(run)
            print(f"  cluster run {rep + 1}: {r['qps']:.0f} QPS; CPU ms a batch: router {run['router_ms']:.1f}, "
                  f"shards {sum(run['shard_ms']):.1f}", file=sys.stderr, flush=True)
    finally:
        teardown(client, server, router, handle)
        shutil.rmtree(storage, ignore_errors=True)
    return res


def in_process(args, xb: np.ndarray, xq: np.ndarray) -> dict:
    import faiss

    index = without_polysemous_training(faiss.index_factory(xb.shape[1], args.index))  # as the shards train it
    nlist = faiss.extract_index_ivf(index).nlist if "IVF" in args.index else 0
    if not index.is_trained:
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(len(xb), min(len(xb), 100 * max(nlist, 1)), replace=False))
        index.train(np.ascontiguousarray(xb[rows]))
    for s in range(0, len(xb), 1_000_000):
        index.add(np.ascontiguousarray(xb[s:s + 1_000_000]))
    if nlist:
        faiss.extract_index_ivf(index).nprobe = args.nprobe
    faiss.omp_set_num_threads(1)
    runs = []
    for _ in range(args.reps):
        c = time.process_time()
        r = measure(lambda q: index.search(q, args.k), xq, args.batch, args.seconds, 10 ** 9)
        runs.append({"qps": r["qps"], "cpu_ms": 1e3 * (time.process_time() - c) / r["requests"]})
    return {"runs": runs}


def report(out: dict) -> str:
    f = min(r["cpu_ms"] for r in out["faiss"]["runs"])
    lines = [f"{out['index']}, n={out['n']}, nprobe {out['nprobe']}, {out['shards']} shards "
             f"({out.get('per_process', 1)} a process), batch {out['batch']}",
             "",
             "| run | cluster QPS | router ms | shards ms (each process) | cluster ms | FAISS 1-thread ms, same nprobe "
             "| FAISS / cluster |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for i, r in enumerate(out["cluster"]["runs"]):
        total = r["router_ms"] + sum(r["shard_ms"])
        each = " ".join(f"{v:.1f}" for v in r["shard_ms"])
        lines.append(f"| {i + 1} | {r['qps']:.0f} | {r['router_ms']:.1f} | {sum(r['shard_ms']):.1f} ({each}) | "
                     f"{total:.1f} | {f:.1f} | {f / total:.2f} |")
    idle = out["cluster"]["idle_cores"]
    lines.append("")
    lines.append(f"Idle CPU (cores): router {idle['router']:.3f}, shards "
                 f"{sum(v for t, v in idle.items() if t != 'router'):.3f} together.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_split_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="where the generated vectors and the cluster's storage go")
    p.add_argument("--n", type=int, default=500_000, help="vectors (default 500000)")
    p.add_argument("--index", default="IVF1024,Flat", help="the collection's index spec (default IVF1024,Flat)")
    p.add_argument("--nprobe", type=int, default=8, help="IVF lists probed (default 8)")
    p.add_argument("--shards", type=int, default=8, help="shard actors (default 8)")
    p.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor (default 0.5)")
    p.add_argument("--per-process", type=int, default=1,
                   help="shards sharing one process (lookalike serve --shards-per-process; default 1)")
    p.add_argument("--batch", type=int, default=100, help="queries per request (default 100)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measurement (default 10)")
    p.add_argument("--reps", type=int, default=2, help="measurements of each system (default 2)")
    p.add_argument("--out", default="bench/out/cpu_split.json", help="JSON results")
    args = p.parse_args(argv)
    data = argparse.Namespace(n=args.n, dim=128, queries=1000, seed=0, clusters=1000, noise=1.5,
                              data_dir=args.data_dir)
    xb, xq = dataset(data)
    out = {"index": args.index, "n": args.n, "nprobe": args.nprobe, "shards": args.shards, "batch": args.batch,
           "per_process": args.per_process}
    out["cluster"] = cluster(args, xb, xq)
    out["faiss"] = in_process(args, xb, xq)
    write_results(out, args.out)
    print(report(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
