"""Shared quantizer: should the router quantize the queries once, or each shard for itself? In-process, no cluster.

    python -m bench.preassign_bench [--n 1000000] [--dim 128] [--nlists 1024,4096] [--pq 16,32]
                                    [--shards 1,2,4,8] [--batches 100,1] [--out bench/out/preassign.json]

With one trained index per collection, every shard holds a copy of the same trained empty IVF index (same coarse
centroids, same PQ codebooks) filled with its own buckets. A search can then be run two ways:

(a) per shard: each of S shards runs the full ``index.search`` (it quantizes the queries itself: S x the coarse
    quantization), the router merges the S top-k lists (``faiss.merge_knn_results``);
(b) once: the router runs ``quantizer.search(xq, nprobe)`` once and each shard runs
    ``index.search_preassigned(xq, k, Iq, Dq)``, merged the same way;

and both are compared with (c), one index holding all the vectors. For each IVF{nlist} the coarse centroids are
trained once (on ``--train-per-list`` points per list) and shared by IVF{nlist},Flat and IVF{nlist},PQ{m} (whose
PQ codebooks are trained on the residuals); the vectors are assigned to their lists once and added with
``add_core``, so building S shards costs no extra quantization. Vector i (id ``str(i)``) goes to bucket
``hash(str(i)) % --buckets`` (lookalike.ids) and bucket b to shard ``b % S``; shards are clones
(serialize/deserialize) of the trained empty index.

nprobe: for each nlist, the smallest value of a sweep at which IVF{nlist},Flat reaches recall@k >= --target
against exact search (``faiss.knn``). PQ uses the same nprobe (the coarse part, and so the quantization cost, is the
same; PQ's own recall is capped by its codes and is reported, not targeted).

Checks: (a) and (b) return exactly the ids of (c) at that nprobe (ids equal by position; a differing row counts as
a tie when the distances agree); distances allclose.

Timing: per-query CPU time (``time.process_time``) with ``faiss.omp_set_num_threads(1)``, the S shards searched one
after another in one thread: the total work of a search, not its parallelism; merges included. Each measurement
is the least of ``--repeats`` runs over ``--timed-queries`` queries. The same is measured as wall time with FAISS
on all cores (``--all-threads``, the machine's CPU count). Ratios are to (c).

A Markdown table goes to stdout, every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

from bench.timing import make_data, recall_at_k, write_results
from lookalike.ids import buckets_of


def log(msg: str, t0: float = [time.perf_counter()]) -> None:  # noqa: B006 - the default is the start time
    print(f"[{time.perf_counter() - t0[0]:7.1f}s] {msg}", file=sys.stderr, flush=True)


def shard_of(n: int, buckets: int, shards: int) -> np.ndarray:
    """Shard of vector i (id ``str(i)``), shape (n,) int64: its bucket (lookalike.ids) modulo the shard count."""
    return buckets_of([str(i) for i in range(n)], buckets) % shards


def clone_empty(trained):
    """A copy of a trained, empty index, as a shard loading the collection's trained index would get it."""
    import faiss

    return faiss.deserialize_index(faiss.serialize_index(trained))


def add_assigned(index, xb: np.ndarray, ids: np.ndarray, assign: np.ndarray) -> None:
    """Adds xb (n, d) float32 with ids (n,) int64 to the lists assign (n,) int64 (precomputed coarse assignment)."""
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assign = np.ascontiguousarray(assign, dtype=np.int64)
    index.add_core(len(xb), faiss.swig_ptr(xb), faiss.swig_ptr(ids), faiss.swig_ptr(assign))


# --- the three ways to search -----------------------------------------------------------------------------------
def search_single(full, xq: np.ndarray, k: int):
    """(c): one index over everything. Returns (D, I) shape (nq, k)."""
    return full.search(xq, k)


def search_per_shard(shards: list, xq: np.ndarray, k: int):
    """(a): each shard quantizes and searches; merged. Returns (D, I) shape (nq, k)."""
    import faiss

    if len(shards) == 1:
        return shards[0].search(xq, k)
    parts = [s.search(xq, k) for s in shards]
    return faiss.merge_knn_results(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]))


