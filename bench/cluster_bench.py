"""Router vs in-process FAISS, side by side on the same data: search QPS and latency, load rate, shard memory.

    python -m bench.cluster_bench [--n 1000000] [--dim 128] [--shards 4] [--queries 1000] [--seconds 10]
                                  [--out bench/out/cluster.json]

What it does, in one process:

1. generates ``n`` clustered float32 vectors (a random centroid plus Gaussian noise each) and ``queries``
   query vectors from the same distribution, seeded;
2. starts an embedded local Ray with a real cluster (the controller actor and ``shards`` shard actors, each
   serving gRPC) and the router's gRPC server in this process, and talks to it with ``lookalike.client.Client``
   (client -> router -> shards, all over gRPC on localhost);
3. Flat: bulk-loads the vectors (``upsert_stream``, ids ``str(i)``) and measures the shards' memory before and
   after; searches through the router and an in-process ``faiss.IndexFlatL2`` over all vectors; checks that the
   cluster returns the same ids as the in-process index;
4. IVF: drops the Flat collection, loads an ``IVF{nlist},Flat`` collection (one IVF index per shard) and compares
   it with an in-process ``IVF{shards*nlist},Flat`` searched with ``shards*nprobe`` lists, so that both scan about
   the same fraction of the data; recall@k of both against the exact results.

Each (index, batch size, system) measurement runs sequential requests, one at a time, for at most ``--seconds``
seconds (or ``--max-requests`` requests) after one warm-up request; QPS is queries answered per wall second and
p50/p99 are per-request latencies. In-process FAISS runs on all cores (``faiss.omp_set_num_threads``); an extra
row measures it on one thread too, because on small machines FAISS's multi-threaded path can be the slower one.
After each bulk load the benchmark waits until the shard processes are idle (WAL compaction runs in the
background) before measuring memory and searching. Last, it measures the fixed cost of the path: a no-op gRPC
call to the router, and a batch-1 search of a 1000-vector collection.

A Markdown report goes to stdout and every number to ``--out`` (JSON). ``lookalike bench ...`` calls ``main``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

MiB = 1 << 20


def _shard_train_size(nlist: int, dim: int) -> int:
    """Vectors the collection needs before its IVF{nlist} index is trained (shard.specs.train_threshold)."""
    from shard.specs import train_threshold  # here: FAISS loads only when a run needs it

    return train_threshold(f"IVF{nlist},Flat")


# --- data -----------------------------------------------------------------------------------------------------
def make_data(n: int, dim: int, nq: int, seed: int, clusters: int = 1000, noise: float = 1.5,
              chunk: int = 100_000, out: np.ndarray | None = None,
              progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(xb shape (n, dim), xq shape (nq, dim)) float32: each vector is a random centroid plus Gaussian noise.

    ``out``: an (n, dim) float32 array (e.g. a memory-mapped .npy) xb is written into, chunk by chunk, and
    returned; the numbers are the same as without it. ``progress``: called with the count of each chunk written.

    Centroids are standard normal and cluster sizes uneven (gamma-distributed weights). With noise 1.5 the data is
    clustered but not trivially so: IVF1024 with nprobe 16 over 250k of these vectors finds about 90% of the true
    10 nearest neighbours (with noise 0.5 it finds all of them, and recall would tell nothing).
    """
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((clusters, dim), dtype=np.float32)
    weights = rng.gamma(2.0, size=clusters)
    weights /= weights.sum()

    def draw(count: int, into: np.ndarray | None = None, tick=None) -> np.ndarray:
        x = np.empty((count, dim), dtype=np.float32) if into is None else into
        for s in range(0, count, chunk):
            e = min(count, s + chunk)
            assign = rng.choice(clusters, size=e - s, p=weights)
            part = centroids[assign]
            part += noise * rng.standard_normal((e - s, dim), dtype=np.float32)
            x[s:e] = part
            if tick is not None:
                tick(e - s)
        return x

    if out is not None and out.shape != (n, dim):
        raise ValueError(f"out has shape {out.shape}, expected {(n, dim)}")
    return draw(n, out, progress), draw(nq)


