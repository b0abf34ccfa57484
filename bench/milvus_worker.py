"""The milvus-lite side of bench/peers_bench.py, run by it as a child process (possibly with another virtualenv's
Python, see peers_bench's docstring):

    python -m bench.milvus_worker CONFIG.json      # cwd: the repository root

CONFIG.json (written by ``peers_bench.bench_milvus``) names .npy files with the vectors, the queries and the exact
top-k ids, the index kinds to run, the evaluation settings and where to write the results. The worker:

1. opens ``MilvusClient("<tmp>/milvus.db")``: pymilvus starts milvus-lite's gRPC server in threads of this process
   and talks to it over gRPC on localhost (milvus-lite's normal embedded mode);
2. creates one collection (``id`` INT64 primary key, ``vec`` FLOAT_VECTOR), inserts the rows in batches, flushes
   and waits for milvus-lite's background compaction;
3. for each index kind: ``create_index`` (FLAT / IVF_FLAT with as many rows per list as a lookalike shard / HNSW),
   ``load_collection``, then reads which index each sealed segment really holds (milvus-lite internals: 3.x accepts
   index types it does not build, and then brute-forces, while ``describe_index`` says "Finished");
4. calibrates, measures recall and times searches with ``bench.peers_eval.evaluate`` (the code the other systems
   use), searching with ``output_fields=["id"]`` so that no vectors come back.

Imports only numpy, pymilvus and milvus-lite (plus psutil if there): it must run in a minimal virtualenv.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections import Counter

import numpy as np

from bench.peers_eval import MILVUS_SEGMENT_ROWS, EvalSettings, ef_ladder, evaluate, log, nprobe_ladder
from bench.timing import watch_foreign_cpu

COLLECTION = "peers"
FIELD = "vec"
GIB = 1 << 30
_CLASS_NAMES = {"BruteForceIndex": "FLAT (NumPy brute force)", "FaissIvfFlatIndex": "IVF_FLAT (FAISS IndexIVFFlat)",
                "FaissHnswIndex": "HNSW (FAISS IndexHNSWFlat)"}


def engine_collection(db_path: str, name: str):
    """milvus-lite's own Collection object behind the pymilvus client (3.x runs it in this process), or None."""
    try:
        from milvus_lite import server_manager_instance

        entry = server_manager_instance._servers.get(os.path.abspath(db_path))
        return entry[1].get_collection(name) if entry else None
    except Exception:
        return None


def wait_background(col) -> None:
    """Waits for milvus-lite's background compaction and index builds."""
    if col is not None and hasattr(col, "_wait_for_bg"):
        col._wait_for_bg()


def segment_rows(col) -> list[int]:
    return [int(s.num_rows) for s in col._segment_cache.values() if s.num_rows] if col is not None else []


def index_in_use(col) -> dict:
    """What the segments really hold: {"text", "brute_force", "max_segment_rows", "segments", "memtable_rows"}."""
    if col is None:
        return {"text": "unknown (milvus-lite internals not reachable)", "brute_force": True,
                "max_segment_rows": MILVUS_SEGMENT_ROWS, "segments": None, "memtable_rows": None}
    kinds: Counter = Counter()
    detail = ""
    brute = False
    for seg in col._segment_cache.values():
        if not seg.num_rows:
            continue
        ix = seg.indexes.get(FIELD)
        name = type(ix).__name__ if ix is not None else None
        kinds[_CLASS_NAMES.get(name, name) if name else "no index (NumPy brute force per search)"] += 1
        brute = brute or name in (None, "BruteForceIndex")
        inner = getattr(ix, "_index", None)
        if name == "FaissIvfFlatIndex" and inner is not None and not detail:
            detail = f" nlist={inner.nlist}"
        if name == "FaissHnswIndex" and inner is not None and not detail:
            detail = f" M={inner.hnsw.nb_neighbors(1)} efConstruction={inner.hnsw.efConstruction}"
    rows = segment_rows(col)
    memtable = int(col._memtable.size())
    text = "; ".join(f"{k}{detail if 'FAISS' in k else ''} on {c} segment{'s' if c > 1 else ''}"
                     for k, c in kinds.items())
    text += f" ({min(rows)}-{max(rows)} rows each)" if rows else ""
    if memtable:
        text += f"; {memtable} rows in the memtable (brute force)"
        brute = True
    return {"text": text or "no segments", "brute_force": brute, "max_segment_rows": max(rows, default=0),
            "segments": len(rows), "memtable_rows": memtable}


