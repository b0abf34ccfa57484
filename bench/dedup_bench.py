"""Dedup of a whole collection through the cluster vs FAISS self-joins in this process, on the same data.

    python -m bench.dedup_bench [--n 1000000] [--dim 128] [--shards 2] [--nlist 1024] [--nprobe 16]
                                [--sample 20000] [--out bench/out/dedup.json] [--project 40000000]
    python -m bench.dedup_bench --report bench/out/dedup.json

1. Generates ``n`` clustered float32 vectors (bench.common.make_data) in which ``--dup-fraction`` of the
   rows are near-copies of other rows, in planted groups of 2-5 (Gaussian noise of ``--dup-noise``), seeded.
2. Starts an embedded Ray cluster (controller, ``shards`` shard actors, the jobs actor) and a router, loads the
   vectors into an ``IVF{nlist},Flat`` collection and runs ``lookalike dedup``'s job through the gRPC API
   (``StartJob`` then ``GetJob`` until it ends): every vector searched against all shards (k neighbours), pairs
   within the threshold joined into groups. Wall time and vectors per second.
3. In this process, on the same vectors: the same self-join with one ``IVF{shards*nlist},Flat`` index searched
   with ``shards*nprobe`` lists (about the same fraction scanned), and the exact brute-force self-join
   (``IndexFlatL2``) on a sample of ``--sample`` query rows against all ``n``, whose time is scaled to ``n``
   queries (its cost is linear in the number of queries).
4. Checks: the groups found equal the planted groups; on the sample, the pairs within the threshold that the
   exact join finds and the cluster's job also found (pair recall).

A Markdown report goes to stdout and every number to ``--out`` (JSON); it ends with the times projected for
``--project`` vectors (40M by default): on this machine from the measured rates, and on one H100 from the card's
ceilings (lower bounds; ``--report JSON`` prints the report of an earlier run again).
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
import time

import numpy as np

from bench.common import load, teardown, wait_idle
from bench.timing import make_data
from control.ray_cluster import start_cluster, start_jobs, stop_jobs
from jobs.dedup import group_pairs
from lookalike.client import Client
from lookalike.config import ClusterConfig
from router.core import Router
from router.server import create_router_server


def plant_duplicates(xb: np.ndarray, fraction: float, noise: float, seed: int) -> list[list[int]]:
    """Overwrites about ``fraction`` of the rows with near-copies of other rows, in groups of 2-5 (the original and
    1-4 copies). Returns the planted groups as sorted row numbers."""
    rng = np.random.default_rng(seed + 1)
    n, dim = xb.shape
    order = rng.permutation(n)
    groups, at, copies_left = [], 0, int(n * fraction)
    while copies_left > 0 and at + 5 <= n:
        size = int(rng.integers(2, 6))
        rows = order[at:at + size]
        at += size
        base = xb[rows[0]]
        xb[rows[1:]] = base + noise * rng.standard_normal((size - 1, dim), dtype=np.float32)
        groups.append(sorted(rows.tolist()))
        copies_left -= size - 1
    return groups


def self_join(index, xb: np.ndarray, k: int, threshold: float, rows: np.ndarray | None = None,
              batch: int = 8192) -> tuple[set[tuple[int, int]], float]:
    """Pairs (i < j) within ``threshold`` among each query row's k+1 nearest neighbours; (pairs, seconds)."""
    rows = np.arange(len(xb)) if rows is None else rows
    pairs: set[tuple[int, int]] = set()
    t = time.perf_counter()
    for s in range(0, len(rows), batch):
        q = rows[s:s + batch]
        D, I = index.search(xb[q], k + 1)
        hit = (D <= threshold) & (I >= 0) & (I != q[:, None])
        for a, b in zip(np.repeat(q, hit.sum(axis=1)).tolist(), I[hit].tolist()):
            pairs.add((min(a, b), max(a, b)))
    return pairs, time.perf_counter() - t


