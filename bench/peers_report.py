"""The report of bench/peers_bench.py: per (dimension, index, system, batch) rows, the summary against the target
(lookalike's single-query QPS over milvus-lite's at equal recall) and the Markdown tables.

May use: nothing else of the project.
"""

from __future__ import annotations

SYSTEMS = {"lookalike": "lookalike", "faiss": "in-process FAISS", "milvus": "milvus-lite"}
INDEXES = {"flat": "Flat", "ivf": "IVF", "hnsw": "HNSW"}
TARGET_RATIO = 20.0  # lookalike >= 20x milvus-lite's single-query QPS at equal recall


def _row(out: dict, dim: int, index: str, system: str, batch: int) -> tuple[dict | None, dict | None]:
    for r in out["results"]:
        if (r["dim"], r["index"], r["system"]) == (dim, index, system):
            for row in r["rows"]:
                if row["batch"] == batch and "qps" in row:
                    return r, row
            return r, None
    return None, None


def summarize(out: dict) -> dict:
    """lookalike ÷ milvus-lite and lookalike ÷ in-process QPS per (D, index, batch), and the 20x target."""
    keys = sorted({(r["dim"], r["index"]) for r in out["results"]},
                  key=lambda x: (x[0], list(INDEXES.values()).index(x[1])))
    batches = sorted({row["batch"] for r in out["results"] for row in r["rows"]})
    ratios, targets = [], []
    for dim, index in keys:
        for b in batches:
            got = {s: _row(out, dim, index, s, b) for s in SYSTEMS}
            qps = {s: row["qps"] if row else None for s, (_, row) in got.items()}
            rec = {s: r["recall"] if r else None for s, (r, _) in got.items()}
            lk = qps["lookalike"]
            ratio = {s: lk / qps[s] if lk and qps[s] else None for s in ("milvus", "faiss")}
            ratios.append({"dim": dim, "index": index, "batch": b, "qps": qps, "recall": rec,
                           "lookalike_over_milvus": ratio["milvus"], "lookalike_over_faiss": ratio["faiss"]})
            if b == 1 and ratio["milvus"] is not None:
                equal = rec["lookalike"] is not None and rec["milvus"] is not None and \
                    rec["lookalike"] >= rec["milvus"] - 0.01
                targets.append({"dim": dim, "index": index, "ratio": ratio["milvus"],
                                "recall_lookalike": rec["lookalike"], "recall_milvus": rec["milvus"],
                                "recall_not_lower": equal, "met": equal and ratio["milvus"] >= TARGET_RATIO})
    return {"ratios": ratios, "targets": targets}