# --- measuring ------------------------------------------------------------------------------------------------
class ForeignCpu:
    """CPU used on this machine by processes outside this benchmark (this process and its descendants: Ray's
    daemons and the shard actors). Measurements taken while something else ran are not comparable; each result
    carries the average number of cores others used meanwhile."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()

    def _mine(self) -> float:
        total = 0.0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self._psutil.Error:
                pass
        return total

    def snapshot(self) -> tuple[float, float, float]:
        c = self._psutil.cpu_times()
        busy = c.user + c.nice + c.system + getattr(c, "irq", 0.0) + getattr(c, "softirq", 0.0)
        return time.perf_counter(), busy, self._mine()

    @staticmethod
    def cores(a: tuple, b: tuple) -> float:
        """Average cores used by others between two snapshots."""
        dt = b[0] - a[0]
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / dt) if dt > 0 else 0.0

    def wait_quiet(self, max_s: float, threshold: float = 0.2, window: float = 2.0) -> tuple[float, float]:
        """Waits (up to max_s) for a window in which others use under ``threshold`` cores. Returns (waited, cores)."""
        t0 = time.perf_counter()
        while True:
            a = self.snapshot()
            time.sleep(window)
            used = self.cores(a, self.snapshot())
            if used < threshold or time.perf_counter() - t0 >= max_s:
                return time.perf_counter() - t0, used


_MONITOR: ForeignCpu | None = None


def measure(search, xq: np.ndarray, batch: int, seconds: float, max_requests: int, warmup: int = 1) -> dict:
    """Sequential requests of ``batch`` queries (cycling over xq) until ``seconds`` pass or ``max_requests`` ran."""
    starts = list(range(0, max(1, len(xq) - batch + 1), batch))
    for i in range(warmup):
        s = starts[i % len(starts)]
        search(xq[s:s + batch])
    lat = []
    snap = _MONITOR.snapshot() if _MONITOR else None
    t0 = time.perf_counter()
    while True:
        s = starts[len(lat) % len(starts)]
        q = xq[s:s + batch]
        t = time.perf_counter()
        search(q)
        lat.append(time.perf_counter() - t)
        if time.perf_counter() - t0 >= seconds or len(lat) >= max_requests:
            break
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    nq = len(lat) * len(xq[starts[0]:starts[0] + batch])
    return {"batch": batch, "requests": len(lat), "queries": nq, "seconds": round(wall, 3),
            "qps": nq / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "foreign_cpu_cores": round(ForeignCpu.cores(snap, _MONITOR.snapshot()), 3) if snap else None}


def ids_to_array(ids: list[list[str]], k: int) -> np.ndarray:
    """The cluster's string ids (``str(i)``) as an int64 (nq, k) array, -1 where fewer than k came back."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for q, row in enumerate(ids):
        out[q, :len(row)] = [int(x) for x in row]
    return out


def cluster_results(client, name: str, xq: np.ndarray, k: int, nprobe: int, batch: int = 100):
    """(D, I) for all queries through the router, in batches."""
    Ds, Is = [], []
    for s in range(0, len(xq), batch):
        res = client.search(name, xq[s:s + batch], k=k, nprobe=nprobe)
        Ds.append(res.D)
        Is.append(ids_to_array(res.ids, k))
    return np.concatenate(Ds), np.concatenate(Is)


def recall_at_k(I: np.ndarray, gt: np.ndarray) -> float:
    """Mean over queries of |I[q] & gt[q]| / k."""
    k = gt.shape[1]
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(I, gt)]))


def compare_exact(D_c: np.ndarray, I_c: np.ndarray, D_p: np.ndarray, I_p: np.ndarray) -> dict:
    """How the cluster's Flat results match the in-process Flat results."""
    pos_equal = float((I_c == I_p).mean())
    overlap = recall_at_k(I_c, I_p)
    # A differing id is explained by a tie (or float rounding) when the distance lists still agree.
    dist_close = np.isclose(D_c, D_p, rtol=1e-4, atol=1e-3)
    rows_equal = (I_c == I_p).all(axis=1)
    rows_tie = (~rows_equal) & dist_close.all(axis=1)
    return {"fraction_equal_ids_by_position": pos_equal, "fraction_equal_ids_as_sets": overlap,
            "queries_identical": int(rows_equal.sum()), "queries_differing_only_by_ties": int(rows_tie.sum()),
            "queries_differing": int((~rows_equal & ~rows_tie).sum()),
            "max_abs_distance_diff": float(np.nanmax(np.abs(D_c - D_p)))}