def search_preassigned(quantizer, shards: list, xq: np.ndarray, k: int, nprobe: int):
    """(b): one coarse quantization, then ``search_preassigned`` on each shard; merged. Returns (D, I)."""
    import faiss

    Dq, Iq = quantizer.search(xq, nprobe)
    parts = [s.search_preassigned(xq, k, Iq, Dq) for s in shards]
    if len(parts) == 1:
        return parts[0]
    return faiss.merge_knn_results(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]))


def timed(fns: dict, xq: np.ndarray, batch: int, repeats: int, clock) -> dict:
    """For each name -> fn: the least over ``repeats`` runs of clock-seconds per query of fn over xq in batches of
    ``batch``. The functions take turns within each repeat, so that a change in what else runs on the machine
    affects them alike."""
    for fn in fns.values():
        fn(xq[:batch])  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = clock()
            for s in range(0, len(xq), batch):
                fn(xq[s:s + batch])
            best[name] = min(best[name], (clock() - t) / len(xq))
    return best


def compare(D: np.ndarray, I: np.ndarray, D0: np.ndarray, I0: np.ndarray) -> dict:
    """How (D, I) matches the reference (D0, I0): rows identical, rows differing only by ties, rows differing."""
    rows_equal = (I == I0).all(axis=1)
    dist_close = np.isclose(D, D0, rtol=1e-5, atol=1e-4).all(axis=1)
    return {"rows_identical": int(rows_equal.sum()), "rows_ties": int((~rows_equal & dist_close).sum()),
            "rows_differing": int((~rows_equal & ~dist_close).sum()),
            "distances_allclose": bool(np.allclose(D, D0, rtol=1e-5, atol=1e-4)),
            "max_abs_distance_diff": float(np.abs(D - D0).max())}


def sweep_nprobe(full, xq: np.ndarray, gt: np.ndarray, k: int, target: float, nlist: int) -> tuple[int, list]:
    """Smallest nprobe of a sweep at which ``full`` reaches recall@k >= target (the largest swept if none)."""
    candidates = sorted({p for p in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
                         if p <= nlist})
    curve = []
    for p in candidates:
        full.nprobe = p
        r = recall_at_k(full.search(xq, k)[1], gt)
        curve.append((p, r))
        log(f"  nprobe {p}: recall@{k} {r:.3f}")
        if r >= target:
            return p, curve
    return candidates[-1], curve


