"""The effect of search batching, measured with the load tester: many single-query clients vs one batching client.

    python -m bench.batching_bench [--n 1000000] [--dim 128] [--shards 4] [--index IVF1024,Flat] [--nprobe 16]
                                   [--concurrency 64] [--seconds 10] [--out bench/out/batching.json]

What it does, in one process tree:

1. generates ``n`` clustered float32 vectors and 1000 queries (``bench.common.make_data``, seeded);
2. starts an embedded local Ray with a real cluster (controller and ``shards`` shard actors serving gRPC) and two
   routers over the same shards, each with its own gRPC server: one batches concurrent searches (the default,
   router/batcher.py), the other does not (``batch_wait_s=-1``, as ``lookalike serve --batch-wait-us -1``);
3. loads the vectors into one collection and waits until the shards are idle;
4. runs ``lookalike loadtest`` (``bench.loadtest.run``, ``--processes`` client processes, closed loop) for
   ``--seconds`` each: one client sending batches of 100 queries; one client sending single queries;
   ``--concurrency`` clients sending single queries, through the router without batching and through the
   router with batching;
5. measures in-process FAISS on the same data and the same share of the lists (``IVF{shards*nlist}`` searched
   with ``shards*nprobe``; Flat when the index is Flat) at batch 100 and batch 1, on all cores;
6. prints a Markdown table (queries per second, p50/p99 per request, recall@10 against exact) and the ratios the
   target is stated in, and writes every number and the loadtest reports to ``--out``, with a latency plot of each
   run next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from bench import loadtest
from bench.common import shard_train_size, teardown, wait_idle
from bench.timing import make_data, measure
from control.ray_cluster import start_cluster
from lookalike.client import Client
from lookalike.config import ClusterConfig
from router.batcher import MAX_INFLIGHT
from router.core import Router
from router.server import create_router_server


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loadtest(target: str, name: str, xb, xq, *, batch: int, concurrency: int, seconds: float, processes: int,
              nprobe: int, out_png: str | None) -> dict:
    cfg = loadtest.LoadConfig(target=target, collection=name, mode="closed", concurrency=concurrency,
                              duration=seconds, batch=batch, nprobe=nprobe, processes=processes, timeout=60,
                              recall_sample=200, seed=1)
    _, mean, std = loadtest.prepare(cfg, xq, xb)
    report, rec = loadtest.run(cfg, xq, mean, std, xb, None, "l2", show_progress=False)
    if out_png:
        loadtest.plot(report, rec, out_png)
    return report


def _inprocess(xb, xq, index: str, nprobe: int, shards: int, seconds: float) -> dict:
    """In-process FAISS over all vectors at batch 100 and 1: queries per second and per-request p50 (ms)."""
    import faiss

    m = re.match(r"IVF(\d+),(.*)", index)
    if m:
        nlist = int(m.group(1))
        spec = f"IVF{shards * nlist},{m.group(2)}"
        ivf = faiss.index_factory(xb.shape[1], spec, faiss.METRIC_L2)
        ntrain = min(len(xb), shards * shard_train_size(nlist, xb.shape[1]))
        t = time.perf_counter()
        ivf.train(xb[np.random.default_rng(2).choice(len(xb), ntrain, replace=False)])
        ivf.add(xb)
        _log(f"in-process {spec}: built in {time.perf_counter() - t:.1f}s")
        params = faiss.SearchParametersIVF(nprobe=shards * nprobe)

        def search(q):
            return ivf.search(q, 10, params=params)
    else:
        spec = "Flat"
        flat = faiss.IndexFlatL2(xb.shape[1])
        flat.add(xb)

        def search(q):
            return flat.search(q, 10)
    out = {"spec": spec}
    for b in (100, 1):
        r = measure(search, xq, b, seconds, 100_000)
        out[f"batch{b}"] = {"qps": r["qps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]}
        _log(f"in-process {spec} batch {b}: {r['qps']:.0f} queries/s")
    return out


def run(args) -> dict:
    import ray

    out: dict = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
                 "args": vars(args), "runs": []}
    t = time.perf_counter()
    xb, xq = make_data(args.n, args.dim, 1000, args.seed)
    _log(f"data: {args.n} x {args.dim} in {time.perf_counter() - t:.1f}s")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    data_dir = tempfile.mkdtemp(prefix="lookalike-batching-")
    ray.init(address="local", namespace="lookalike", include_dashboard=False,
             num_cpus=max(os.cpu_count() or 1, args.shards + 1), log_to_driver=False)
    handle = server = router = client = server_nb = router_nb = None
    plots = pathlib.Path(args.out).with_suffix("")
    try:
        handle, control = start_cluster(ClusterConfig(data_dir=data_dir, shards=args.shards, cluster_name="batching"))
        router = Router(control)
        server, port, _ = create_router_server(router, "127.0.0.1:0", batch_inflight=args.inflight or MAX_INFLIGHT)
        router_nb = Router(control)
        server_nb, port_nb, _ = create_router_server(router_nb, "127.0.0.1:0", batch_wait_s=-1)
        batcher = server.servicer.batcher
        client = Client(f"127.0.0.1:{port}", timeout=600)
        client.create_collection("bench", dim=args.dim, metric="l2", index=args.index, nprobe=args.nprobe)
        t = time.perf_counter()
        client.upsert_stream("bench", ((list(map(str, range(i, min(i + 10_000, args.n)))), xb[i:i + 10_000], None)
                                       for i in range(0, args.n, 10_000)))
        out["load_seconds"] = round(time.perf_counter() - t, 1)
        _log(f"loaded {args.n} in {out['load_seconds']}s")
        waited = wait_idle(list(ray.get(handle.shard_pids.remote()).values()))
        _log(f"shards idle after {waited:.1f}s")
        runs = [("batch 100, 1 client", port, 100, 1), ("batch 1, 1 client", port, 1, 1),
                (f"batch 1, {args.concurrency} clients, no batching", port_nb, 1, args.concurrency),
                (f"batch 1, {args.concurrency} clients, batching", port, 1, args.concurrency)]
        plots.mkdir(parents=True, exist_ok=True)
        for i, (label, p, batch, conc) in enumerate(runs):
            png = str(plots / f"run{i}.png")
            b0 = batcher.batches
            r = _loadtest(f"127.0.0.1:{p}", "bench", xb, xq, batch=batch, concurrency=conc, seconds=args.seconds,
                          processes=args.processes, nprobe=args.nprobe, out_png=png)
            r.pop("timeline", None)
            r["label"] = label
            r["plot"] = png
            if p == port:
                sent = batcher.batches - b0
                r["router_batches"] = sent
                r["queries_per_batch"] = r["ok"] * batch / sent if sent else None
            out["runs"].append(r)
            lat = r["latency_ms"]["all"]
            _log(f"{label}: {r['queries_per_s']:.0f} queries/s, p50 {lat.get('p50', float('nan')):.2f} ms, "
                 f"p99 {lat.get('p99', float('nan')):.2f} ms, errors {r['errors'] or 'none'}")
        client.drop_collection("bench")
    finally:
        for srv in (server_nb,):
            if srv is not None:
                srv.stop(None)
        if router_nb is not None:
            router_nb.close()
        teardown(client, server, router, handle)
        ray.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)
    if not args.no_inprocess:
        out["inprocess"] = _inprocess(xb, xq, args.index, args.nprobe, args.shards, args.seconds)
    return out


def markdown(out: dict) -> str:
    a = out["args"]
    lines = [f"N={a['n']:,}, D={a['dim']}, {a['shards']} shards, index {a['index']} (nprobe {a['nprobe']}), k=10, "
             f"closed loop, {a['seconds']:g} s a run, {a['processes']} client processes.", "",
             "| run | queries/s | p50 ms | p99 ms | requests | errors | recall@10 | queries per router batch | "
             "load generator CPU (cores) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in out["runs"]:
        lat = r["latency_ms"]["all"]
        rc = (r.get("recall") or {}).get("recall_at_k")
        qpb = r.get("queries_per_batch")
        lines.append(f"| {r['label']} | {r['queries_per_s']:.0f} | {lat.get('p50', float('nan')):.2f} | "
                     f"{lat.get('p99', float('nan')):.2f} | {r['requests']} | {r['errors'] or 'none'} | "
                     f"{'-' if rc is None else f'{rc:.3f}'} | {'-' if qpb is None else f'{qpb:.1f}'} | "
                     f"{r.get('client_cpu_cores', float('nan')):.2f} |")
    ip = out.get("inprocess")
    if ip:
        for b in (100, 1):
            lines.append(f"| in-process {ip['spec']}, batch {b} | {ip[f'batch{b}']['qps']:.0f} | "
                         f"{ip[f'batch{b}']['p50_ms']:.2f} | {ip[f'batch{b}']['p99_ms']:.2f} | - | - | - | - | - |")
    q = {r["label"]: r["queries_per_s"] for r in out["runs"]}
    b100, nb, bt = (out["runs"][0]["queries_per_s"], out["runs"][2]["queries_per_s"], out["runs"][3]["queries_per_s"])
    lines += ["", f"- {a['concurrency']} single-query clients with batching / one client at batch 100: "
                  f"**{bt / b100:.2f}x** (target >= 0.5x)",
              f"- {a['concurrency']} single-query clients, batching / no batching: {bt / nb:.2f}x",
              f"- one client at batch 100 / one client at batch 1: {b100 / q[out['runs'][1]['label']]:.1f}x"]
    if ip:
        lines.append(f"- cluster / in-process at batch 100: {b100 / ip['batch100']['qps']:.2f}x; {a['concurrency']} "
                     f"batched single-query clients / in-process batch 100: {bt / ip['batch100']['qps']:.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.batching_bench", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--index", default="IVF1024,Flat")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--processes", type=int, default=2, help="load-test client processes")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--inflight", type=int, default=0,
                   help="batches of one kind running at once in the batching router (default: router/batcher.py's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process FAISS rows")
    p.add_argument("--out", default="bench/out/batching.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(markdown(out))
    print(f"\n(all numbers: {args.out}; plots: {pathlib.Path(args.out).with_suffix('')}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