def shard_memory(client) -> list[dict]:
    st = client.status()
    return [{"shard_id": s.shard_id, "vectors": int(s.vectors), "memory_bytes": int(s.memory_bytes),
             "index_bytes": int(s.index_bytes), "serving": bool(s.serving)} for s in st.shards]


def load(client, name: str, xb: np.ndarray, batch: int, timeout: float | None) -> dict:
    from tqdm import tqdm

    n = len(xb)
    bar = tqdm(total=n, unit="vec", unit_scale=True, desc=f"load {name}", mininterval=2.0, file=sys.stderr)

    def batches():
        for s in range(0, n, batch):
            e = min(n, s + batch)
            yield [str(i) for i in range(s, e)], xb[s:e]
            bar.update(e - s)

    snap = _MONITOR.snapshot() if _MONITOR else None
    t = time.perf_counter()
    count = client.upsert_stream(name, batches(), timeout=timeout)
    dt = time.perf_counter() - t
    bar.close()
    if count != n:
        raise RuntimeError(f"upsert_stream acknowledged {count} of {n} vectors")
    return {"collection": name, "vectors": n, "seconds": round(dt, 3), "vectors_per_s": n / dt,
            "foreign_cpu_cores": round(ForeignCpu.cores(snap, _MONITOR.snapshot()), 3) if snap else None}


def wait_idle(pids: list[int], max_s: float = 180.0, window: float = 1.0, cores: float = 0.15) -> float:
    """Waits until the shard processes together use less than ``cores`` CPUs over two consecutive windows (the
    background WAL compaction that follows a bulk load has finished). Returns the seconds waited."""
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
    while time.perf_counter() - t0 < max_s and quiet < 2:
        time.sleep(window)
        now = cpu()
        quiet = quiet + 1 if (now - last) / window < cores else 0
        last = now
    return time.perf_counter() - t0


def memory_table(empty: list[dict], loaded: list[dict], settled: list[dict], dim: int) -> list[dict]:
    """Per shard: the memory right after the load was acknowledged and once background work settled."""
    base = {s["shard_id"]: s["memory_bytes"] for s in empty}
    first = {s["shard_id"]: s["memory_bytes"] for s in loaded}
    rows = []
    for s in settled:
        raw = s["vectors"] * dim * 4
        empty_rss = base.get(s["shard_id"], 0)
        rss = s["memory_bytes"]
        rows.append({"shard_id": s["shard_id"], "vectors": s["vectors"], "raw_mib": raw / MiB,
                     "empty_rss_mib": empty_rss / MiB, "rss_after_load_mib": first.get(s["shard_id"], 0) / MiB,
                     "rss_mib": rss / MiB, "index_mib": s["index_bytes"] / MiB,
                     "rss_over_raw": rss / raw if raw else None,
                     "growth_over_raw": (rss - empty_rss) / raw if raw else None,
                     "budget_mib": (1.3 * raw + empty_rss) / MiB,
                     "meets_target": rss <= 1.3 * raw + empty_rss})
    return rows


