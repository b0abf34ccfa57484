"""A real cluster for the benchmarks: an embedded local Ray, the controller and shard actors and a router server in
this process (started, loaded through the router, waited on until idle, stopped), and what the shards report.
bench.timing measures it.

May use: the layers below bench (lookalike, shard, router, control) and bench.timing.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from tqdm import tqdm

from bench import timing
from bench.timing import ForeignCpu
from control.ray_cluster import start_cluster, stop_cluster
from lookalike.client import Client
from lookalike.config import ClusterConfig
from router.core import Router
from router.server import create_router_server
from shard.specs import train_threshold


def shard_train_size(nlist: int, dim: int) -> int:
    """Vectors the collection needs before its IVF{nlist} index is trained (shard.specs.train_threshold)."""
    return train_threshold(f"IVF{nlist},Flat")


def shard_memory(client) -> list[dict]:
    st = client.status()
    return [{"shard_id": s.shard_id, "vectors": int(s.vectors), "memory_bytes": int(s.memory_bytes),
             "index_bytes": int(s.index_bytes), "serving": bool(s.serving)} for s in st.shards]


def load(client, name: str, xb: np.ndarray, batch: int, timeout: float | None) -> dict:
    n = len(xb)
    bar = tqdm(total=n, unit="vec", unit_scale=True, desc=f"load {name}", mininterval=2.0, file=sys.stderr)

    def batches():
        for s in range(0, n, batch):
            e = min(n, s + batch)
            yield [str(i) for i in range(s, e)], xb[s:e]
            bar.update(e - s)

    snap = timing.MONITOR.snapshot() if timing.MONITOR else None
    t = time.perf_counter()
    count = client.upsert_stream(name, batches(), timeout=timeout)
    dt = time.perf_counter() - t
    bar.close()
    if count != n:
        raise RuntimeError(f"upsert_stream acknowledged {count} of {n} vectors")
    return {"collection": name, "vectors": n, "seconds": round(dt, 3), "vectors_per_s": n / dt,
            "foreign_cpu_cores": round(ForeignCpu.cores(snap, timing.MONITOR.snapshot()), 3) if snap else None}


def wait_idle(pids: list[int], max_s: float = 180.0, window: float = 1.0, cores: float = 0.15,
              windows: int = 2) -> float:
    """Waits until the shard processes together use less than ``cores`` CPUs over ``windows`` consecutive windows
    (the background WAL compaction that follows a bulk load has finished). Returns the seconds waited."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass

    def cpu() -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    t0 = time.perf_counter()
    quiet, last = 0, cpu()
    while time.perf_counter() - t0 < max_s and quiet < windows:
        time.sleep(window)
        now = cpu()
        quiet = quiet + 1 if (now - last) / window < cores else 0
        last = now
    return time.perf_counter() - t0


def init_ray(num_cpus: int) -> None:
    """Starts a private embedded Ray for the benchmark (token auth off unless RAY_AUTH_MODE says otherwise)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", namespace="lookalike", include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)


def start_local(data_dir: str, shards: int, shard_cpus: float, cluster_name: str = "bench",
                ready_timeout: float = 180.0, per_process: int = 1, batch_inflight: int = 1):
    """On the connected Ray: a cluster of ``shards`` shard actors on ``data_dir`` (waits until every shard serves)
    and a router gRPC server in this process. Returns (controller handle, router, server, port, client); on a
    failure, stops what it had started (not Ray) and raises. ``ready_timeout``: seconds the shards may take to
    serve (loading their storage); ``per_process``: shards sharing one process (shard.host); ``batch_inflight``:
    the router's batches of one kind running at once (serve ``--batch-inflight``)."""
    handle, control = start_cluster(ClusterConfig(data_dir=data_dir, shards=shards, cluster_name=cluster_name,
                                                  shard_num_cpus=shard_cpus, shards_per_process=per_process),
                                    ready_timeout=ready_timeout)
    router = server = None
    try:
        router = Router(control)
        server, port, _health = create_router_server(router, "127.0.0.1:0", batch_inflight=batch_inflight)
        return handle, router, server, port, Client(f"127.0.0.1:{port}", timeout=600)
    except BaseException:
        if server is not None:
            server.stop(None)
        if router is not None:
            router.close()
        stop_cluster(handle)
        raise


def teardown(client, server, router, handle, shutdown_ray: bool = True) -> None:
    """Stops what ``run`` started (any of them may be None) and, unless ``shutdown_ray`` is False, Ray."""
    import ray

    if client is not None:
        client.close()
    if server is not None:
        server.stop(None)
    if router is not None:
        router.close()
    if handle is not None:
        stop_cluster(handle)
    if shutdown_ray:
        ray.shutdown()


def total_memory_gib() -> float:
    import psutil

    return round(psutil.virtual_memory().total / (1 << 30), 1)