def insert_all(client, xb: np.ndarray, batch: int) -> dict:
    n = len(xb)
    t0 = time.perf_counter()
    step = max(batch, n // 10)
    next_report = step
    for s in range(0, n, batch):
        e = min(n, s + batch)
        chunk = np.ascontiguousarray(xb[s:e])
        client.insert(COLLECTION, [{"id": i, FIELD: chunk[i - s]} for i in range(s, e)])
        if e >= next_report or e == n:
            dt = time.perf_counter() - t0
            log(f"milvus-lite: inserted {e}/{n} ({e / dt:.0f}/s)")
            next_report += step
    return {"rows": n, "seconds": time.perf_counter() - t0}


def index_spec(index: str, cfg: dict, rows: list[int], k: int) -> tuple[str, dict, str | None, list[int] | None]:
    """(milvus index_type, build params, search parameter name, calibration ladder) for a kind."""
    if index == "IVF":
        typical = int(np.median(rows)) if rows else min(MILVUS_SEGMENT_ROWS, cfg["n"])
        nlist = max(1, round(typical / cfg["list_size"]))
        return "IVF_FLAT", {"nlist": nlist}, "nprobe", nprobe_ladder(nlist)
    if index == "HNSW":
        return "HNSW", {"M": cfg["hnsw_m"], "efConstruction": cfg["ef_construction"]}, "ef", ef_ladder(k)
    return "FLAT", {}, None, None


def run(cfg: dict) -> dict:
    import faiss
    import milvus_lite
    import pymilvus
    from pymilvus import DataType, MilvusClient

    try:
        import psutil  # noqa: F401

        watch_foreign_cpu()
    except ImportError:
        pass
    st = EvalSettings.from_dict(cfg["settings"])
    dim = cfg["dim"]
    xb = np.load(cfg["xb"], mmap_mode="r")
    xq = np.load(cfg["xq"])
    gt = np.load(cfg["gt"])
    cfg.setdefault("n", len(xb))
    out = {"results": [], "notes": [],
           "versions": {"milvus_lite": milvus_lite.__version__, "pymilvus": pymilvus.__version__,
                        "faiss": faiss.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                        "executable": sys.executable}}
    client = MilvusClient(cfg["db"])
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field(FIELD, DataType.FLOAT_VECTOR, dim=dim)
        client.create_collection(COLLECTION, schema=schema)
        ins = insert_all(client, xb, cfg["insert_batch"])
        t = time.perf_counter()
        client.flush(COLLECTION)
        col = engine_collection(cfg["db"], COLLECTION)
        wait_background(col)
        rows = segment_rows(col)
        ins.update(flush_seconds=time.perf_counter() - t, segments=len(rows),
                   segment_rows=f"{min(rows)}-{max(rows)} rows" if rows else "unknown")
        out["insert"] = ins
        log(f"milvus-lite D={dim}: {ins['rows']} rows in {ins['seconds']:.1f}s, flush + compaction "
            f"{ins['flush_seconds']:.1f}s, {len(rows)} segments")
        if col is None:
            out["notes"].append("milvus-lite internals not reachable: the index each segment holds is not verified")

        indexed = False
        for index in cfg["indexes"]:
            out["results"].append(run_index(client, col, index, cfg, rows, xq, gt, st, indexed))
            indexed = True
    finally:
        client.close()
    return out


def run_index(client, col, index: str, cfg: dict, rows: list[int], xq: np.ndarray, gt: np.ndarray,
              st: EvalSettings, indexed: bool) -> dict:
    k, dim = st.k, cfg["dim"]
    if indexed:
        client.release_collection(COLLECTION)
        client.drop_index(COLLECTION, FIELD)
    itype, params, key, ladder = index_spec(index, cfg, rows, k)
    ip = client.prepare_index_params()
    # pymilvus 3.0.2 sends build parameters as one key each (M=32, ...); milvus-lite 3.2.2 reads them only from a
    # JSON "params" key and otherwise silently builds with its defaults (M=16, efConstruction=200, nlist=128).
    # Send both; index_in_use() below reads back what was built.
    ip.add_index(field_name=FIELD, index_type=itype, metric_type="L2", params={**params, "params": params})
    t = time.perf_counter()
    client.create_index(COLLECTION, ip)
    client.load_collection(COLLECTION)
    wait_background(col)
    build_s = time.perf_counter() - t
    used = index_in_use(col)
    described = client.describe_index(COLLECTION, FIELD)
    log(f"milvus-lite {index} D={dim}: create_index {itype} {params} + load {build_s:.1f}s; in use: {used['text']}")

    def search_for(v):
        sp = {"params": {key: v} if key else {}}
        return lambda q: client.search(COLLECTION, data=q, limit=k, search_params=sp, output_fields=["id"],
                                       anns_field=FIELD)

    def ids_for(v):
        fn = search_for(v)

        def ids(q):
            return np.array([[h["id"] for h in hits] + [-1] * (k - len(hits)) for hits in fn(q)], dtype=np.int64)
        return ids

    # milvus-lite's brute force materialises (batch, segment rows, dim) float32 differences (and as much again
    # while reducing them): bound the batch of recall requests, and skip timed batches that would not fit.
    per_query = 2 * max(1, used["max_segment_rows"]) * dim * 4
    limit = cfg["max_temp_gib"] * GIB
    chunk = max(1, min(100, int(limit // per_query))) if used["brute_force"] else 100

    def skip(batch: int) -> str | None:
        if used["brute_force"] and batch * per_query > limit:
            return (f"milvus-lite's brute force would hold a {batch} x {used['max_segment_rows']} x {dim} float32 "
                    f"array per segment ({batch * per_query / 2 / GIB:.1f} GiB, twice that at its peak; "
                    f"--milvus-max-temp-gib {cfg['max_temp_gib']:g})")
        return None

    res = evaluate(search_for, ids_for, ladder, xq, gt, st, f"milvus-lite {index} D={dim}", chunk=chunk, skip=skip)
    res.update(system="milvus", index=index, dim=dim, used=used["text"],
               param={"nprobe": "nprobe per segment", "ef": "ef"}.get(key),
               asked={"index_type": itype, "params": params,
                      "describe_index": {k2: str(v) for k2, v in (described or {}).items()}},
               segments=used["segments"], memtable_rows=used["memtable_rows"],
               build={"seconds": build_s, "what": f"create_index {itype} + load (after the insert below)"})
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    cfg = json.loads(pathlib.Path(argv[0]).read_text())
    out = run(cfg)
    pathlib.Path(cfg["out"]).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