def grpc_floor(port: int, seconds: float) -> dict:
    """Latency of a no-op unary gRPC call (grpc.health.v1 Check) to the router: the cost of one hop here."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lookalike.net import create_channel

    with create_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest(service="")
        xs = np.zeros((1000, 1), dtype=np.float32)  # measure() slices queries; the health check ignores them
        r = measure(lambda _q: stub.Check(req, timeout=10), xs, 1, seconds, 20_000)
    return r


# --- the run --------------------------------------------------------------------------------------------------
def run(args) -> dict:
    import faiss
    import ray

    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    k, dim, batches = args.k, args.dim, args.batches
    out: dict = {
        "config": {k2: v for k2, v in vars(args).items() if k2 != "out"},
        "machine": {"cpus": threads, "memory_gib": _total_memory_gib(), "platform": platform.platform(),
                    "python": platform.python_version(), "faiss": faiss.__version__, "ray": ray.__version__,
                    "numpy": np.__version__, "date": datetime.date.today().isoformat(),
                    "loadavg_at_start": list(os.getloadavg())},
        "search": [], "load": [], "notes": [],
    }
    per_shard = args.n / args.shards
    if per_shard < _shard_train_size(args.nlist, args.dim):
        out["notes"].append(
            f"about {per_shard:.0f} vectors per shard is below the {_shard_train_size(args.nlist, args.dim)} a shard needs "
            f"to train IVF{args.nlist}: the cluster's 'IVF' collection answers exactly from its untrained buffer")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    global _MONITOR
    _MONITOR = ForeignCpu()
    waited, others = _MONITOR.wait_quiet(args.quiet_wait)
    out["machine"]["quiet_wait_seconds"] = round(waited, 1)
    out["machine"]["foreign_cpu_cores_at_start"] = round(others, 3)
    log(f"other processes used {others:.2f} cores before the start (waited {waited:.0f}s for a quiet machine)")

    t = time.perf_counter()
    xb, xq = make_data(args.n, dim, args.queries, args.seed, clusters=args.clusters, noise=args.noise)
    log(f"generated {args.n} x {dim} vectors and {args.queries} queries in {time.perf_counter() - t:.1f}s")

    flat = faiss.IndexFlatL2(dim)
    flat.add(xb)
    t = time.perf_counter()
    gt_D, gt_I = flat.search(xq, k)
    out["ground_truth_seconds"] = round(time.perf_counter() - t, 3)
    log(f"exact ground truth for {args.queries} queries in {out['ground_truth_seconds']:.1f}s")

    own_dir = args.data_dir is None
    data_dir = tempfile.mkdtemp(prefix="lookalike-bench-") if own_dir else args.data_dir
    init_ray(max(threads, args.shards + 1))
    handle = server = router = client = None
    try:
        t = time.perf_counter()
        handle, router, server, port, client = start_local(data_dir, args.shards, args.shard_cpus)
        out["cluster_start_seconds"] = round(time.perf_counter() - t, 3)
        shard_pids = list(ray.get(handle.shard_pids.remote()).values())
        log(f"cluster of {args.shards} shards up in {out['cluster_start_seconds']:.1f}s; router on port {port}")

        def settle(what: str) -> None:
            waited = wait_idle(shard_pids)
            out.setdefault("settle_seconds", {})[what] = round(waited, 1)
            log(f"shards idle after {what} ({waited:.1f}s)")

        def bench_pair(index_name: str, cluster_search, inproc_search) -> None:
            variants = [("cluster", cluster_search, threads), ("in-process", inproc_search, threads)]
            if args.single_thread_baseline and threads > 1:
                variants.append(("in-process 1 thread", inproc_search, 1))
            for b in batches:
                for system, fn, nthreads in variants:
                    faiss.omp_set_num_threads(nthreads)
                    try:
                        r = measure(fn, xq, b, args.seconds, args.max_requests)
                    finally:
                        faiss.omp_set_num_threads(threads)
                    r.update(index=index_name, system=system)
                    out["search"].append(r)
                    log(f"{index_name} batch {b} {system}: {r['qps']:.1f} QPS, p50 {r['p50_ms']:.2f} ms, "
                        f"p99 {r['p99_ms']:.2f} ms ({r['requests']} requests)")

        # --- Flat ---------------------------------------------------------------------------------------------
        client.create_collection("flat", dim=dim, metric="l2", index="Flat")
        empty = shard_memory(client)
        out["memory_empty"] = empty
        out["load"].append(load(client, "flat", xb, args.load_batch, args.load_timeout))
        log(f"loaded flat: {out['load'][-1]['seconds']:.1f}s, {out['load'][-1]['vectors_per_s']:.0f} vectors/s")
        out["memory_flat_loaded"] = shard_memory(client)
        settle("flat load")
        out["memory_flat_settled"] = shard_memory(client)
        out["memory_flat"] = memory_table(empty, out["memory_flat_loaded"], out["memory_flat_settled"], dim)

        bench_pair("Flat", lambda q: client.search("flat", q, k=k), lambda q: flat.search(q, k))
        D_c, I_c = cluster_results(client, "flat", xq, k, 0)
        out["flat_check"] = compare_exact(D_c, I_c, gt_D, gt_I)
        out["recall"] = {"Flat": {"cluster": recall_at_k(I_c, gt_I), "in-process": 1.0, "in-process 1 thread": 1.0}}
        log(f"flat check: {out['flat_check']}")
        out["memory_flat_after_search"] = shard_memory(client)
        client.drop_collection("flat")
        out["memory_flat_dropped"] = shard_memory(client)

        # --- IVF ----------------------------------------------------------------------------------------------
        spec = f"IVF{args.nlist},Flat"
        client.create_collection("ivf", dim=dim, metric="l2", index=spec, nprobe=args.nprobe)
        out["load"].append(load(client, "ivf", xb, args.load_batch, args.load_timeout))
        log(f"loaded ivf: {out['load'][-1]['seconds']:.1f}s, {out['load'][-1]['vectors_per_s']:.0f} vectors/s")
        out["memory_ivf_loaded"] = shard_memory(client)

        nlist_p, nprobe_p = args.shards * args.nlist, args.shards * args.nprobe
        ivf = faiss.index_factory(dim, f"IVF{nlist_p},Flat", faiss.METRIC_L2)
        ntrain = min(args.n, args.shards * _shard_train_size(args.nlist, dim))  # as many points per list
        sample = xb[np.random.default_rng(args.seed + 1).choice(args.n, size=ntrain, replace=False)]
        settle("ivf load")
        t = time.perf_counter()
        ivf.train(sample)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        ivf.add(xb)
        add_s = time.perf_counter() - t
        del sample
        out["inprocess_ivf"] = {"spec": f"IVF{nlist_p},Flat", "nprobe": nprobe_p, "train_vectors": ntrain,
                                "train_seconds": round(train_s, 3), "add_seconds": round(add_s, 3)}
        log(f"in-process IVF{nlist_p},Flat: trained on {ntrain} in {train_s:.1f}s, added {args.n} in {add_s:.1f}s")
        params = faiss.SearchParametersIVF(nprobe=nprobe_p)

        bench_pair("IVF", lambda q: client.search("ivf", q, k=k, nprobe=args.nprobe),
                   lambda q: ivf.search(q, k, params=params))
        _, I_ci = cluster_results(client, "ivf", xq, k, args.nprobe)
        _, I_pi = ivf.search(xq, k, params=params)
        rp = recall_at_k(I_pi, gt_I)
        out["recall"]["IVF"] = {"cluster": recall_at_k(I_ci, gt_I), "in-process": rp, "in-process 1 thread": rp}
        log(f"IVF recall@{k}: {out['recall']['IVF']}")
        client.drop_collection("ivf")
        ivf.reset()  # frees the in-process lists before the last measurements

        # --- the fixed cost of the path -----------------------------------------------------------------------
        floor_s = min(args.seconds, 5.0)
        out["floor"] = {"grpc_noop_hop": grpc_floor(port, floor_s)}
        client.create_collection("tiny", dim=dim, metric="l2", index="Flat")
        client.upsert("tiny", [str(i) for i in range(1000)], xb[:1000])
        out["floor"]["tiny_search"] = measure(lambda q: client.search("tiny", q, k=k), xq, 1, floor_s,
                                              args.max_requests)
        client.drop_collection("tiny")
        log(f"floor: no-op gRPC hop p50 {out['floor']['grpc_noop_hop']['p50_ms']:.2f} ms; batch-1 search of a "
            f"1000-vector collection through the router p50 {out['floor']['tiny_search']['p50_ms']:.2f} ms")
    finally:
        teardown(client, server, router, handle)
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out["summary"] = summarize(out)
    return out


def init_ray(num_cpus: int) -> None:
    """Starts a private embedded Ray for the benchmark (token auth off unless RAY_AUTH_MODE says otherwise)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", namespace="lookalike", include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)


