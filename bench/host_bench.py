"""Shards sharing one process, right after a load and after a restart: batch-100 QPS and each process's CPU a batch.

A process of several shards searches its IVF-PQ shards' lists as one index (shard.stacked). FAISS's view of them
allocates a buffer for each probed list, and in glibc's heap after a load those allocations walked the free lists
(``_int_malloc``: 15-17% of the process's CPU); a restarted process, whose lists were read in one pass, did not show
it. Such processes run jemalloc (shard.osutil.host_process_env); ``LOOKALIKE_SHARD_ALLOCATOR=glibc`` measures them
with glibc's allocator instead.

    python -m bench.host_bench --n 3000000 --shards 8 --per-process 8 --data-dir /work/scale10
    LOOKALIKE_SHARD_ALLOCATOR=glibc python -m bench.host_bench --n 3000000 --shards 8 --per-process 8 ...

The data is scale_bench's (``--data-n`` its size: the first ``--n`` vectors are loaded). One request in flight,
batch 100, ``--seconds`` in windows of 5 s; the CPU columns are each process's user + system time over the window's
batches (shard processes, then this process: the router and the client).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from bench.common import load, start_local, teardown, wait_idle
from bench.scale_bench import _init_ray_retrying, process_allocators, wait_trained
from bench.scale_common import dataset, log


def _processes(handle) -> list:
    """The shard processes (psutil), each once."""
    import psutil  # deferred with ray, as the other benches do: --help needs neither
    import ray

    return [psutil.Process(p) for p in dict.fromkeys(ray.get(handle.shard_pids.remote()).values())]


def _rss(processes: list) -> int:
    return sum(p.memory_info().rss for p in processes)


def _measure(client, handle, label: str, xq: np.ndarray, nprobe: int, seconds: float, n: int,
             empty: int) -> list[dict]:
    import psutil  # deferred: see _processes

    shard_procs = _processes(handle)
    rss = (_rss(shard_procs) - empty) / n
    alloc = process_allocators(handle)
    log(f"  {label}: shard processes' RSS growth {rss:.0f} B/vector; allocators (MiB) "
        f"{[{k: v >> 20 for k, v in a.items() if k != 'pid'} for a in alloc]}")
    for _ in range(5):  # warm-up
        client.search("host", xq[:100], k=10, nprobe=nprobe)
    procs = shard_procs + [psutil.Process()]
    batches = max(1, len(xq) // 100)
    out = []
    end = time.time() + seconds
    while time.time() < end:
        c0 = [sum(p.cpu_times()[:2]) for p in procs]
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 5:
            s = (k % batches) * 100
            client.search("host", xq[s:s + 100], k=10, nprobe=nprobe)
            k += 1
        c1 = [sum(p.cpu_times()[:2]) for p in procs]
        row = {"state": label, "qps": 100 * k / (time.perf_counter() - t0), "rss_bytes_per_vector": rss,
               "allocators": alloc,
               "shard_process_ms": [round(1e3 * (b - a) / k, 1) for a, b in zip(c0[:-1], c1[:-1])],
               "router_and_client_ms": round(1e3 * (c1[-1] - c0[-1]) / k, 1)}
        log(f"  {label}: {row['qps']:.0f} QPS; CPU ms a batch: shard processes {row['shard_process_ms']}, "
            f"router + client {row['router_and_client_ms']}")
        out.append(row)
    return out


def run(args) -> list[dict]:
    data = argparse.Namespace(n=args.data_n, dim=128, queries=1000, seed=0, clusters=1000, noise=1.5,
                              data_dir=args.data_dir)
    xb, xq = dataset(data)
    xb = xb[:args.n]
    storage = os.path.join(args.data_dir, f"host-bench-{args.n}")
    shutil.rmtree(storage, ignore_errors=True)
    allocator = os.environ.get("LOOKALIKE_SHARD_ALLOCATOR", "jemalloc")
    log(f"{args.spec}, {args.n} vectors, {args.shards} shards, {args.per_process} a process, allocator {allocator}")
    rows = []
    try:
        for state in ("after the load", "after a restart"):
            _init_ray_retrying(max(2, args.shards + 1))
            handle, router, server, _port, client = start_local(storage, args.shards, 0.5, cluster_name="hostb",
                                                                ready_timeout=3600, per_process=args.per_process)
            try:
                if state == "after the load":
                    empty = _rss(_processes(handle))  # no collection yet: the vectors' growth is over this
                    client.create_collection("host", dim=128, metric="l2", index=args.spec)
                    r = load(client, "host", xb, 10000, None)
                    log(f"  loaded in {r['seconds']:.0f}s ({r['vectors_per_s']:.0f} vectors/s)")
                    wait_trained(client, "host", args.spec, 3600)
                    pids = [p.pid for p in _processes(handle)]
                    log(f"  idle after {wait_idle(pids, max_s=900, windows=8):.0f}s")
                else:
                    while client.search("host", xq[:100], k=10, nprobe=args.nprobe).coverage < 1:
                        time.sleep(1)
                rows += [{**r, "allocator": allocator} for r in
                         _measure(client, handle, state, xq, args.nprobe, args.seconds, args.n, empty)]
            finally:
                teardown(client, server, router, handle)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3_000_000, help="vectors loaded")
    p.add_argument("--data-n", type=int, default=10_000_000, help="size of scale_bench's data set to read from")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-process", type=int, default=8)
    p.add_argument("--spec", default="IVF4096,PQ32")
    p.add_argument("--nprobe", type=int, default=12)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--data-dir", required=True)
    args = p.parse_args(argv)
    rows = run(args)
    print("| allocator | state | shard processes' RSS growth B/vector | QPS | shard processes' CPU ms a batch | "
          "router + client ms |")
    print("|---|---|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['allocator']} | {r['state']} | {r['rss_bytes_per_vector']:.0f} | {r['qps']:.0f} | "
              f"{r['shard_process_ms']} | {r['router_and_client_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
