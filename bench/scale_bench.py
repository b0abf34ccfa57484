"""Scale: the cluster vs in-process FAISS on the same data, through 4 and 8 shards, up to 10M vectors.

    python -m bench.scale_bench --n 10000000 --nlist 4096 --hnsw-n 2000000 --data-dir /data/scale \\
        [--dim 128] [--shards 4,8] [--indexes flat,ivf,ivfpq,ivfpqfs,hnsw] [--pq 32] [--queries 1000] [--seconds 10] \\
        [--per-process 1] [--batch-inflight 1] [--out bench/out/scale.json]

For each index family (one at a time: ``Flat``, ``IVF{nlist},Flat``, ``IVF{nlist},PQ{pq}``, ``IVF{nlist},PQ{pq}x4fs``
(fast-scan), ``HNSW{hnsw-m}`` over the first ``--hnsw-n`` vectors), first in-process FAISS, then the cluster:

- in-process: build time (read the vectors from the .npy + train + add), index bytes per vector (the size of
  ``faiss.write_index``'s file, the same bytes as ``faiss.serialize_index``, over n), then the cheapest nprobe
  (IVF) / efSearch (HNSW) reaching recall@k >= ``--target`` against exact ground truth, and QPS there at batch 1
  and 100 (FAISS on all cores, on 1 thread, and from ``--concurrency`` callers of 1 thread); then freed;
- cluster (embedded Ray, ``shards`` shard actors, the router's gRPC server in this process; the collection uses
  the same spec string): load rate (vectors/s through the router, one ``upsert_stream``), then the wait until the
  collection is trained (:func:`wait_trained`) and the shards are idle; RAM per vector (the growth of the shards'
  RSS, summed over shard processes, from the empty collection to the loaded and idle one, over n), the same
  cheapest-parameter sweep and QPS; then the restart: the router and the cluster are stopped gracefully
  (``stop_cluster``, Ray too), started again on the same storage, and timed until a search returns a full answer
  (k ids for every query) with coverage 1;
- FAISS from the cluster's own training (``--same-training``, on by default; bench/scale_faiss.py): for a trained
  spec, in-process FAISS is filled from the trained index that cluster run used (read from its storage), then swept
  and measured as above. It holds the lists the shards hold together, so at the same nprobe it answers as the
  cluster does, and the ratio against it leaves out the difference two trainings on two samples make.

Ratios: cluster / FAISS QPS (each at its fastest: FAISS over its thread and caller settings, for IVF-PQ with and
without precomputed tables; the cluster over ``--concurrency`` requests in flight, of which the router runs
``--batch-inflight`` at once), cluster / FAISS bytes per vector, restart / build time, and 8-shard / 4-shard QPS.
Where an index cannot reach the target (PQ codes cap recall), both systems are taken at the start of their recall
plateau and the table says so.

Memory: the vectors are generated in chunks into a memory-mapped .npy under ``--data-dir`` (reused by later runs
with the same data flags) and exact ground truth is computed from it in chunks with ``faiss.knn`` and cached next
to it; one index family at a time, and the in-process index is freed before the cluster loads the same family.
Each cluster runs on its own storage under ``--data-dir``, removed after its measurements (``--keep-storage``
keeps it). A line per phase with the elapsed time goes to stderr; the Markdown report to stdout and every number
to ``--out`` (JSON).
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
import time

import numpy as np

from bench.common import init_ray, load, shard_memory, start_local, teardown, total_memory_gib, wait_idle
from bench.scale_common import EF_SEARCHES, NPROBES, cheapest, data_tag, dataset, ground_truth, log
from bench.scale_faiss import faiss_family, faiss_with_cluster_training, free, searcher
from bench.scale_report import markdown, summarize
from bench.scale_turns import faiss_setting, fastest, in_turns
from bench.timing import ids_to_array, measure, recall_at_k, watch_foreign_cpu, write_results

# --- the cluster's training state ---------------------------------------------------------------------------------
def needs_training(spec: str) -> bool:
    return "IVF" in spec or "PQ" in spec or "SQ" in spec


def wait_trained(client, name: str, spec: str, timeout: float) -> dict:
    """Waits until collection ``name`` is trained and every shard holding it searches the trained index
    (``CollectionInfo.training``: TRAINED with shards_ready == shards); returns {"seconds", "trained", "version",
    "trained_on"}. After ``timeout`` seconds it moves on (``trained`` False)."""
    t0 = time.perf_counter()
    if not needs_training(spec):
        return {"seconds": 0.0, "trained": True, "version": 0, "trained_on": 0}
    while True:
        t = client.describe_collection(name).training
        done = t.state == t.TRAINED and t.shards_ready == t.shards
        waited = time.perf_counter() - t0
        if done or waited >= timeout:
            return {"seconds": round(waited, 2), "trained": done, "version": t.version, "trained_on": t.trained_on}
        time.sleep(0.5)


# --- the cluster ----------------------------------------------------------------------------------------------------
def _init_ray_retrying(cpus: int, attempts: int = 3) -> None:
    """init_ray, tried again when Ray's own start times out (its GCS or raylet slow to write their port files on a
    busy machine: that lost whole cluster runs)."""
    import ray

    for attempt in range(attempts):
        try:
            init_ray(cpus)
            return
        except Exception as err:  # noqa: BLE001: Ray raises plain Exception/RuntimeError for a slow start
            if attempt == attempts - 1:
                raise
            log(f"  Ray did not start ({type(err).__name__}: {err}); trying again")
            ray.shutdown()
            time.sleep(5)


def cluster_family(spec: str, shards: int, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, args,
                   storage: pathlib.Path, res: dict | None = None, own: tuple | None = None) -> dict:
    """Loads xb into a fresh ``shards``-shard cluster on ``storage``, measures it, restarts it. Returns results,
    gathered in ``res`` (given by the caller: what was measured before a failure is kept). ``own``: (results,
    index) of in-process FAISS trained on its own, the index kept for ``--turns`` (else None)."""
    import ray

    n, dim, k = len(xb), xb.shape[1], args.k
    res = {} if res is None else res
    res.update({"spec": spec, "shards": shards, "n": n, "per_process": _per_process(args, shards)})
    name = "scale"
    threads = os.cpu_count() or 1
    t = time.perf_counter()
    _init_ray_retrying(max(threads, shards + 1))
    handle, router, server, port, client = start_local(str(storage), shards, args.shard_cpus, cluster_name="scale0",
                                                       per_process=_per_process(args, shards),
                                                       batch_inflight=args.batch_inflight)
    res["start_seconds"] = time.perf_counter() - t
    log(f"  cluster: {shards} shards up in {res['start_seconds']:.1f}s")
    try:
        client.create_collection(name, dim=dim, metric="l2", index=spec)
        empty = shard_memory(client)
        res["load"] = load(client, name, xb, args.load_batch, args.load_timeout)
        log(f"  cluster {spec}: loaded {n} in {res['load']['seconds']:.1f}s "
            f"({res['load']['vectors_per_s']:.0f} vectors/s)")
        wait_s = args.train_timeout
        res["trained"] = wait_trained(client, name, spec, wait_s)
        log(f"  cluster {spec}: trained {res['trained']}")
        pids = list(dict.fromkeys(ray.get(handle.shard_pids.remote()).values()))  # a shared process once
        # Quiet for longer than a shard waits before packing its lists (shard.upkeep._REPACK_IDLE_S, 5 s): a new
        # trained version's lists are packed only then, and RSS measured before that counted them unpacked.
        res["idle_wait_seconds"] = wait_idle(pids, max_s=args.idle_timeout, windows=8)
        settled = shard_memory(client)
        base = {s["shard_id"]: s["memory_bytes"] for s in empty}
        growth = sum(s["memory_bytes"] - base.get(s["shard_id"], 0) for s in settled)
        res["memory"] = {"empty": empty, "settled": settled, "rss_growth_bytes": growth,
                         "bytes_per_vector": growth / n,
                         "index_bytes_per_vector": sum(s["index_bytes"] for s in settled) / n,
                         "vectors": sum(s["vectors"] for s in settled),
                         "allocators": process_allocators(handle)}
        log(f"  cluster {spec}: idle after {res['idle_wait_seconds']:.0f}s; RSS growth {growth / n:.0f} B/vector "
            f"(shards' index bytes {res['memory']['index_bytes_per_vector']:.0f} B/vector); allocators "
            f"{res['memory']['allocators']}")

        if "IVF" in spec:
            param, grid = "nprobe", tuple(p for p in NPROBES if p <= args.nlist)
            search = lambda q, p: client.search(name, q, k=k, nprobe=p)  # noqa: E731
        elif "HNSW" in spec:
            param, grid = "efSearch", tuple(e for e in EF_SEARCHES if e >= k)
            search = lambda q, p: client.search(name, q, k=k, ef_search=p)  # noqa: E731
        else:
            param, grid, search = None, (0,), (lambda q, p: client.search(name, q, k=k))

        def recall_of(p: int) -> float:
            I = np.concatenate([ids_to_array(search(xq[s:s + 100], p).ids, k) for s in range(0, len(xq), 100)])
            return recall_at_k(I, gt)

        if param:
            log(f"  cluster {spec}: cheapest {param} for recall@{k} >= {args.target}")
            res["sweep"] = cheapest(grid, recall_of, args.target)
        else:
            res["sweep"] = {"value": 0, "recall": recall_of(0), "met": True, "curve": []}
        res["param"] = param
        p = res["sweep"]["value"]
        res["qps"], res["qps_by_concurrency"] = {}, {}
        for batch in args.batches:  # the best of the concurrencies is compared (each in qps_by_concurrency)
            for conc in args.concurrency:
                r = measure(lambda q: search(q, p), xq, batch, args.seconds, args.max_requests, concurrency=conc)
                res["qps_by_concurrency"].setdefault(str(batch), {})[str(conc)] = r
                log(f"  cluster {spec} batch {batch} x {conc} in flight: {r['qps']:.1f} QPS, p50 {r['p50_ms']:.2f} ms")
            res["qps"][str(batch)] = max(res["qps_by_concurrency"][str(batch)].values(), key=lambda r: r["qps"])
        if args.turns:
            res["turns"] = _turns(spec, storage, name, xb, xq, gt, args, res, own, lambda q: search(q, p))
        before = search(xq[:100], p)

        # --- restart on the same storage ------------------------------------------------------------------------
        t = time.perf_counter()
        teardown(client, server, router, handle)
        handle = server = router = client = None
        res["stop_seconds"] = time.perf_counter() - t
        log(f"  cluster {spec}: stopped in {res['stop_seconds']:.1f}s; restarting on the same storage")
        t0 = time.perf_counter()
        _init_ray_retrying(max(threads, shards + 1))
        res["restart_ray_seconds"] = time.perf_counter() - t0
        handle, router, server, port, client = start_local(str(storage), shards, args.shard_cpus,
                                                           cluster_name="scale1", ready_timeout=args.restart_timeout,
                                                           per_process=_per_process(args, shards),
                                                           batch_inflight=args.batch_inflight)
        res["restart_cluster_seconds"] = time.perf_counter() - t0
        res["restart"] = first_full_answer(client, name, xq[:100], k, p, param, t0, args.restart_timeout)
        after = search(xq[:100], p)
        res["restart"]["same_ids_as_before"] = after.ids == before.ids
        res["restart"]["trained"] = wait_trained(client, name, spec, wait_s)
        log(f"  cluster {spec}: restart to a full answer {res['restart']['seconds']:.1f}s (Ray "
            f"{res['restart_ray_seconds']:.1f}s, cluster up {res['restart_cluster_seconds']:.1f}s); same ids as "
            f"before: {res['restart']['same_ids_as_before']}")
    finally:
        teardown(client, server, router, handle)
    return res


def _turns(spec: str, storage: pathlib.Path, name: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, args,
           res: dict, own: tuple | None, cluster_search) -> dict | None:
    """The cluster (up, loaded, swept) and in-process FAISS searched in turns at the largest batch
    (bench.scale_turns), each at its cheapest parameter and fastest setting: against FAISS filled from this run's
    trained index where there is one (built now, beside the cluster; its results become ``faiss_same_training``),
    else against ``own``. None when there is neither."""
    import faiss  # deferred, as in run()

    batch, version = max(args.batches), res.get("trained", {}).get("version")
    kept = None
    if args.same_training and version:
        fres, kept = faiss_with_cluster_training(spec, storage, name, version, xb, xq, gt, args, keep=True)
        res["faiss_same_training"] = fres
        idx, against = kept, "FAISS filled from the cluster's trained index"
    elif own is not None and own[1] is not None:
        (fres, idx), against = own, "FAISS's own index"
    else:
        return None
    try:
        setting = fastest(fres["qps"][str(batch)])
        threads, callers = faiss_setting(idx, fres["qps"][str(batch)][setting])
        fp, search = fres["sweep"]["value"], searcher(idx, spec, args.k)
        conc = res["qps"][str(batch)]["concurrency"]
        log(f"  cluster {spec}: in turns with {against} ({setting}, {res['param'] or 'no parameter'} {fp}), "
            f"batch {batch}, {args.turns} rounds")
        t = in_turns(cluster_search, conc, lambda q: search(q, fp), threads, callers, xq, batch, args.seconds,
                     args.max_requests, args.turns, set_threads=faiss.omp_set_num_threads)
        t.update(against=against, faiss_setting=setting, faiss_param=fp, cluster_param=res["sweep"]["value"])
        rounds = ", ".join(f"{r['ratio']:.2f}" for r in t["rounds"])
        log(f"  cluster {spec}: in turns, cluster / FAISS {t['ratio_median']:.2f} (rounds {rounds})")
        return t
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        free(kept)


def process_allocators(handle) -> list[dict[str, int]]:
    """The allocator statistics of each shard process (shard.osutil.allocator_stats), a shared process once."""
    import ray  # deferred, as in cluster_family: Ray starts only for the cluster's runs

    by_shard = ray.get(handle.shard_allocators.remote())
    pids = ray.get(handle.shard_pids.remote())
    return [{"pid": pid, **by_shard[sid]} for pid, sid in {pids[s]: s for s in sorted(by_shard)}.items()]


def _per_process(args, shards: int) -> int:
    """Shards a process of the cluster holds: ``--per-process`` (0: all of them in one)."""
    return shards if args.per_process == 0 else min(args.per_process, shards)


def first_full_answer(client, name: str, xq: np.ndarray, k: int, p: int, param: str | None, t0: float,
                      timeout: float) -> dict:
    """Searches until an answer has coverage 1 and k ids for every query; seconds since ``t0``."""
    import grpc

    not_yet = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND)
    kw = {"nprobe": p} if param == "nprobe" else {"ef_search": p} if param == "efSearch" else {}
    tries, last = 0, ""
    while True:
        tries += 1
        try:
            hits = client.search(name, xq, k=k, timeout=30, **kw)  # below full coverage: UNAVAILABLE
            if hits.coverage >= 1.0 and all(len(row) == k for row in hits.ids):
                return {"seconds": time.perf_counter() - t0, "tries": tries}
            last = f"coverage {hits.coverage:.3f}, {min(len(row) for row in hits.ids)} ids at least"
        except grpc.RpcError as err:
            if err.code() not in not_yet:
                raise
            last = f"{err.code().name}: {err.details()}"
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"no full answer {timeout:.0f}s after the restart (last: {last})")
        time.sleep(0.05)


# --- the run --------------------------------------------------------------------------------------------------------
FAMILIES = {"flat": lambda a: "Flat", "ivf": lambda a: f"IVF{a.nlist},Flat",
            "ivfpq": lambda a: f"IVF{a.nlist},PQ{a.pq}", "ivfpqfs": lambda a: f"IVF{a.nlist},PQ{a.pq}x4fs",
            "hnsw": lambda a: f"HNSW{a.hnsw_m}"}


def run(args) -> dict:
    import faiss
    import ray

    watch_foreign_cpu()  # measure() and load() record the CPU others used meanwhile
    root = pathlib.Path(args.data_dir)
    out: dict = {"config": {a: v for a, v in vars(args).items() if a != "out"},
                 "machine": {"cpus": os.cpu_count(), "memory_gib": total_memory_gib(),
                             "platform": platform.platform(), "python": platform.python_version(),
                             "faiss": faiss.__version__, "ray": ray.__version__, "numpy": np.__version__,
                             "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                             "loadavg_at_start": list(os.getloadavg())},
                 "families": []}
    xb_all, xq = dataset(args)
    for fam in args.indexes:
        spec = FAMILIES[fam](args)
        n = min(args.hnsw_n, args.n) if fam == "hnsw" else args.n
        xb = xb_all[:n]
        log(f"{spec} over {n} vectors")
        gt = ground_truth(xb, xq, args.k, root / f"gt-k{args.k}-first{n}-of-{data_tag(args)}.npy")
        # --turns searches the cluster and FAISS in turns: FAISS's own index is kept for that where no trained
        # index of the cluster's will be (a trained spec compares with FAISS filled from the cluster's: _turns)
        keep = bool(args.turns) and not (args.same_training and needs_training(spec))
        fres, own_idx = faiss_family(spec, xb, xq, gt, args, root, keep=keep)
        entry = {"family": fam, "spec": spec, "n": n, "faiss": fres, "cluster": []}
        out["families"].append(entry)
        _save(out, args.out)
        for S in args.shards:
            storage = root / f"cluster-{fam}-{S}"
            shutil.rmtree(storage, ignore_errors=True)
            storage.mkdir(parents=True)
            log(f"{spec}: cluster of {S} shards on {storage}")
            res: dict = {}
            try:
                cluster_family(spec, S, xb, xq, gt, args, storage, res, own=(fres, own_idx))
                entry["cluster"].append(res)
                if args.same_training and res.get("trained", {}).get("version") and "faiss_same_training" not in res:
                    _save(out, args.out)
                    res["faiss_same_training"], _ = faiss_with_cluster_training(
                        spec, storage, "scale", res["trained"]["version"], xb, xq, gt, args)
            except Exception as err:  # noqa: BLE001: one failed cluster run is a result; the others still run
                log(f"{spec}: the {S}-shard run failed: {type(err).__name__}: {err}")
                entry.setdefault("failed", []).append({"shards": S, "error": f"{type(err).__name__}: {err}",
                                                       "measured": res})
            finally:
                if not args.keep_storage:
                    shutil.rmtree(storage, ignore_errors=True)
            _save(out, args.out)
        free(own_idx)
        own_idx = None
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out["summary"] = summarize(out)
    return out


def _save(out: dict, path: str) -> None:
    """The results so far (after each family: a long run that stops keeps what it measured)."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2, default=float) + "\n")