def start_local(data_dir: str, shards: int, shard_cpus: float, cluster_name: str = "bench",
                ready_timeout: float = 180.0):
    """On the connected Ray: a cluster of ``shards`` shard actors on ``data_dir`` (waits until every shard serves)
    and a router gRPC server in this process. Returns (controller handle, router, server, port, client); on a
    failure, stops what it had started (not Ray) and raises. ``ready_timeout``: seconds the shards may take to
    serve (loading their storage)."""
    from lookalike.config import ClusterConfig
    from control.ray_cluster import start_cluster, stop_cluster
    from lookalike.client import Client
    from router.core import Router
    from router.server import create_router_server

    handle, control = start_cluster(ClusterConfig(data_dir=data_dir, shards=shards, cluster_name=cluster_name,
                                                  shard_num_cpus=shard_cpus), ready_timeout=ready_timeout)
    router = server = None
    try:
        router = Router(control)
        server, port, _health = create_router_server(router, "127.0.0.1:0")
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

    from control.ray_cluster import stop_cluster

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


def _total_memory_gib() -> float:
    import psutil

    return round(psutil.virtual_memory().total / (1 << 30), 1)


def summarize(out: dict) -> dict:
    """Ratios and the issue's targets. The targets compare with in-process FAISS on all cores (as specified);
    ``vs_best`` repeats each against the faster of the in-process variants measured."""
    by = {(r["index"], r["batch"], r["system"]): r for r in out["search"]}
    ratios, targets = [], []
    for index in ("Flat", "IVF"):
        for b in out["config"]["batches"]:
            c, p = by.get((index, b, "cluster")), by.get((index, b, "in-process"))
            if not (c and p):
                continue
            p1 = by.get((index, b, "in-process 1 thread"))
            best = max((x for x in (p, p1) if x), key=lambda x: x["qps"])
            fastest_p50 = min((x for x in (p, p1) if x), key=lambda x: x["p50_ms"])
            row = {"index": index, "batch": b, "qps_ratio": c["qps"] / p["qps"],
                   "added_p50_ms": c["p50_ms"] - p["p50_ms"], "qps_ratio_vs_best": c["qps"] / best["qps"],
                   "added_p50_ms_vs_best": c["p50_ms"] - fastest_p50["p50_ms"]}
            ratios.append(row)
            if b == 100:
                targets.append({"target": f"{index}, batch 100: cluster QPS >= 0.8x in-process",
                                "measured": f"{row['qps_ratio']:.2f}x",
                                "vs_best": f"{row['qps_ratio_vs_best']:.2f}x",
                                "met": row["qps_ratio"] >= 0.8, "met_vs_best": row["qps_ratio_vs_best"] >= 0.8})
            if b == 1:
                targets.append({"target": f"{index}, batch 1: router adds <= 1 ms at p50",
                                "measured": f"{row['added_p50_ms']:+.2f} ms",
                                "vs_best": f"{row['added_p50_ms_vs_best']:+.2f} ms",
                                "met": row["added_p50_ms"] <= 1.0, "met_vs_best": row["added_p50_ms_vs_best"] <= 1.0})
    mem = out.get("memory_flat") or []
    if mem:
        worst = max(mem, key=lambda r: r["rss_mib"] / r["budget_mib"])
        met = all(r["meets_target"] for r in mem)
        targets.append({"target": "Flat shard RSS <= 1.3x raw vector bytes + fixed overhead (empty-collection RSS)",
                        "measured": f"worst {worst['shard_id']}: {worst['rss_mib']:.0f} MiB vs budget "
                                    f"{worst['budget_mib']:.0f} MiB ((RSS-empty)/raw = {worst['growth_over_raw']:.2f})",
                        "vs_best": "", "met": met, "met_vs_best": met})
    return {"ratios": ratios, "targets": targets}


