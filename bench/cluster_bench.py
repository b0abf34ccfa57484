"""Router vs in-process FAISS, side by side on the same data: search QPS and latency, load rate, shard memory.

    python -m bench.cluster_bench [--n 1000000] [--dim 128] [--shards 4] [--queries 1000] [--seconds 10]
                                  [--out bench/out/cluster.json]

What it does, in one process:

1. generates ``n`` clustered float32 vectors (a random centroid plus Gaussian noise each) and ``queries``
   query vectors from the same distribution, seeded;
2. starts an embedded local Ray with a real cluster (the controller actor and ``shards`` shard actors, each
   serving gRPC) and the router's gRPC server in this process, and talks to it with ``router.client.Client``
   (client -> router -> shards, all over gRPC on localhost);
3. Flat: bulk-loads the vectors (``upsert_stream``, ids ``str(i)``) and measures the shards' memory before and
   after; searches through the router and an in-process ``faiss.IndexFlatL2`` over all vectors; checks that the
   cluster returns the same ids as the in-process index;
4. IVF: drops the Flat collection, loads an ``IVF{nlist},Flat`` collection (one IVF index per shard) and compares
   it with an in-process ``IVF{shards*nlist},Flat`` searched with ``shards*nprobe`` lists, so that both scan about
   the same fraction of the data; recall@k of both against the exact results.

Each (index, batch size, system) measurement runs sequential requests, one at a time, for at most ``--seconds``
seconds (or ``--max-requests`` requests) after one warm-up request; QPS is queries answered per wall second and
p50/p99 are per-request latencies. A Markdown report goes to stdout and every number to ``--out`` (JSON).
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
# A shard's IVF index is trained once it holds this many vectors per list (shard.index._POINTS_PER_CENTROID).
_POINTS_PER_CENTROID = 39


# --- data -----------------------------------------------------------------------------------------------------
def make_data(n: int, dim: int, nq: int, seed: int, clusters: int = 1000, noise: float = 0.5,
              chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(xb shape (n, dim), xq shape (nq, dim)) float32: each vector is a random centroid plus Gaussian noise.

    Centroids are standard normal and cluster sizes uneven (gamma-distributed weights), so the data is clustered
    but not trivially so (noise 0.5 puts a point about half as far from its centroid as centroids are apart).
    """
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((clusters, dim), dtype=np.float32)
    weights = rng.gamma(2.0, size=clusters)
    weights /= weights.sum()

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for s in range(0, count, chunk):
            e = min(count, s + chunk)
            assign = rng.choice(clusters, size=e - s, p=weights)
            out[s:e] = centroids[assign]
            out[s:e] += noise * rng.standard_normal((e - s, dim), dtype=np.float32)
        return out

    return draw(n), draw(nq)


# --- measuring ------------------------------------------------------------------------------------------------
def measure(search, xq: np.ndarray, batch: int, seconds: float, max_requests: int, warmup: int = 1) -> dict:
    """Sequential requests of ``batch`` queries (cycling over xq) until ``seconds`` pass or ``max_requests`` ran."""
    starts = list(range(0, max(1, len(xq) - batch + 1), batch))
    for i in range(warmup):
        s = starts[i % len(starts)]
        search(xq[s:s + batch])
    lat = []
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
            "mean_ms": float(ms.mean())}


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

    t = time.perf_counter()
    count = client.upsert_stream(name, batches(), timeout=timeout)
    dt = time.perf_counter() - t
    bar.close()
    if count != n:
        raise RuntimeError(f"upsert_stream acknowledged {count} of {n} vectors")
    return {"collection": name, "vectors": n, "seconds": round(dt, 3), "vectors_per_s": n / dt}