# --- the run ----------------------------------------------------------------------------------------------------
def run(args) -> dict:
    import faiss

    all_threads = args.all_threads or os.cpu_count() or 1
    k = args.k
    out: dict = {"config": {a: v for a, v in vars(args).items() if a != "out"},
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "faiss": faiss.__version__,
                             "numpy": np.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(
                                 timespec="minutes"), "loadavg_at_start": list(os.getloadavg())},
                 "rows": [], "indexes": []}

    xb, xq = make_data(args.n, args.dim, args.queries, args.seed, clusters=args.clusters, noise=args.noise)
    log(f"generated {args.n} x {args.dim} vectors and {args.queries} queries")
    faiss.omp_set_num_threads(all_threads)
    gt_D, gt_I = faiss.knn(xq, xb, k)
    log(f"exact ground truth for {args.queries} queries")
    ids = np.arange(args.n, dtype=np.int64)
    shard_ids = {S: shard_of(args.n, args.buckets, S) for S in args.shards}
    log(f"shard of every id for S = {args.shards}")
    xt = xq[:args.timed_queries]

    for nlist in args.nlists:
        rng = np.random.default_rng(args.seed + nlist)
        ntrain = min(args.n, args.train_per_list * nlist)
        sample = xb[np.sort(rng.choice(args.n, size=ntrain, replace=False))]
        quantizer = faiss.IndexFlatL2(args.dim)
        flat_trained = faiss.IndexIVFFlat(quantizer, args.dim, nlist)
        t = time.perf_counter()
        flat_trained.train(sample)
        log(f"IVF{nlist}: coarse centroids trained on {ntrain} vectors in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        assign = quantizer.assign(xb, 1).ravel()
        log(f"IVF{nlist}: {args.n} vectors assigned to lists in {time.perf_counter() - t:.1f}s")

        trained = {"Flat": flat_trained}
        for m in args.pq:
            ivfpq = faiss.IndexIVFPQ(quantizer, args.dim, nlist, m, 8)  # quantizer trained: only PQ is trained
            t = time.perf_counter()
            ivfpq.train(sample[:min(ntrain, args.pq_train)])
            trained[f"PQ{m}"] = ivfpq
            log(f"IVF{nlist},PQ{m}: codebooks trained in {time.perf_counter() - t:.1f}s")
        del sample

        nprobe = None
        for kind, empty in trained.items():
            spec = f"IVF{nlist},{kind}"
            full = clone_empty(empty)
            add_assigned(full, xb, ids, assign)
            faiss.omp_set_num_threads(all_threads)
            if nprobe is None:
                log(f"{spec}: nprobe sweep for recall@{k} >= {args.target}")
                nprobe, curve = sweep_nprobe(full, xq, gt_I, k, args.target, nlist)
                out.setdefault("sweeps", {})[str(nlist)] = curve
            full.nprobe = nprobe
            D_c, I_c = full.search(xq, k)
            recall = recall_at_k(I_c, gt_I)
            out["indexes"].append({"spec": spec, "nprobe": nprobe, "recall": recall,
                                   "bytes_per_vector": len(faiss.serialize_index(full)) / args.n})
            log(f"{spec}: nprobe {nprobe}, recall@{k} {recall:.3f}")
            coarse = faiss.downcast_index(full.quantizer)

            fc = lambda q: search_single(full, q, k)  # noqa: E731
            fq = lambda q: coarse.search(q, nprobe)  # noqa: E731
            for S in args.shards:
                shards = []
                for s in range(S):
                    sh = clone_empty(empty)
                    mask = shard_ids[S] == s
                    add_assigned(sh, xb[mask], ids[mask], assign[mask])
                    sh.nprobe = nprobe
                    shards.append(sh)
                faiss.omp_set_num_threads(all_threads)
                chk_a = compare(*search_per_shard(shards, xq, k), D_c, I_c)
                chk_b = compare(*search_preassigned(coarse, shards, xq, k, nprobe), D_c, I_c)
                fa = lambda q: search_per_shard(shards, q, k)  # noqa: E731
                fb = lambda q: search_preassigned(coarse, shards, q, k, nprobe)  # noqa: E731
                for batch in args.batches:
                    faiss.omp_set_num_threads(1)
                    cpu = timed({"c": fc, "a": fa, "b": fb, "q": fq}, xt, batch, args.repeats, time.process_time)
                    faiss.omp_set_num_threads(all_threads)
                    wall = timed({"c": fc, "a": fa, "b": fb}, xt, batch, args.repeats, time.perf_counter)
                    cpu_a, cpu_b, cpu_c, cpu_q = cpu["a"], cpu["b"], cpu["c"], cpu["q"]
                    wall_a, wall_b, wall_c = wall["a"], wall["b"], wall["c"]
                    row = {"spec": spec, "nlist": nlist, "nprobe": nprobe, "recall": recall, "batch": batch,
                           "shards": S, "cpu_us": {"a": cpu_a * 1e6, "b": cpu_b * 1e6, "c": cpu_c * 1e6,
                                                   "quantizer": cpu_q * 1e6},
                           "wall_us": {"a": wall_a * 1e6, "b": wall_b * 1e6, "c": wall_c * 1e6},
                           "check_a": chk_a, "check_b": chk_b}
                    out["rows"].append(row)
                    log(f"{spec} nprobe {nprobe} batch {batch} S={S}: CPU/query (a) {cpu_a * 1e6:.0f} us "
                        f"(b) {cpu_b * 1e6:.0f} us (c) {cpu_c * 1e6:.0f} us; (a)/(c) {cpu_a / cpu_c:.2f} "
                        f"(b)/(c) {cpu_b / cpu_c:.2f}; exact a {chk_a['rows_differing'] == 0} "
                        f"b {chk_b['rows_differing'] == 0}")
                for sh in shards:
                    sh.reset()  # frees their lists before the next S
            full.reset()
        del trained, flat_trained, quantizer
    faiss.omp_set_num_threads(all_threads)
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    return out


def _exact(chk: dict) -> str:
    if chk["rows_differing"]:
        return f"no ({chk['rows_differing']} rows)"
    return "yes" + (f" ({chk['rows_ties']} ties)" if chk["rows_ties"] else "")


def markdown(out: dict) -> str:
    cfg, m = out["config"], out["machine"]
    lines = [f"n={cfg['n']} d={cfg['dim']}, {cfg['queries']} queries ({cfg['timed_queries']} timed, least of "
             f"{cfg['repeats']}), k={cfg['k']}, buckets {cfg['buckets']}; {m['cpus']} CPUs, faiss {m['faiss']}, "
             f"numpy {m['numpy']}, Python {m['python']}, {m['date']}", "",
             "CPU = process CPU time per query, FAISS on 1 thread, the S shards one after another; wall = wall "
             "time per query with FAISS on all cores. (a) each shard quantizes; (b) quantize once + "
             "`search_preassigned`; (c) one index. q = the coarse quantization alone, CPU per query. "
             "Exact = (a)/(b) return (c)'s ids for all queries.", "",
             "| index | nprobe | recall@10 | batch | S | (c) CPU us | q CPU us | (a)/(c) CPU | (b)/(c) CPU | "
             "(b)/(a) CPU | (a)/(c) wall | (b)/(c) wall | exact (a) | exact (b) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in out["rows"]:
        c, w = r["cpu_us"], r["wall_us"]
        lines.append(f"| {r['spec']} | {r['nprobe']} | {r['recall']:.3f} | {r['batch']} | {r['shards']} | "
                     f"{c['c']:.0f} | {c['quantizer']:.0f} | {c['a'] / c['c']:.2f} | {c['b'] / c['c']:.2f} | "
                     f"{c['b'] / c['a']:.2f} | {w['a'] / w['c']:.2f} | {w['b'] / w['c']:.2f} | "
                     f"{_exact(r['check_a'])} | {_exact(r['check_b'])} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m bench.preassign_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1000000)")
    p.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    p.add_argument("--nlists", type=ints, default=[1024, 4096], help="IVF list counts, comma-separated")
    p.add_argument("--pq", type=ints, default=[16, 32], help="PQ sub-quantizer counts m, comma-separated ('' none)")
    p.add_argument("--shards", type=ints, default=[1, 2, 4, 8], help="shard counts S, comma-separated")
    p.add_argument("--batches", type=ints, default=[100, 1], help="queries per search call, comma-separated")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and the exactness checks")
    p.add_argument("--timed-queries", type=int, default=500, help="queries of each timing run (the first ones)")
    p.add_argument("--repeats", type=int, default=3, help="timing runs per measurement; the least counts")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--target", type=float, default=0.95, help="recall@k IVF-Flat must reach to fix nprobe")
    p.add_argument("--buckets", type=int, default=1024, help="buckets ids hash to (bucket b on shard b %% S)")
    p.add_argument("--train-per-list", type=int, default=100,
                   help="training vectors per IVF list (as a shard trains: shard.specs)")
    p.add_argument("--pq-train", type=int, default=65_536, help="training vectors of the PQ codebooks at most")
    p.add_argument("--all-threads", type=int, default=0, help="FAISS threads of the wall-time runs (0: all CPUs)")
    p.add_argument("--clusters", type=int, default=1000, help="centroids of the generated data")
    p.add_argument("--noise", type=float, default=1.5, help="noise around each centroid (centroids: N(0, 1))")
    p.add_argument("--seed", type=int, default=0, help="seed of data, queries and training samples")
    p.add_argument("--out", default="bench/out/preassign.json", help="JSON results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(markdown(out), flush=True)
    write_results(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
