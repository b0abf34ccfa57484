"""Shard memory per vector: where a shard's resident memory goes, against what FAISS needs for the same index.

    python -m bench.memory_bench                       # 300k x 128, Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32
    python -m bench.memory_bench --n 1000000 --spec IVF1024,PQ16 --spec HNSW32

Each index spec is loaded into a fresh process (the allocator settings shard actors run with, see
control/ray_placer.py): a ``shard.shard.Shard`` in-process (no Ray, no gRPC), one collection of 16 buckets all
owned by it, upserts of 10k items (ids ``img-00000000``, 12 bytes, no payload) of a clustered synthetic set (a seeded
mixture of Gaussians, generated batch by batch so the data itself is not resident). After the load the store is
compacted and ``release_memory`` (malloc_trim) is called, then:

- ``rss/vec``: the process's resident memory growth per vector since just before the load;
- ``faiss/vec``: ``len(faiss.serialize_index(idx)) / n`` for the same spec built in-process over the same data,
  with FAISS's 64-bit ids (IVF lists hold them; other indexes under ``IndexIDMap``): what FAISS alone needs;
- ``index/vec``: our index serialized (codes, ids, structures; a hashtable direct map serializes as 16 bytes an
  entry, it takes more in memory), plus what ``VectorIndex`` keeps beside it (HNSW's position -> label arrays);
- ``table/vec``: the id table's arrays (labels, offsets, id bytes, payload pointers) and payload objects;
- ``fixed/vec``: what FAISS holds in memory but does not serialize, whatever the number of vectors: IVF-PQ's
  precomputed distance tables (nlist x M x 256 floats: 16 MiB for IVF1024,PQ16), spread over the vectors;
- ``rest/vec``: rss - index - table - fixed: allocator slack, capacity that vectors keep (inverted lists grow by
  doubling), what training left in the heap, and anything held that should not be;
- ``budget``: faiss/vec + 48 (the target: an id of up to 16 bytes plus the id table's 32 bytes a row).

Also timed (``--ops``): Get of 100 ids with vectors, and a delete + re-upsert of 10k existing ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from lookalike.config import CollectionConfig
from lookalike.indexspec import training_points
from shard.cpu_index import VectorIndex
from shard.osutil import SHARD_PROCESS_ENV, release_memory
from shard.shard import Shard
from shard.specs import build_index
from shard.trained import write_template

DEFAULT_SPECS = ["Flat", "IVF1024,Flat", "IVF1024,PQ16", "HNSW32"]
_SHARD_ENV = {**SHARD_PROCESS_ENV, "OMP_NUM_THREADS": "1"}  # as a shard actor runs (control/ray_placer.py)
_BATCH = 10_000
_CENTERS = 256


def batch_of(i: int, n: int, dim: int, seed: int) -> np.ndarray:
    """Rows [i, i + n) of the data set: shape (n, dim) float32, the same on every call."""
    centers = np.random.default_rng(seed).standard_normal((_CENTERS, dim)).astype(np.float32) * 4
    rng = np.random.default_rng((seed, i))
    return centers[rng.integers(0, _CENTERS, n)] + rng.standard_normal((n, dim)).astype(np.float32)


def _faiss_reference(spec: str, metric: str, n: int, dim: int, seed: int, train_n: int) -> int:
    """Serialized bytes of the spec as FAISS alone would hold n vectors of the data set with int64 ids."""
    import faiss

    idx = build_index(dim, metric, spec)
    if faiss.try_extract_index_ivf(idx) is None:
        idx = faiss.IndexIDMap(idx)
    if not idx.is_trained:
        idx.train(np.concatenate([batch_of(i, min(_BATCH, train_n - i), dim, seed)
                                  for i in range(0, train_n, _BATCH)]))
    for i in range(0, n, _BATCH):
        m = min(_BATCH, n - i)
        idx.add_with_ids(batch_of(i, m, dim, seed), np.arange(i, i + m, dtype=np.int64))
    return len(faiss.serialize_index(idx))


def _index_bytes(vi) -> int:
    """What our VectorIndex holds, serialized (see the module's docstring)."""
    import faiss

    main = vi._buffer if vi._buffer is not None else vi._main
    size = len(faiss.serialize_index(main))
    for name in ("_pos_label", "_label_order"):
        arr = getattr(vi, name, None)
        if isinstance(arr, np.ndarray):
            size += arr.nbytes
    label_pos = getattr(vi, "_label_pos", None)
    if isinstance(label_pos, dict) and label_pos:
        # a dict of Python ints: its table plus the int objects (labels are past the small-int cache)
        size += sys.getsizeof(label_pos) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in label_pos.items())
    return size


def _table_bytes(table) -> int:
    return table.nbytes + sum(sys.getsizeof(p) for p in table.payload_items()[1])