def _f(x, fmt: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _x(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt) + "x"


def markdown(out: dict) -> str:
    cfg, m = out["config"], out["machine"]
    lines: list[str] = []
    add = lines.append
    mv = (out.get("milvus") or {}).get("versions") or {}
    add(f"N={cfg['n']} D={','.join(map(str, cfg['dims']))} k={cfg['k']} queries={cfg['queries']}; lookalike "
        f"{cfg['shards']} shards (Ray CPUs {cfg['shard_cpus']} each, 1 FAISS thread); {m['cpus']} CPUs; "
        f"faiss {m['faiss']}, numpy {m['numpy']}" + (f", ray {m['ray']}" if m.get("ray") else "") +
        (f", milvus-lite {mv.get('milvus_lite')}, pymilvus {mv.get('pymilvus')} (worker: faiss "
         f"{mv.get('faiss')}, numpy {mv.get('numpy')})" if mv else "") + f"; Python {m['python']}; {m['date']}")
    add("")
    add(f"### Search (recall target {cfg['recall']:g} for IVF/HNSW parameters; at most {cfg['seconds']:g}s or "
        f"{cfg['max_requests']} sequential requests per row after one warm-up)")
    add("")
    add(f"| D | index | batch | system | index actually used | search parameter | recall@{cfg['k']} (queries) | "
        "QPS | p50 ms | p99 ms | requests | others' CPU |")
    add("|---:|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
    order = list(INDEXES.values())
    for r in sorted(out["results"], key=lambda r: (r["dim"], order.index(r["index"]), list(SYSTEMS).index(r["system"]))):
        param = f"{r['param']} {r['value']}" if r.get("param") else "exact"
        if not r.get("target_reached", True):
            param += " (target not reached)"
        for row in r["rows"]:
            head = f"| {r['dim']} | {r['index']} | {row['batch']} | {SYSTEMS[r['system']]} | {r['used']} | {param} | " \
                   f"{r['recall']:.3f} ({r['recall_queries']}) |"
            if "skipped" in row:
                add(f"{head} skipped: {row['skipped']} | | | | |")
            else:
                add(f"{head} {row['qps']:.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['requests']} | "
                    f"{_f(row.get('foreign_cpu_cores'), '.2f', '')} |")
    add("")
    add("### Ratios (QPS)")
    add("")
    add("| D | index | batch | lookalike QPS | in-process QPS | milvus-lite QPS | lookalike ÷ milvus-lite | "
        "lookalike ÷ in-process | recall@k lookalike / in-process / milvus-lite |")
    add("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in out["summary"]["ratios"]:
        q, rc = r["qps"], r["recall"]
        add(f"| {r['dim']} | {r['index']} | {r['batch']} | {_f(q['lookalike'])} | {_f(q['faiss'])} | "
            f"{_f(q['milvus'])} | {_x(r['lookalike_over_milvus'], '.1f')} | {_x(r['lookalike_over_faiss'], '.2f')} | "
            f"{_f(rc['lookalike'], '.3f')} / {_f(rc['faiss'], '.3f')} / {_f(rc['milvus'], '.3f')} |")
    if out["summary"]["targets"]:
        add("")
        add(f"### Target: lookalike >= {TARGET_RATIO:g}x milvus-lite's single-query QPS at equal recall")
        add("")
        add("| D | index | lookalike ÷ milvus-lite (batch 1) | recall lookalike / milvus-lite | met |")
        add("|---:|---|---:|---|---|")
        for t in out["summary"]["targets"]:
            note = "" if t["recall_not_lower"] else " (lookalike's recall is lower)"
            add(f"| {t['dim']} | {t['index']} | {t['ratio']:.1f}x | {_f(t['recall_lookalike'], '.3f')} / "
                f"{_f(t['recall_milvus'], '.3f')}{note} | {'yes' if t['met'] else 'no'} |")
    add("")
    add("### Build")
    add("")
    add("| D | index | system | seconds | what |")
    add("|---:|---|---|---:|---|")
    for r in sorted(out["results"], key=lambda r: (r["dim"], order.index(r["index"]), list(SYSTEMS).index(r["system"]))):
        b = r.get("build") or {}
        add(f"| {r['dim']} | {r['index']} | {SYSTEMS[r['system']]} | {_f(b.get('seconds'))} | {b.get('what', '')} |")
    for ins in (out.get("milvus") or {}).get("insert", []):
        add("")
        add(f"milvus-lite D={ins['dim']}: inserted {ins['rows']} rows in {ins['seconds']:.1f}s "
            f"({ins['rows'] / max(ins['seconds'], 1e-9):.0f}/s), flush + compaction {ins['flush_seconds']:.1f}s; "
            f"{ins['segments']} segments ({ins['segment_rows']}).")
    for e in out.get("hnsw_estimates", []):
        add("")
        add(f"HNSW build estimate at D={e['dim']} (from a 1-thread build of {e['sample']} vectors in "
            f"{e['sample_seconds_1_thread']:.1f}s): lookalike {e['lookalike']:.0f}s, in-process {e['faiss']:.0f}s, "
            f"milvus-lite {e['milvus']:.0f}s.")
    for note in out.get("notes", []):
        add("")
        add(f"Note: {note}")
    return "\n".join(lines)