def groups_of_pairs(pairs) -> list[list[int]]:
    if not pairs:
        return []
    a, b = zip(*sorted(pairs))
    return sorted(sorted(int(i) for i in ids) for ids, _ in group_pairs([str(i) for i in a], [str(i) for i in b],
                                                                        np.zeros(len(a)), False))


def run(args) -> dict:
    import faiss
    import ray

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    threads = os.cpu_count() or 1
    out: dict = {"args": vars(args), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"cpus": threads, "python": platform.python_version(), "faiss": faiss.__version__}}
    t = time.perf_counter()
    xb, _ = make_data(args.n, args.dim, 1, args.seed)
    planted = plant_duplicates(xb, args.dup_fraction, args.dup_noise, args.seed)
    out["planted_groups"] = len(planted)
    out["planted_items"] = sum(len(g) for g in planted)
    log(f"{args.n} x {args.dim} vectors with {len(planted)} planted groups ({out['planted_items']} items) in "
        f"{time.perf_counter() - t:.1f}s")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    data_dir = tempfile.mkdtemp(prefix="lookalike-dedup-bench-")
    ray.init(address="local", namespace="lookalike", include_dashboard=False, num_cpus=max(threads, args.shards + 1),
             log_to_driver=False)
    handle = server = router = client = jobs = None
    try:
        cfg = ClusterConfig(data_dir=data_dir, shards=args.shards, cluster_name="dedupbench")
        handle, control = start_cluster(cfg)
        jobs = start_jobs(cfg)
        router = Router(control)
        server, port, _health = create_router_server(router, "127.0.0.1:0", jobs=jobs)
        client = Client(f"127.0.0.1:{port}", timeout=600)
        shard_pids = list(ray.get(handle.shard_pids.remote()).values())
        index = f"IVF{args.nlist},Flat"
        client.create_collection("dd", args.dim, "l2", index, nprobe=args.nprobe)
        out["load"] = load(client, "dd", xb, 2000, None)
        log(f"loaded {index} at {out['load']['vectors_per_s']:,.0f} vectors/s")
        wait_idle(shard_pids)

        t = time.perf_counter()
        job = client.start_dedup("dd", args.threshold, k=args.k, batch=args.batch)
        last = [0.0]

        def progress(j):
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                log(f"dedup {j.done}/{j.total} ({json.loads(j.summary_json or '{}')})")

        job = client.wait_job(job.id, poll_s=1.0, on_progress=progress)
        wall = time.perf_counter() - t
        if job.state != job.SUCCEEDED:
            raise RuntimeError(f"dedup job ended {job.state}: {job.message}")
        groups = [sorted(int(i) for i in g.ids) for g in client.dedup_groups(job.id)]
        summary = json.loads(job.summary_json)
        out["cluster"] = {"index": index, "nprobe": args.nprobe, "shards": args.shards, "seconds": round(wall, 2),
                          "vectors_per_s": round(args.n / wall, 1), "pairs": summary["pairs"],
                          "groups": len(groups), "groups_equal_planted": sorted(groups) == sorted(planted)}
        log(f"cluster dedup: {wall:.1f}s, {args.n / wall:,.0f} vectors/s, {len(groups)} groups "
            f"(planted {len(planted)}, equal: {out['cluster']['groups_equal_planted']})")
        sample_rows = np.random.default_rng(args.seed + 2).choice(args.n, size=min(args.sample, args.n),
                                                                  replace=False)
        sample_set = set(sample_rows.tolist())
        found_pairs = set()
        for g in groups:
            for a in g:
                for b in g:
                    if a < b:
                        found_pairs.add((a, b))
    finally:
        if jobs is not None:
            stop_jobs(jobs)
        teardown(client, server, router, handle)

    faiss.omp_set_num_threads(threads)
    # in-process IVF self-join, about the same fraction scanned
    t = time.perf_counter()
    nlist = args.shards * args.nlist
    ivf = faiss.index_factory(args.dim, f"IVF{nlist},Flat")
    train = xb[np.random.default_rng(args.seed + 3).choice(args.n, size=min(args.n, 64 * nlist), replace=False)]
    ivf.train(train)
    ivf.add(xb)
    ivf.nprobe = args.shards * args.nprobe
    build = time.perf_counter() - t
    ivf_pairs, ivf_s = self_join(ivf, xb, args.k, args.threshold, batch=args.batch)
    ivf_groups = groups_of_pairs(ivf_pairs)
    out["faiss_ivf"] = {"index": f"IVF{nlist},Flat", "nprobe": ivf.nprobe, "build_seconds": round(build, 2),
                        "join_seconds": round(ivf_s, 2), "vectors_per_s": round(args.n / ivf_s, 1),
                        "groups_equal_planted": ivf_groups == sorted(planted)}
    log(f"in-process IVF self-join: {ivf_s:.1f}s (+{build:.1f}s build), {args.n / ivf_s:,.0f} vectors/s")
    del ivf
    # exact brute force on a sample of query rows
    flat = faiss.IndexFlatL2(args.dim)
    flat.add(xb)
    exact_pairs, exact_s = self_join(flat, xb, args.k, args.threshold, rows=np.sort(sample_rows), batch=args.batch)
    touched = {p for p in found_pairs if p[0] in sample_set or p[1] in sample_set}
    recall = len(exact_pairs & touched) / len(exact_pairs) if exact_pairs else 1.0
    projected = exact_s * args.n / len(sample_rows)
    out["faiss_exact"] = {"sample_queries": len(sample_rows), "seconds": round(exact_s, 2),
                          "vectors_per_s": round(len(sample_rows) / exact_s, 1),
                          "projected_seconds_full": round(projected, 1), "pairs_in_sample": len(exact_pairs),
                          "cluster_pair_recall": round(recall, 4)}
    log(f"exact self-join: {len(sample_rows)} queries in {exact_s:.1f}s -> {projected:.0f}s projected for all "
        f"{args.n}; cluster pair recall on the sample {recall:.4f}")
    c, f, e = out["cluster"], out["faiss_ivf"], out["faiss_exact"]
    out["ratios"] = {"cluster_vs_faiss_ivf": round(f["join_seconds"] / c["seconds"], 3),
                     "cluster_vs_faiss_exact_projected": round(e["projected_seconds_full"] / c["seconds"], 2)}
    return out