def child(spec: str, n: int, dim: int, metric: str, seed: int, ops: bool) -> dict:
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        shard = Shard("mem-0", tmp)
        cfg = CollectionConfig("m", dim, metric, index=spec, buckets=16).validated()
        sample = min(training_points(cfg.index)[1], n)
        if sample:  # as in a cluster: the collection's one trained index first (shard.trained), then the items
            x = np.concatenate([batch_of(i, min(_BATCH, sample - i), dim, seed) for i in range(0, sample, _BATCH)])
            write_template(tmp, cfg, 1, VectorIndex(cfg).train_template(x), len(x), 0.0)
            cfg = dataclasses.replace(cfg, trained_version=1)
        shard.open_collection(cfg, range(16))
        sc = shard.collection("m")
        # what every shard pays once (a first write, BLAS/OpenMP buffers of k-means) is not data
        sc.upsert(["warm"], batch_of(10**9, 1, dim, seed), [None])
        sc.delete(["warm"])
        faiss.Kmeans(dim, 16, niter=2).train(batch_of(10**9, 4096, dim, seed))
        release_memory()
        before = shard.memory_bytes()
        t0 = time.monotonic()
        for i in range(0, n, _BATCH):
            m = min(_BATCH, n - i)
            sc.upsert([f"img-{j:08d}" for j in range(i, i + m)], batch_of(i, m, dim, seed), [None] * m)
        load_s = time.monotonic() - t0
        with sc._write_order:
            sc.upkeep.repack_if_due()  # what the shard does once writes stop (compressed IVF lists packed to their size)
        sc.store.compact()
        release_memory()
        after = shard.memory_bytes()
        ivfpq = faiss.try_extract_index_ivf(sc.index._main) if sc.index.trained else None
        ivfpq = faiss.downcast_index(ivfpq) if ivfpq is not None else None
        table = getattr(ivfpq, "precomputed_table", None)
        out = {"spec": spec, "n": n, "trained": sc.index.trained, "load_s": load_s,
               "fixed": 4 * table.size() if table is not None else 0,
               "rss": after - before, "index": _index_bytes(sc.index), "table": _table_bytes(sc.table),
               "nbytes": sc.index.nbytes}
        if ops:
            ids = [f"img-{j:08d}" for j in range(0, n, max(1, n // 100))][:100]
            t0 = time.monotonic()
            found, x, _ = sc.get(ids, include_vectors=True)
            out["get100_s"] = time.monotonic() - t0
            want = np.stack([batch_of(j - j % _BATCH, _BATCH, dim, seed)[j % _BATCH]
                             for j in range(0, n, max(1, n // 100))][:100])
            out["get_exact"] = bool(len(found) == len(ids) and np.array_equal(x, want))
            ids = [f"img-{j:08d}" for j in range(0, min(n, _BATCH))]
            t0 = time.monotonic()
            sc.upsert(ids, batch_of(0, len(ids), dim, seed), [None] * len(ids))
            out["reupsert10k_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            sc.delete(ids)
            out["delete10k_s"] = time.monotonic() - t0
        shard.close()
    train_n = 0 if build_index(dim, metric, spec).is_trained else min(training_points(cfg.index)[1], n)
    out["faiss"] = _faiss_reference(spec, metric, n, dim, seed, train_n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300_000, help="vectors per index (default 300k; try 1000000)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--metric", default="l2")
    ap.add_argument("--spec", action="append", help=f"index factory string, repeatable (default {DEFAULT_SPECS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", action="store_true", help="also time Get with vectors and delete/re-upsert of 10k")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.dim, args.metric, args.seed, args.ops)))
        return 0
    print(f"python -m bench.memory_bench --n {args.n} --dim {args.dim} --metric {args.metric}"
          + "".join(f" --spec {s}" for s in args.spec or []) + (" --ops" if args.ops else ""))
    print(f"{'spec':<14}{'rss/vec':>9}{'faiss/vec':>11}{'index/vec':>11}{'table/vec':>11}{'fixed/vec':>11}"
          f"{'rest/vec':>10}"
          f"{'budget':>8}{'load s':>8}" + (f"{'get100 s':>10}{'exact':>7}{'reups10k s':>12}{'del10k s':>10}"
                                           if args.ops else ""))
    for spec in args.spec or DEFAULT_SPECS:
        cmd = [sys.executable, "-m", "bench.memory_bench", "--child", spec, "--n", str(args.n), "--dim",
               str(args.dim), "--metric", args.metric, "--seed", str(args.seed)] + (["--ops"] if args.ops else [])
        res = subprocess.run(cmd, env=dict(os.environ, **_SHARD_ENV), capture_output=True, text=True)
        if res.returncode:
            print(f"{spec:<14} failed:\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        per = {k: r[k] / r["n"] for k in ("rss", "faiss", "index", "table", "fixed")}
        line = (f"{spec:<14}{per['rss']:>9.1f}{per['faiss']:>11.1f}{per['index']:>11.1f}{per['table']:>11.1f}"
                f"{per['fixed']:>11.1f}{per['rss'] - per['index'] - per['table'] - per['fixed']:>10.1f}{per['faiss'] + 48:>8.0f}{r['load_s']:>8.1f}")
        if args.ops:
            line += (f"{r['get100_s']:>10.3f}{str(r['get_exact']):>7}{r['reupsert10k_s']:>12.3f}"
                     f"{r['delete10k_s']:>10.3f}")
        print(line + ("" if r["trained"] else "  (not trained)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