def memory_table(empty: list[dict], loaded: list[dict], dim: int) -> list[dict]:
    base = {s["shard_id"]: s["memory_bytes"] for s in empty}
    rows = []
    for s in loaded:
        raw = s["vectors"] * dim * 4
        empty_rss = base.get(s["shard_id"], 0)
        rss = s["memory_bytes"]
        rows.append({"shard_id": s["shard_id"], "vectors": s["vectors"], "raw_mib": raw / MiB,
                     "empty_rss_mib": empty_rss / MiB, "rss_mib": rss / MiB, "index_mib": s["index_bytes"] / MiB,
                     "rss_over_raw": rss / raw if raw else None,
                     "growth_over_raw": (rss - empty_rss) / raw if raw else None,
                     "budget_mib": (1.3 * raw + empty_rss) / MiB,
                     "meets_target": rss <= 1.3 * raw + empty_rss})
    return rows


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
                    "numpy": np.__version__, "date": datetime.date.today().isoformat()},
        "search": [], "load": [], "notes": [],
    }
    per_shard = args.n / args.shards
    if per_shard < _POINTS_PER_CENTROID * args.nlist:
        out["notes"].append(
            f"about {per_shard:.0f} vectors per shard is below the {_POINTS_PER_CENTROID * args.nlist} a shard needs "
            f"to train IVF{args.nlist}: the cluster's 'IVF' collection answers exactly from its untrained buffer")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    xb, xq = make_data(args.n, dim, args.queries, args.seed)
    log(f"generated {args.n} x {dim} vectors and {args.queries} queries in {time.perf_counter() - t:.1f}s")

    flat = faiss.IndexFlatL2(dim)
    flat.add(xb)
    t = time.perf_counter()
    gt_D, gt_I = flat.search(xq, k)
    out["ground_truth_seconds"] = round(time.perf_counter() - t, 3)
    log(f"exact ground truth for {args.queries} queries in {out['ground_truth_seconds']:.1f}s")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from lookalike.config import ClusterConfig
    from lookalike.ray_cluster import start_cluster, stop_cluster
    from router.client import Client
    from router.core import Router
    from router.server import create_router_server

    own_dir = args.data_dir is None
    data_dir = tempfile.mkdtemp(prefix="lookalike-bench-") if own_dir else args.data_dir
    ray.init(namespace="lookalike", include_dashboard=False, num_cpus=max(threads, args.shards + 1),
             log_to_driver=False)
    handle = server = router = client = None
    try:
        t = time.perf_counter()
        handle, control = start_cluster(ClusterConfig(data_dir=data_dir, shards=args.shards, cluster_name="bench",
                                                      shard_num_cpus=args.shard_cpus))
        router = Router(control)
        server, port, _health = create_router_server(router, "127.0.0.1:0")
        client = Client(f"127.0.0.1:{port}", timeout=600)
        out["cluster_start_seconds"] = round(time.perf_counter() - t, 3)
        log(f"cluster of {args.shards} shards up in {out['cluster_start_seconds']:.1f}s; router on port {port}")

        def bench_pair(index_name: str, cluster_search, inproc_search) -> None:
            for b in batches:
                for system, fn in (("cluster", cluster_search), ("in-process", inproc_search)):
                    r = measure(fn, xq, b, args.seconds, args.max_requests)
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
        loaded = shard_memory(client)
        out["memory_flat_loaded"] = loaded
        out["memory_flat"] = memory_table(empty, loaded, dim)

        bench_pair("Flat", lambda q: client.search("flat", q, k=k), lambda q: flat.search(q, k))
        D_c, I_c = cluster_results(client, "flat", xq, k, 0)
        out["flat_check"] = compare_exact(D_c, I_c, gt_D, gt_I)
        out["recall"] = {"Flat": {"cluster": recall_at_k(I_c, gt_I), "in-process": 1.0}}
        log(f"flat check: {out['flat_check']}")
        out["memory_flat_after_search"] = shard_memory(client)
        client.drop_collection("flat")

        # --- IVF ----------------------------------------------------------------------------------------------
        spec = f"IVF{args.nlist},Flat"
        client.create_collection("ivf", dim=dim, metric="l2", index=spec, nprobe=args.nprobe)
        out["memory_ivf_empty"] = shard_memory(client)
        out["load"].append(load(client, "ivf", xb, args.load_batch, args.load_timeout))
        log(f"loaded ivf: {out['load'][-1]['seconds']:.1f}s, {out['load'][-1]['vectors_per_s']:.0f} vectors/s")
        out["memory_ivf_loaded"] = shard_memory(client)

        nlist_p, nprobe_p = args.shards * args.nlist, args.shards * args.nprobe
        ivf = faiss.index_factory(dim, f"IVF{nlist_p},Flat", faiss.METRIC_L2)
        ntrain = min(args.n, _POINTS_PER_CENTROID * nlist_p)
        sample = xb[np.random.default_rng(args.seed + 1).choice(args.n, size=ntrain, replace=False)]
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
        out["recall"]["IVF"] = {"cluster": recall_at_k(I_ci, gt_I), "in-process": recall_at_k(I_pi, gt_I)}
        log(f"IVF recall@{k}: {out['recall']['IVF']}")
        client.drop_collection("ivf")
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop(None)
        if router is not None:
            router.close()
        if handle is not None:
            stop_cluster(handle)
        ray.shutdown()
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    out["summary"] = summarize(out)
    return out


def _total_memory_gib() -> float:
    import psutil

    return round(psutil.virtual_memory().total / (1 << 30), 1)


def summarize(out: dict) -> dict:
    """Ratios and the issue's targets."""
    by = {(r["index"], r["batch"], r["system"]): r for r in out["search"]}
    ratios, targets = [], []
    for index in ("Flat", "IVF"):
        for b in out["config"]["batches"]:
            c, p = by.get((index, b, "cluster")), by.get((index, b, "in-process"))
            if not (c and p):
                continue
            row = {"index": index, "batch": b, "qps_ratio": c["qps"] / p["qps"],
                   "added_p50_ms": c["p50_ms"] - p["p50_ms"]}
            ratios.append(row)
            if b == 100:
                targets.append({"target": f"{index}, batch 100: cluster QPS >= 0.8x in-process",
                                "measured": f"{row['qps_ratio']:.2f}x", "met": row["qps_ratio"] >= 0.8})
            if b == 1:
                targets.append({"target": f"{index}, batch 1: router adds <= 1 ms at p50",
                                "measured": f"{row['added_p50_ms']:+.2f} ms", "met": row["added_p50_ms"] <= 1.0})
    mem = out.get("memory_flat") or []
    if mem:
        worst = max(mem, key=lambda r: r["rss_mib"] / r["budget_mib"])
        targets.append({"target": "Flat shard RSS <= 1.3x raw vector bytes + fixed overhead (empty-collection RSS)",
                        "measured": f"worst {worst['shard_id']}: {worst['rss_mib']:.0f} MiB vs budget "
                                    f"{worst['budget_mib']:.0f} MiB ((RSS-empty)/raw = {worst['growth_over_raw']:.2f})",
                        "met": all(r["meets_target"] for r in mem)})
    return {"ratios": ratios, "targets": targets}