# One H100 SXM, from NVIDIA's data sheet: the ceilings a GPU projection is bounded by (not a measurement).
H100_FP32_FLOPS = 67e12
H100_BYTES_PER_S = 3.35e12


def project(out: dict, n_target: int) -> list[str]:
    """Projected dedup times for ``n_target`` vectors, from this run's measured rates (CPU) and from an H100's
    ceilings (GPU: lower bounds, not measured). The IVF join's cost per query is the vectors it scans: with lists
    of the same length (nlist growing with n) and the same nprobe it stays the same, so its time grows with n; the
    exact join's grows with n squared."""
    a, c, e = out["args"], out["cluster"], out["faiss_exact"]
    n, d, scale = a["n"], a["dim"], n_target / a["n"]
    scanned = a["shards"] * a["nprobe"] * (n / a["shards"]) / a["nlist"]  # vectors one query scans
    ivf_flop, ivf_bytes = n_target * scanned * 2 * d, n_target * scanned * 4 * d
    gpu_ivf = max(ivf_flop / H100_FP32_FLOPS, ivf_bytes / H100_BYTES_PER_S)
    gpu_exact = 2.0 * n_target * n_target * d / H100_FP32_FLOPS
    hours = lambda s: f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.1f} min"  # noqa: E731
    return [
        f"Projected for {n_target:,} vectors ({n_target * d * 4 / 2**30:.0f} GiB of float32: fits one 80 GB GPU):",
        "",
        "| where | how | projected time |",
        "|---|---|---|",
        f"| this machine, lookalike dedup job | measured {c['seconds']:.0f} s x {scale:.0f} (lists of the same length, "
        f"{scanned:,.0f} vectors scanned per query) | {hours(c['seconds'] * scale)} |",
        f"| this machine, FAISS brute force | measured {e['projected_seconds_full']:.0f} s x {scale:.0f}^2 "
        f"| {hours(e['projected_seconds_full'] * scale ** 2)} |",
        f"| one H100, IVF-Flat join (estimate: lower bound) | max({ivf_flop:.1e} flop / 67 TFLOPS, "
        f"{ivf_bytes:.1e} B / 3.35 TB/s) | >= {hours(gpu_ivf)} |",
        f"| one H100, brute force (estimate: lower bound) | {gpu_exact * H100_FP32_FLOPS:.1e} flop / 67 TFLOPS FP32 "
        f"| >= {hours(gpu_exact)} |",
        "",
        "The GPU rows are the card's ceilings, not a measured rate: no GPU was lent to this run.",
    ]


