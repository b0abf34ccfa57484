"""Peers, side by side: lookalike (through its router), in-process FAISS and milvus-lite on the same data, QPS at
recall@k for Flat, IVF and HNSW, at batch 1 and 100.

    python -m bench.peers_bench               # N=1M, D=128 and 512, all indexes and systems: ~2 h on a 2-vCPU VM
    python -m bench.peers_bench --indexes flat,ivf         # without HNSW (about half the time): ~1 h
    python -m bench.peers_bench --n 20000 --dims 32 --seconds 1 --quiet-wait 0     # smoke test, ~1 min

(Estimated from runs at 20k-100k vectors: at 1M, D=512 takes about three quarters of the time; the milvus-lite
insert alone is 1.6-3.7k rows/s at D=512, and HNSW builds take ~15 min per system at D=512.)

Set-up for the milvus-lite part (an optional extra; without it the milvus-lite rows are left out with a note).
milvus-lite 3.2.2 + pymilvus 3.0.2 keep grpcio 1.85.x and protobuf 7.x as they are, so either

    pip install -e '.[peers]'                  # into this environment (adds pandas, pyarrow, orjson>=3.10, cachetools)

or, to keep those out of the main environment, a separate virtualenv that the benchmark finds by itself:

    python -m venv .venv-peers && .venv-peers/bin/pip install milvus-lite==3.2.2 pymilvus==3.0.2 \\
        numpy==2.4.6 faiss-cpu==1.15.1 psutil  # the same numpy/FAISS as the main environment

``--milvus-python PATH`` picks another interpreter. milvus-lite always runs in a child process of the benchmark
(``bench/milvus_worker.py``, started with that interpreter): it reads the same vectors, queries and ground truth
from .npy files in a temporary directory and writes its measurements as JSON. So all three run in one process tree,
one system at a time, and each starts from the same arrays.

What it does, for each D in ``--dims``:

1. generates ``n`` clustered float32 vectors and ``queries`` queries from the same distribution
   (``bench.common.make_data``, seeded) and the exact top-k of every query with ``faiss.IndexFlatL2``;
2. **lookalike**: a real cluster on an embedded local Ray, as in ``bench/cluster_bench.py``: the controller and
   ``--shards`` shard actors (separate processes, each a gRPC server, one FAISS thread each), the router's gRPC
   server in this process, and ``lookalike.client.Client``: every search goes client -> router -> shards over gRPC
   on localhost. One collection per index kind (``Flat``, ``IVF{nlist},Flat``, ``HNSW{M}`` on every shard),
   bulk-loaded with one ``upsert_stream``; measured once the shards are idle again;
3. **in-process FAISS** (``--faiss-threads``, default all cores): ``IndexFlatL2``, ``IVF{shards*nlist},Flat``
   trained on as many points per list as a shard uses, and ``IndexHNSWFlat(D, M)``;
4. **milvus-lite** through pymilvus (``MilvusClient("….db")``, i.e. pymilvus over gRPC to milvus-lite's server
   threads in the worker process): one collection (INT64 primary key, FLOAT_VECTOR), rows inserted in batches,
   flushed, then for each index kind ``create_index`` + ``load``. milvus-lite 3.x indexes every sealed segment
   (<= 100,000 rows) separately and merges the per-segment top-k: FLAT is a NumPy brute force, IVF_FLAT and HNSW
   are FAISS indexes. It accepts other types (IVF_PQ, …) and ``describe_index`` then says "Finished", but builds
   nothing and brute-forces: so the worker reads the index actually attached to each segment (milvus-lite
   internals) and the report prints that, not what was asked for. (It also caught this: pymilvus 3.0.2 sends
   build parameters as one key each, milvus-lite 3.2.2 reads them only from a JSON "params" key and otherwise
   builds with its defaults, HNSW M=16 efConstruction=200 and IVF nlist=128; the worker sends both forms.)
   IVF gets as many rows per list as a lookalike shard (nlist from the real segment sizes); HNSW the same M and
   efConstruction 40 (FAISS's factory default, what ``HNSW32`` gets in lookalike).

Equal recall: search parameters are calibrated per system, not copied: for IVF the smallest nprobe (1, 2, 4, …) and
for HNSW the smallest efSearch (16, 32, …, then bisection to within 1/8) whose recall@k on the first
``--calib-queries`` queries reaches ``--recall`` (default 0.95); Flat is exact everywhere. Each row's recall@k is then measured against the exact
results over all queries (or as many as ``--recall-seconds`` allows, at least ``--min-recall-queries``: milvus-lite's
FLAT at 1M takes seconds per query), and printed with the number of queries it is over.

Timing, as in ``bench/cluster_bench.py`` (``bench.common.measure``): sequential requests of ``batch`` queries cycling over the
queries, one warm-up request, then at most ``--seconds`` (or ``--max-requests`` requests); QPS = queries answered
per wall second; p50/p99 per request; "others' CPU" = cores used meanwhile by processes outside the benchmark's
process tree. milvus-lite's FLAT answers a batch by materialising a (batch x segment rows x D) float32 array per
segment; a row whose array would exceed ``--milvus-max-temp-gib`` is skipped and says so (100 x 100,000 x 128 x 4
bytes is 4.8 GiB, twice that at its peak, ~40 s per request; at D=512 it would not fit in memory).

HNSW is slow to build on a small machine; before building, the benchmark times a small HNSW build and prints an
estimate for each system. ``--indexes flat,ivf`` skips it.

Output: progress on stderr, a Markdown report on stdout (rows, lookalike ÷ milvus-lite and lookalike ÷ in-process
QPS ratios, the 20x single-query target, build times) and every number in ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from bench.common import load, teardown, wait_idle
from bench.peers_eval import MILVUS_SEGMENT_ROWS, EvalSettings, ef_ladder, evaluate, log, nprobe_ladder
from bench.peers_report import INDEXES, SYSTEMS, markdown, summarize
from bench.timing import ids_to_array, make_data, watch_foreign_cpu, write_results
from control.ray_cluster import start_cluster
from lookalike.client import Client
from lookalike.config import ClusterConfig
from router.core import Router
from router.server import create_router_server
from shard.specs import train_threshold

ROOT = pathlib.Path(__file__).resolve().parents[1]
EF_CONSTRUCTION = 40  # FAISS's index_factory default: what lookalike's "HNSW32" gets


# --- index plans ------------------------------------------------------------------------------------------------
def auto_nlist(per_shard: float) -> int:
    """IVF lists per shard: a power of two, at most 1024 (cluster_bench's default at 250k per shard), with about
    100 points per list available so that each shard trains (shard.specs.train_threshold)."""
    target = min(1024.0, 0.9 * per_shard / 100)
    return 1 << int(math.floor(math.log2(target))) if target >= 2 else 1


@dataclasses.dataclass
class Plan:
    """Parameters of one run that every system derives its indexes from."""

    n: int
    shards: int
    nlist: int  # per lookalike shard
    hnsw_m: int

    @property
    def list_size(self) -> float:
        """Vectors per IVF list, the same for every system."""
        return self.n / self.shards / self.nlist


# --- lookalike --------------------------------------------------------------------------------------------------
def bench_lookalike(client, index: str, dim: int, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, plan: Plan,
                    st: EvalSettings, load_batch: int = 10_000, shard_pids: list[int] | None = None) -> dict:
    """One collection of ``index`` kind, loaded through the router, calibrated and timed; dropped afterwards."""
    spec = {"Flat": "Flat", "IVF": f"IVF{plan.nlist},Flat", "HNSW": f"HNSW{plan.hnsw_m}"}[index]
    name = f"peers-{index.lower()}-{dim}"
    k = st.k
    client.create_collection(name, dim=dim, metric="l2", index=spec)
    try:
        ld = load(client, name, xb, load_batch, None)
        log(f"lookalike {index} D={dim}: loaded {len(xb)} in {ld['seconds']:.1f}s ({ld['vectors_per_s']:.0f}/s)")
        settle = wait_idle(shard_pids) if shard_pids else 0.0

        def search_for(v):
            if index == "IVF":
                return lambda q: client.search(name, q, k=k, nprobe=v)
            if index == "HNSW":
                return lambda q: client.search(name, q, k=k, ef_search=v)
            return lambda q: client.search(name, q, k=k)

        def ids_for(v):
            fn = search_for(v)
            return lambda q: ids_to_array(fn(q).ids, k)

        ladder = {"IVF": nprobe_ladder(plan.nlist), "HNSW": ef_ladder(k)}.get(index)
        res = evaluate(search_for, ids_for, ladder, xq, gt, st, f"lookalike {index} D={dim}")
    finally:
        client.drop_collection(name)
    per_shard = len(xb) / plan.shards
    used = f"{spec} on each of {plan.shards} shards"
    if index == "IVF":
        need = train_threshold(spec)
        if per_shard < need * 1.05:
            used += f" (about {per_shard:.0f} vectors per shard, {need} needed to train: may be the exact buffer)"
    param = {"IVF": "nprobe per shard", "HNSW": "efSearch"}.get(index)
    res.update(system="lookalike", index=index, dim=dim, used=used, param=param,
               build={"seconds": ld["seconds"], "vectors_per_s": ld["vectors_per_s"], "settle_seconds": settle,
                      "what": "upsert_stream through the router (shards train/build as vectors arrive)"})
    return res


# --- in-process FAISS -------------------------------------------------------------------------------------------
def bench_faiss(index: str, dim: int, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, plan: Plan,
                st: EvalSettings, flat=None, seed: int = 0) -> dict:
    """FAISS in this process: IndexFlatL2 (``flat`` if given), IVF{shards*nlist},Flat, IndexHNSWFlat."""
    import faiss

    k, build, ladder = st.k, {}, None
    t = time.perf_counter()
    if index == "Flat":
        if flat is None:
            flat = faiss.IndexFlatL2(dim)
            flat.add(xb)
        idx, used, param = flat, "IndexFlatL2", None
        build = {"seconds": time.perf_counter() - t, "what": "add"}
    elif index == "IVF":
        nlist = plan.shards * plan.nlist
        spec = f"IVF{nlist},Flat"
        idx = faiss.index_factory(dim, spec, faiss.METRIC_L2)
        shard_train = train_threshold(f"IVF{plan.nlist},Flat")
        ntrain = min(len(xb), max(nlist, plan.shards * shard_train))  # as many points per list as a shard
        sample = xb[np.sort(np.random.default_rng(seed + 1).choice(len(xb), size=ntrain, replace=False))]
        idx.train(sample)
        train_s = time.perf_counter() - t
        del sample
        idx.add(xb)
        build = {"seconds": time.perf_counter() - t, "train_seconds": train_s, "train_vectors": ntrain,
                 "what": "train + add"}
        used, param, ladder = spec, "nprobe", nprobe_ladder(nlist)
    else:
        idx = faiss.IndexHNSWFlat(dim, plan.hnsw_m, faiss.METRIC_L2)
        idx.hnsw.efConstruction = EF_CONSTRUCTION
        idx.add(xb)
        build = {"seconds": time.perf_counter() - t, "what": "add"}
        used, param, ladder = f"IndexHNSWFlat M={plan.hnsw_m} efConstruction={EF_CONSTRUCTION}", "efSearch", \
            ef_ladder(k)
    log(f"in-process FAISS {index} D={dim}: built in {build['seconds']:.1f}s")

    def search_for(v):
        if index == "IVF":
            params = faiss.SearchParametersIVF(nprobe=v)
            return lambda q: idx.search(q, k, params=params)
        if index == "HNSW":
            params = faiss.SearchParametersHNSW(efSearch=max(v, k))
            return lambda q: idx.search(q, k, params=params)
        return lambda q: idx.search(q, k)

    def ids_for(v):
        fn = search_for(v)
        return lambda q: fn(q)[1]

    res = evaluate(search_for, ids_for, ladder, xq, gt, st, f"in-process FAISS {index} D={dim}")
    res.update(system="faiss", index=index, dim=dim, used=f"{used}, {faiss.omp_get_max_threads()} threads",
               param=param, build=build)
    return res


# --- milvus-lite (in a child process) ---------------------------------------------------------------------------
def find_milvus_python(choice: str = "auto") -> tuple[str | None, str]:
    """(interpreter that has pymilvus and milvus-lite, where it came from) or (None, why not)."""
    if choice and choice != "auto":
        return (choice, "--milvus-python") if pathlib.Path(choice).exists() else (None, f"{choice} does not exist")
    if importlib.util.find_spec("pymilvus") and importlib.util.find_spec("milvus_lite"):
        return sys.executable, "this environment"
    venv = ROOT / ".venv-peers" / "bin" / "python"
    if venv.exists():
        return str(venv), ".venv-peers"
    return None, ("pymilvus/milvus-lite are not installed: pip install -e '.[peers]', or make .venv-peers "
                  "(see python -m bench.peers_bench --help)")


def bench_milvus(python: str, indexes: list[str], dim: int, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray,
                 plan: Plan, st: EvalSettings, work_dir: str, max_temp_gib: float = 2.0,
                 insert_batch: int = 10_000) -> dict:
    """Runs bench/milvus_worker.py with ``python`` on the same arrays; returns its JSON
    ({"results": [...], "insert": {...}, "versions": {...}, "notes": [...]})."""
    wd = pathlib.Path(tempfile.mkdtemp(prefix=f"peers-milvus-{dim}-", dir=work_dir))
    try:
        for name, arr in (("xb", xb), ("xq", xq), ("gt", gt)):
            np.save(wd / f"{name}.npy", arr)
        cfg = {"dim": dim, "indexes": indexes, "list_size": plan.list_size, "hnsw_m": plan.hnsw_m,
               "ef_construction": EF_CONSTRUCTION, "settings": dataclasses.asdict(st),
               "max_temp_gib": max_temp_gib, "insert_batch": insert_batch, "db": str(wd / "milvus.db"),
               "xb": str(wd / "xb.npy"), "xq": str(wd / "xq.npy"), "gt": str(wd / "gt.npy"),
               "out": str(wd / "result.json")}
        (wd / "config.json").write_text(json.dumps(cfg))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep))
        proc = subprocess.run([python, "-m", "bench.milvus_worker", str(wd / "config.json")], cwd=ROOT, env=env)
        if proc.returncode != 0 or not (wd / "result.json").exists():
            raise RuntimeError(f"milvus worker exited with status {proc.returncode}")
        return json.loads((wd / "result.json").read_text())
    finally:
        shutil.rmtree(wd, ignore_errors=True)


# --- HNSW build estimate ----------------------------------------------------------------------------------------
def estimate_hnsw_seconds(xb: np.ndarray, plan: Plan, cores: int, sample: int = 10_000) -> dict:
    """Times a 1-thread HNSW build on a sample and extrapolates (build time ~ n^1.25: 10k -> 100k vectors took 19.6x
    as long on the 2-vCPU VM of docs/BENCHMARKS.md) to each system's layout:
    in-process one index on all cores; lookalike ``shards`` indexes of n/shards on min(cores, shards) cores;
    milvus-lite one index per segment of <= 100,000 rows, on all cores."""
    import faiss

    m = min(len(xb), sample)
    idx = faiss.IndexHNSWFlat(xb.shape[1], plan.hnsw_m)
    idx.hnsw.efConstruction = EF_CONSTRUCTION
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    try:
        idx.add(xb[:m])
    finally:
        faiss.omp_set_num_threads(threads)
    t1 = time.perf_counter() - t
    del idx

    def single(x: float) -> float:  # one thread, x vectors
        return t1 * (x / m) ** 1.25

    n, s = len(xb), plan.shards
    seg = min(n, MILVUS_SEGMENT_ROWS)
    # lookalike x2: its load path (upsert batches split over the shards, WAL) and shards sharing cores took twice the
    # FAISS work alone at 100k x 128 (14 s, the other two 13-14 s against estimates of 11 s)
    return {"sample": m, "sample_seconds_1_thread": t1, "faiss": single(n) / cores,
            "lookalike": 2 * s * single(n / s) / min(cores, s), "milvus": math.ceil(n / seg) * single(seg) / cores}


# --- the run ----------------------------------------------------------------------------------------------------
def run_dim(args, dim: int, out: dict, client=None, shard_pids: list[int] | None = None,
            milvus_python: str | None = None) -> None:
    """All selected systems and indexes at one dimension; appends to out["results"], out["notes"], ...."""
    import faiss

    st = settings_from_args(args)
    n = args.n
    t = time.perf_counter()
    xb, xq = make_data(n, dim, args.queries, args.seed, clusters=args.clusters, noise=args.noise)
    log(f"D={dim}: generated {n} vectors and {args.queries} queries in {time.perf_counter() - t:.1f}s")
    flat = faiss.IndexFlatL2(dim)
    flat.add(xb)
    t = time.perf_counter()
    _, gt = flat.search(xq, args.k)
    log(f"D={dim}: exact ground truth in {time.perf_counter() - t:.1f}s")
    plan = Plan(n=n, shards=args.shards, nlist=args.nlist or auto_nlist(n / args.shards), hnsw_m=args.hnsw_m)
    out.setdefault("plans", []).append({"dim": dim, **dataclasses.asdict(plan), "list_size": plan.list_size})
    indexes = [INDEXES[i] for i in args.indexes]

    if "HNSW" in indexes:
        est = estimate_hnsw_seconds(xb, plan, os.cpu_count() or 1)
        out.setdefault("hnsw_estimates", []).append({"dim": dim, **est})
        chosen = {s: est[s] for s in args.systems}
        log(f"D={dim}: HNSW{plan.hnsw_m} build estimate (1-thread sample of {est['sample']} took "
            f"{est['sample_seconds_1_thread']:.1f}s): " +
            ", ".join(f"{SYSTEMS[s]} ~{v / 60:.1f} min" for s, v in chosen.items()) +
            f"; ~{sum(chosen.values()) / 60:.1f} min in all (skip HNSW with --indexes flat,ivf)")

    if "lookalike" in args.systems and client is not None:
        for index in indexes:
            out["results"].append(bench_lookalike(client, index, dim, xb, xq, gt, plan, st, args.load_batch,
                                                  shard_pids))
    if "faiss" in args.systems:
        threads = args.faiss_threads or os.cpu_count() or 1
        saved = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            for index in indexes:
                out["results"].append(bench_faiss(index, dim, xb, xq, gt, plan, st, flat=flat, seed=args.seed))
        finally:
            faiss.omp_set_num_threads(saved)
    del flat
    if "milvus" in args.systems and milvus_python:
        try:
            res = bench_milvus(milvus_python, indexes, dim, xb, xq, gt, plan, st, args.work_dir,
                               args.milvus_max_temp_gib, args.load_batch)
        except Exception as err:  # a failed peer should not lose the other rows
            out["notes"].append(f"D={dim}: milvus-lite failed: {err}")
            log(f"D={dim}: milvus-lite failed: {err}")
        else:
            out["results"].extend(res["results"])
            out.setdefault("milvus", {}).update(versions=res.get("versions"))
            out["milvus"].setdefault("insert", []).append({"dim": dim, **res["insert"]})
            out["notes"].extend(f"D={dim}: {x}" for x in res.get("notes", []))


def settings_from_args(args) -> EvalSettings:
    return EvalSettings(k=args.k, batches=tuple(args.batches), seconds=args.seconds, max_requests=args.max_requests,
                        recall=args.recall, calib_queries=args.calib_queries, recall_seconds=args.recall_seconds,
                        min_recall_queries=args.min_recall_queries)


def new_report(args) -> dict:
    """The skeleton ``run_dim`` fills in."""
    import faiss

    return {"config": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": {"cpus": os.cpu_count() or 1, "platform": platform.platform(),
                        "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "loadavg_at_start": list(os.getloadavg())},
            "results": [], "notes": []}


def run(args) -> dict:
    out = new_report(args)
    monitor = watch_foreign_cpu()
    if args.quiet_wait > 0:
        waited, others = monitor.wait_quiet(args.quiet_wait)
        out["machine"]["foreign_cpu_cores_at_start"] = round(others, 3)
        log(f"other processes used {others:.2f} cores before the start (waited {waited:.0f}s for a quiet machine)")

    milvus_python = None
    if "milvus" in args.systems:
        milvus_python, where = find_milvus_python(args.milvus_python)
        out["milvus"] = {"python": milvus_python, "from": where}
        if milvus_python is None:
            out["notes"].append(f"milvus-lite left out: {where}")
        log(f"milvus-lite: {milvus_python or 'not available'} ({where})")

    client = server = router = handle = None
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="lookalike-peers-", dir=args.work_dir)
    try:
        shard_pids = None
        if "lookalike" in args.systems:
            client, server, router, handle, shard_pids = start_lookalike(args, data_dir, out)
        for dim in args.dims:
            run_dim(args, dim, out, client, shard_pids, milvus_python)
    finally:
        if handle is not None or client is not None:
            teardown(client, server, router, handle)
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out["summary"] = summarize(out)
    return out


def start_lookalike(args, data_dir: str, out: dict):
    """An embedded local Ray with a lookalike cluster, the router's gRPC server here and a client, as
    bench/cluster_bench.py starts them. Returns (client, server, router, handle, shard pids)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    cores = os.cpu_count() or 1
    ray.init(address="local", namespace="lookalike", include_dashboard=False, num_cpus=max(cores, args.shards + 1),
             log_to_driver=False)
    t = time.perf_counter()
    handle, control = start_cluster(ClusterConfig(data_dir=data_dir, shards=args.shards, cluster_name="peers",
                                                  shard_num_cpus=args.shard_cpus))
    router = Router(control)
    server, port, _health = create_router_server(router, "127.0.0.1:0")
    client = Client(f"127.0.0.1:{port}", timeout=600)
    pids = list(ray.get(handle.shard_pids.remote()).values())
    out["machine"]["ray"] = ray.__version__
    log(f"lookalike: {args.shards} shards up in {time.perf_counter() - t:.1f}s; router on port {port}")
    return client, server, router, handle, pids


# --- CLI --------------------------------------------------------------------------------------------------------
def _choices(allowed: dict) -> Callable[[str], list[str]]:
    def parse(s: str) -> list[str]:
        items = [x.strip().lower() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {s!r}")
        return items
    return parse


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers_bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2].split("What it does")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1000000)")
    p.add_argument("--dims", type=_ints, default=[128, 512], help="dimensions, comma-separated (default 128,512)")
    p.add_argument("--indexes", type=_choices(INDEXES), default=list(INDEXES), help="flat,ivf,hnsw (default all)")
    p.add_argument("--systems", type=_choices(SYSTEMS), default=list(SYSTEMS),
                   help="lookalike,faiss,milvus (default all)")
    p.add_argument("--batches", type=_ints, default=[1, 100], help="queries per request (default 1,100)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0, help="time bound of each measurement")
    p.add_argument("--max-requests", type=int, default=10_000, help="request bound of each measurement")
    p.add_argument("--recall", type=float, default=0.95, help="recall@k the IVF/HNSW parameters are tuned to reach")
    p.add_argument("--calib-queries", type=int, default=200, help="queries used to pick nprobe/efSearch")
    p.add_argument("--recall-seconds", type=float, default=60.0,
                   help="time bound of each recall measurement (it answers at least --min-recall-queries)")
    p.add_argument("--min-recall-queries", type=int, default=20)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor")
    p.add_argument("--nlist", type=int, default=0,
                   help="IVF lists per lookalike shard (0: a power of two <= 1024 with ~100 vectors per list to "
                        "train on); in-process FAISS uses shards x nlist, milvus-lite the same rows per list")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW M for every system (efConstruction is 40)")
    p.add_argument("--faiss-threads", type=int, default=0, help="in-process FAISS threads (0: all cores)")
    p.add_argument("--milvus-python", default="auto",
                   help="interpreter with pymilvus + milvus-lite (auto: this one if it has them, else .venv-peers)")
    p.add_argument("--milvus-max-temp-gib", type=float, default=2.0,
                   help="skip milvus-lite brute-force rows whose per-segment temporary array would exceed this")
    p.add_argument("--load-batch", type=int, default=10_000, help="vectors per upsert/insert message")
    p.add_argument("--clusters", type=int, default=1000, help="centroids of the generated data")
    p.add_argument("--noise", type=float, default=1.5, help="noise around each centroid (centroids: N(0, 1))")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="seconds to wait at the start for other processes to leave the CPUs alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="lookalike storage (default: a temporary directory, removed)")
    p.add_argument("--work-dir", default=None, help="where temporary directories go (default: the system's)")
    p.add_argument("--out", default="bench/out/peers.json", help="JSON results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(markdown(out), flush=True)
    write_results(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