# --- report ---------------------------------------------------------------------------------------------------
def markdown(out: dict) -> str:
    cfg, lines = out["config"], []
    add = lines.append
    rec = out.get("recall", {})
    m = out["machine"]
    add(f"N={cfg['n']} D={cfg['dim']} shards={cfg['shards']} (Ray CPUs {cfg['shard_cpus']} each, 1 FAISS thread) "
        f"queries={cfg['queries']} k={cfg['k']}; {m['cpus']} CPUs, {m['memory_gib']} GiB; "
        f"faiss {m['faiss']}, ray {m['ray']}, numpy {m['numpy']}, Python {m['python']}")
    add("")
    add("### Search")
    add("")
    add(f"Sequential requests, at most {cfg['seconds']:g}s or {cfg['max_requests']} requests per row after one "
        f"warm-up request. In-process: FAISS on all {m['cpus']} cores unless the row says 1 thread. \"Others' CPU\": "
        "cores used meanwhile by processes outside the benchmark (should be about 0).")
    add("")
    add(f"| index | batch | system | QPS | p50 ms | p99 ms | requests | recall@{cfg['k']} | others' CPU (cores) |")
    add("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in out["search"]:
        rc = rec.get(r["index"], {}).get(r["system"])
        add(f"| {r['index']} | {r['batch']} | {r['system']} | {r['qps']:.1f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['requests']} | {'' if rc is None else f'{rc:.3f}'} | "
            f"{_fmt(r.get('foreign_cpu_cores'))} |")
    add("")
    add("| index | batch | cluster / in-process QPS | router-added p50 (ms) | "
        "cluster / best in-process QPS | added p50 vs fastest in-process (ms) |")
    add("|---|---:|---:|---:|---:|---:|")
    for r in out["summary"]["ratios"]:
        add(f"| {r['index']} | {r['batch']} | {r['qps_ratio']:.2f}x | {r['added_p50_ms']:+.2f} | "
            f"{r['qps_ratio_vs_best']:.2f}x | {r['added_p50_ms_vs_best']:+.2f} |")
    if "flat_check" in out:
        fc = out["flat_check"]
        add("")
        add(f"Flat, cluster vs in-process ids over all {cfg['queries']} queries: "
            f"{fc['fraction_equal_ids_by_position']:.4f} equal by position, "
            f"{fc['fraction_equal_ids_as_sets']:.4f} as sets; {fc['queries_identical']} queries identical, "
            f"{fc['queries_differing_only_by_ties']} differ only by ties, {fc['queries_differing']} differ; "
            f"max |distance diff| {fc['max_abs_distance_diff']:.2e}.")
    if "inprocess_ivf" in out:
        ip = out["inprocess_ivf"]
        add("")
        add(f"IVF: the cluster holds IVF{cfg['nlist']},Flat per shard searched with nprobe {cfg['nprobe']}; in-process "
            f"{ip['spec']} with nprobe {ip['nprobe']}, trained on {ip['train_vectors']} sampled vectors in "
            f"{ip['train_seconds']:.1f}s, add {ip['add_seconds']:.1f}s.")
    if "floor" in out:
        fl = out["floor"]
        add("")
        add(f"Fixed cost of the path: a no-op gRPC call (health Check) to the router: p50 "
            f"{fl['grpc_noop_hop']['p50_ms']:.2f} ms, p99 {fl['grpc_noop_hop']['p99_ms']:.2f} ms; a batch-1 search of "
            f"a 1000-vector Flat collection through the router: p50 {fl['tiny_search']['p50_ms']:.2f} ms, "
            f"p99 {fl['tiny_search']['p99_ms']:.2f} ms.")
    add("")
    add(f"### Load (client -> router -> shards, one upsert_stream, batches of {cfg['load_batch']})")
    add("")
    add("| collection | vectors | seconds | vectors/s | others' CPU (cores) |")
    add("|---|---:|---:|---:|---:|")
    for r in out["load"]:
        add(f"| {r['collection']} | {r['vectors']} | {r['seconds']:.1f} | {r['vectors_per_s']:.0f} | "
            f"{_fmt(r.get('foreign_cpu_cores'))} |")
    if out.get("settle_seconds"):
        add("")
        add("Wait after each load until the shards were idle (background WAL compaction) before measuring: " +
            ", ".join(f"{k} {v:.0f}s" for k, v in out["settle_seconds"].items()) +
            " (2s, two quiet 1s windows, is the least the check takes: already idle).")
    if out.get("memory_flat"):
        add("")
        add("### Shard memory, Flat collection loaded")
        add("")
        add("RSS is the shard process's resident memory as ClusterStatus reports it, once the shards were idle "
            "again after the load; 'empty' is the same shard right after the collection was created.")
        add("")
        add("| shard | vectors | raw MiB | empty RSS MiB | RSS right after load MiB | RSS MiB | index MiB | RSS / raw | "
            "(RSS - empty) / raw | budget 1.3 raw + empty MiB | met |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in out["memory_flat"]:
            add(f"| {r['shard_id']} | {r['vectors']} | {r['raw_mib']:.1f} | {r['empty_rss_mib']:.1f} | "
                f"{r['rss_after_load_mib']:.1f} | {r['rss_mib']:.1f} | {r['index_mib']:.1f} | "
                f"{_fmt(r['rss_over_raw'])} | {_fmt(r['growth_over_raw'])} | {r['budget_mib']:.1f} | "
                f"{'yes' if r['meets_target'] else 'no'} |")
        if out.get("memory_flat_dropped"):
            add("")
            add("RSS after dropping the Flat collection (0 vectors): " +
                ", ".join(f"{s['shard_id']} {s['memory_bytes'] / MiB:.0f} MiB" for s in out["memory_flat_dropped"]) +
                ".")
    add("")
    add("### Targets")
    add("")
    add("| target | measured | met | vs best in-process variant | met |")
    add("|---|---|---|---|---|")
    for t in out["summary"]["targets"]:
        add(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} | {t['vs_best'] or '-'} | "
            f"{'yes' if t['met_vs_best'] else 'no'} |")
    for note in out.get("notes", []):
        add("")
        add(f"Note: {note}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2f}"


# --- CLI ------------------------------------------------------------------------------------------------------
def _at_least(kind, low):
    """argparse type: a number of ``kind`` no smaller than ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes whole numbers separated by commas, e.g. 1,100; got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text}")
    return sizes


def build_parser(prog: str = "python -m bench.cluster_bench",
                 parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags (``lookalike bench`` passes its own prog and parser class: one-line errors)."""
    count = _at_least(int, 1)
    p = parser_class(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=count, default=1_000_000, help="vectors (default 1000000)")
    p.add_argument("--dim", type=count, default=128, help="components per vector (default 128)")
    p.add_argument("--shards", type=count, default=4, help="shards of the cluster (default 4)")
    p.add_argument("--queries", type=count, default=1000, help="distinct query vectors (default 1000)")
    p.add_argument("--seconds", type=_at_least(float, 0.01), default=10.0,
                   help="time bound of each measurement (default 10)")
    p.add_argument("--max-requests", type=count, default=10_000,
                   help="request bound of each measurement (default 10000)")
    p.add_argument("--batches", type=_batches, default=[1, 100],
                   help="queries per search request, comma-separated (default 1,100)")
    p.add_argument("--k", type=count, default=10, help="neighbours per query (default 10)")
    p.add_argument("--nlist", type=count, default=1024,
                   help="IVF lists per shard (in-process: shards x nlist; default 1024)")
    p.add_argument("--nprobe", type=count, default=16,
                   help="IVF lists probed per shard (in-process: shards x nprobe; default 16)")
    p.add_argument("--clusters", type=count, default=1000, help="centroids of the generated data (default 1000)")
    p.add_argument("--noise", type=_at_least(float, 0), default=1.5,
                   help="noise around each centroid (centroids: N(0, 1); default 1.5)")
    p.add_argument("--no-single-thread-baseline", dest="single_thread_baseline", action="store_false",
                   help="skip the extra in-process measurement with one FAISS thread")
    p.add_argument("--shard-cpus", type=_at_least(float, 0.01), default=0.5,
                   help="Ray CPUs per shard actor (default 0.5)")
    p.add_argument("--load-batch", type=count, default=10_000, help="vectors per upsert message (default 10000)")
    p.add_argument("--load-timeout", type=_at_least(float, 0.01), default=None,
                   help="deadline of each bulk load, seconds (default: none)")
    p.add_argument("--quiet-wait", type=_at_least(float, 0), default=120.0,
                   help="seconds to wait at the start for other processes to leave the CPUs alone (default 120)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data (default 0)")
    p.add_argument("--data-dir", default=None, help="cluster storage (default: a temporary directory, removed)")
    p.add_argument("--out", default="bench/out/cluster.json", help="JSON results (default bench/out/cluster.json)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench.cluster_bench",
         parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `lookalike bench -- --n ...` passes the separator through
        argv = argv[1:]
    args = build_parser(prog, parser_class).parse_args(argv)
    out = run(args)
    print(markdown(out), flush=True)
    write_results(out, args.out)
    return 0


def write_results(out: dict, path: str) -> None:
    """Every number of a benchmark run as JSON at ``path`` (directories made), said on stderr."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