# --- report ---------------------------------------------------------------------------------------------------
def markdown(out: dict) -> str:
    cfg, lines = out["config"], []
    add = lines.append
    rec = out.get("recall", {})
    add(f"N={cfg['n']} D={cfg['dim']} shards={cfg['shards']} queries={cfg['queries']} k={cfg['k']}; "
        f"{out['machine']['cpus']} CPUs; faiss {out['machine']['faiss']}, ray {out['machine']['ray']}")
    add("")
    add("### Search")
    add("")
    add("| index | batch | system | QPS | p50 ms | p99 ms | requests | recall@%d |" % cfg["k"])
    add("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in out["search"]:
        rc = rec.get(r["index"], {}).get(r["system"])
        add(f"| {r['index']} | {r['batch']} | {r['system']} | {r['qps']:.1f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['requests']} | {'' if rc is None else f'{rc:.3f}'} |")
    add("")
    add("| index | batch | cluster / in-process QPS | router-added p50 (ms) |")
    add("|---|---:|---:|---:|")
    for r in out["summary"]["ratios"]:
        add(f"| {r['index']} | {r['batch']} | {r['qps_ratio']:.2f}x | {r['added_p50_ms']:+.2f} |")
    if "flat_check" in out:
        fc = out["flat_check"]
        add("")
        add(f"Flat, cluster vs in-process ids: {fc['fraction_equal_ids_by_position']:.4f} equal by position, "
            f"{fc['fraction_equal_ids_as_sets']:.4f} as sets; {fc['queries_identical']} queries identical, "
            f"{fc['queries_differing_only_by_ties']} differ only by ties, {fc['queries_differing']} differ; "
            f"max |distance diff| {fc['max_abs_distance_diff']:.2e}")
    if "inprocess_ivf" in out:
        ip = out["inprocess_ivf"]
        add(f"In-process IVF: {ip['spec']}, nprobe {ip['nprobe']}, trained on {ip['train_vectors']} vectors in "
            f"{ip['train_seconds']:.1f}s, add {ip['add_seconds']:.1f}s. Cluster: IVF{cfg['nlist']},Flat per shard, "
            f"nprobe {cfg['nprobe']}.")
    add("")
    add("### Load (client -> router -> shards, one upsert_stream, batches of %d)" % cfg["load_batch"])
    add("")
    add("| collection | vectors | seconds | vectors/s |")
    add("|---|---:|---:|---:|")
    for r in out["load"]:
        add(f"| {r['collection']} | {r['vectors']} | {r['seconds']:.1f} | {r['vectors_per_s']:.0f} |")
    if out.get("memory_flat"):
        add("")
        add("### Shard memory, Flat collection loaded")
        add("")
        add("| shard | vectors | raw MiB | empty RSS MiB | RSS MiB | index MiB | RSS / raw | (RSS - empty) / raw | "
            "budget 1.3 raw + empty MiB | met |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in out["memory_flat"]:
            add(f"| {r['shard_id']} | {r['vectors']} | {r['raw_mib']:.1f} | {r['empty_rss_mib']:.1f} | "
                f"{r['rss_mib']:.1f} | {r['index_mib']:.1f} | {_fmt(r['rss_over_raw'])} | "
                f"{_fmt(r['growth_over_raw'])} | {r['budget_mib']:.1f} | {'yes' if r['meets_target'] else 'no'} |")
    add("")
    add("### Targets")
    add("")
    add("| target | measured | met |")
    add("|---|---|---|")
    for t in out["summary"]["targets"]:
        add(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    for note in out.get("notes", []):
        add("")
        add(f"Note: {note}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2f}"


# --- CLI ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1000000)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0, help="time bound of each measurement")
    p.add_argument("--max-requests", type=int, default=10_000, help="request bound of each measurement")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 100],
                   help="queries per search request, comma-separated (default 1,100)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists per shard (in-process: shards x nlist)")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per shard (in-process: shards x nprobe)")
    p.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor")
    p.add_argument("--load-batch", type=int, default=10_000, help="vectors per upsert message")
    p.add_argument("--load-timeout", type=float, default=None, help="deadline of each bulk load, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="cluster storage (default: a temporary directory, removed)")
    p.add_argument("--out", default="bench/out/cluster.json", help="JSON results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    text = markdown(out)
    print(text, flush=True)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