# --- CLI ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m bench.scale_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000_000, help="vectors (default 10000000)")
    p.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    p.add_argument("--shards", type=ints, default=[4, 8], help="shard counts, comma-separated (default 4,8)")
    p.add_argument("--per-process", type=int, default=1,
                   help="shards sharing one process (lookalike serve --shards-per-process; 0: all; default 1)")
    p.add_argument("--indexes", type=lambda s: [x for x in s.split(",") if x], default=list(FAMILIES),
                   help=f"index families, comma-separated, from {','.join(FAMILIES)} (default all)")
    p.add_argument("--hnsw-n", type=int, default=2_000_000, help="vectors of the HNSW family (the first ones)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree M (default 32)")
    p.add_argument("--nlist", type=int, default=4096, help="IVF lists of the collection, as for one index (4096)")
    p.add_argument("--pq", type=int, default=32, help="PQ sub-quantizers m of the ivfpq family (default 32)")
    p.add_argument("--queries", type=int, default=1000, help="queries: ground truth, recall and QPS (default 1000)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--target", type=float, default=0.95, help="recall@k each system must reach (default 0.95)")
    p.add_argument("--batches", type=ints, default=[1, 100], help="queries per search request (default 1,100)")
    p.add_argument("--seconds", type=float, default=10.0, help="time bound of each QPS measurement (default 10)")
    p.add_argument("--max-requests", type=int, default=10_000, help="request bound of each QPS measurement")
    p.add_argument("--concurrency", type=ints, default=[1, 2], help="requests in flight, each measured, the best "
                   "compared (FAISS: that many callers on 1 thread each; default 1,2)")
    p.add_argument("--batch-inflight", type=int, default=1,
                   help="the router's batches of one kind running at once (lookalike serve --batch-inflight; with "
                        "1 a second caller's batch waits for the first to end; default 1)")
    p.add_argument("--turns", type=int, default=0,
                   help="rounds of the cluster and in-process FAISS searched in turns at the largest batch, each "
                        "round a window of each (bench/scale_turns.py; default 0: none)")
    p.add_argument("--same-training", action=argparse.BooleanOptionalAction, default=True,
                   help="after each trained cluster run, also measure in-process FAISS filled from that cluster's own "
                        "trained index (the same lists, so the same answers at the same nprobe; default on)")
    p.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard actor (default 0.5)")
    p.add_argument("--load-batch", type=int, default=10_000, help="vectors per upsert message (default 10000)")
    p.add_argument("--load-timeout", type=float, default=None, help="deadline of each bulk load, seconds (none)")
    p.add_argument("--train-timeout", type=float, default=600.0,
                   help="seconds to wait for the collection to report trained before moving on (default 600)")
    p.add_argument("--idle-timeout", type=float, default=900.0,
                   help="seconds to wait for the shards to go idle after the load (default 900)")
    p.add_argument("--restart-timeout", type=float, default=3600.0,
                   help="seconds a restart may take to answer fully before the run fails (default 3600)")
    p.add_argument("--chunk", type=int, default=1_000_000, help="vectors per in-process add (default 1000000)")
    p.add_argument("--clusters", type=int, default=1000, help="centroids of the generated data (default 1000)")
    p.add_argument("--noise", type=float, default=1.5, help="noise around each centroid (default 1.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, queries and training samples (default 0)")
    p.add_argument("--data-dir", required=True,
                   help="where the generated vectors (.npy, memory-mapped), the cached ground truth and the "
                        "clusters' storage go; needs about 2.5 x n x dim x 4 bytes free")
    p.add_argument("--keep-storage", action="store_true", help="keep each cluster's storage after its run")
    p.add_argument("--out", default="bench/out/scale.json", help="JSON results (default bench/out/scale.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.indexes) - set(FAMILIES)
    if unknown:
        build_parser().error(f"unknown index families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    out = run(args)
    write_results(out, args.out)  # before the report: a report that fails loses no numbers
    print(markdown(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