def report(out: dict, n_target: int = 40_000_000) -> str:
    c, f, e, r = out["cluster"], out["faiss_ivf"], out["faiss_exact"], out["ratios"]
    n = out["args"]["n"]
    lines = [
        f"Dedup of {n:,} x {out['args']['dim']} vectors ({out['planted_groups']:,} planted groups, "
        f"{out['planted_items']:,} items; threshold {out['args']['threshold']}, k {out['args']['k']}) on "
        f"{out['machine']['cpus']} cores",
        "",
        "| system | index | wall time | vectors/s | groups = planted | vs cluster |",
        "|---|---|---|---|---|---|",
        f"| lookalike dedup job ({c['shards']} shards, gRPC) | {c['index']} nprobe {c['nprobe']} | {c['seconds']:.1f} s "
        f"| {c['vectors_per_s']:,.0f} | {c['groups_equal_planted']} | 1.00 |",
        f"| in-process FAISS self-join | {f['index']} nprobe {f['nprobe']} | {f['join_seconds']:.1f} s "
        f"(+{f['build_seconds']:.1f} s build) | {f['vectors_per_s']:,.0f} | {f['groups_equal_planted']} "
        f"| cluster is {r['cluster_vs_faiss_ivf']:.2f}x its speed |",
        f"| in-process FAISS brute force | Flat (exact) | {e['projected_seconds_full']:.0f} s projected "
        f"({e['sample_queries']:,} queries took {e['seconds']:.1f} s) | {e['vectors_per_s']:,.0f} | - "
        f"| cluster is {r['cluster_vs_faiss_exact_projected']:.1f}x faster |",
        "",
        f"Pair recall of the cluster's job against the exact join on the {e['sample_queries']:,} sampled rows: "
        f"{e['cluster_pair_recall']:.4f} ({e['pairs_in_sample']} pairs).",
        "",
        *project(out, n_target),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threshold", type=float, default=0.5, help="squared L2 (default 0.5)")
    p.add_argument("--dup-fraction", type=float, default=0.01, help="rows that are planted copies (default 0.01)")
    p.add_argument("--dup-noise", type=float, default=0.02, help="noise of a copy, per component (default 0.02)")
    p.add_argument("--sample", type=int, default=20000, help="query rows of the exact join (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/dedup.json")
    p.add_argument("--project", type=int, default=40_000_000, help="catalog size to project to (default 40M)")
    p.add_argument("--report", metavar="JSON", help="print the report of an earlier run's --out file; run nothing")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(pathlib.Path(args.report).read_text()), args.project))
        return 0
    out = run(args)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2))
    print(report(out, args.project))
    return 0


if __name__ == "__main__":
    sys.exit(main())
