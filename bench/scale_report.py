"""The report of bench/scale_bench.py: per index family and shard count, the cluster against in-process FAISS
(bytes per vector, restart against build time, the parameter each needs for the target recall, QPS per batch and
8 shards over 4), and the Markdown tables.

May use: nothing else of the project.
"""

from __future__ import annotations


def _faiss_qps(q: dict, batch: str, fmt: str) -> str:
    """FAISS's QPS at a batch size, all cores / 1 thread (and without precomputed tables, when measured)."""
    if batch not in q:
        return "-"
    r = q[batch]
    text = f"{r['all cores']['qps']:{fmt}} / {r['1 thread']['qps']:{fmt}}"
    if "all cores, no tables" in r:
        text += f" (no tables: {r['all cores, no tables']['qps']:{fmt}} / {r['1 thread, no tables']['qps']:{fmt}})"
    return text


def _best_faiss(f: dict, batch: int) -> dict:
    return max(f["qps"][str(batch)].values(), key=lambda r: r["qps"])


def summarize(out: dict) -> list[dict]:
    """One row per (family, shard count): the ratios the issue asks for."""
    rows = []
    for e in out["families"]:
        f = e["faiss"]
        by_s = {c["shards"]: c for c in e["cluster"]}
        for c in e["cluster"]:
            row = {"spec": e["spec"], "n": e["n"], "shards": c["shards"],
                   "load_vectors_per_s": c["load"]["vectors_per_s"],
                   "cluster_bytes_per_vector": c["memory"]["bytes_per_vector"],
                   "faiss_bytes_per_vector": f["bytes_per_vector"],
                   "ram_ratio": c["memory"]["bytes_per_vector"] / f["bytes_per_vector"],
                   "restart_seconds": c["restart"]["seconds"], "faiss_build_seconds": f["build_seconds"],
                   "restart_over_build": c["restart"]["seconds"] / f["build_seconds"],
                   "param": c["param"], "cluster_param": c["sweep"]["value"], "faiss_param": f["sweep"]["value"],
                   "cluster_recall": c["sweep"]["recall"], "faiss_recall": f["sweep"]["recall"],
                   "target_met": c["sweep"]["met"] and f["sweep"]["met"], "trained": c["trained"]}
            for b in out["config"]["batches"]:
                cq, fq = c["qps"][str(b)]["qps"], _best_faiss(f, b)["qps"]
                row[f"qps_b{b}"] = cq
                row[f"faiss_qps_b{b}"] = fq
                row[f"qps_ratio_b{b}"] = cq / fq
                four = by_s.get(4)
                if c["shards"] == 8 and four:
                    row[f"qps_8_over_4_b{b}"] = cq / four["qps"][str(b)]["qps"]
                same = c.get("faiss_same_training")
                if same and str(b) in same.get("qps", {}):
                    row[f"same_training_qps_b{b}"] = _best_faiss(same, b)["qps"]
                    row[f"same_training_ratio_b{b}"] = cq / row[f"same_training_qps_b{b}"]
            if c.get("turns"):
                row["turns_ratio"] = c["turns"]["ratio_median"]
            rows.append(row)
    return rows


def markdown(out: dict) -> str:
    cfg, m = out["config"], out["machine"]
    lines = [f"n={cfg['n']} (HNSW: {min(cfg['hnsw_n'], cfg['n'])}) d={cfg['dim']}, shards {cfg['shards']} (Ray CPUs "
             f"{cfg['shard_cpus']} each, 1 FAISS thread; shards a process: {cfg.get('per_process', 1) or 'all'}; "
             f"the router's batches in flight {cfg.get('batch_inflight', 1)}), {cfg['queries']} queries, "
             f"k={cfg['k']}, target recall@"
             f"{cfg['k']} >= {cfg['target']}; {m['cpus']} CPUs, {m['memory_gib']} GiB; faiss {m['faiss']}, "
             f"ray {m['ray']}, numpy {m['numpy']}, Python {m['python']}; {m['date']}", ""]
    add = lines.append
    add("| index | shards | load vec/s | RAM B/vec cluster | FAISS | ratio | restart s | FAISS build s | "
        "restart / build | param cluster / FAISS | recall cluster / FAISS | QPS b1 cluster / FAISS | ratio | "
        "QPS b100 cluster / FAISS | ratio | 8/4 QPS b1 | 8/4 QPS b100 |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|---:|---:|---:|")
    for r in out["summary"]:
        param = f"{r['param']} {r['cluster_param']} / {r['faiss_param']}" if r["param"] else "-"
        flag = "" if r["target_met"] else " (plateau)"
        add(f"| {r['spec']} | {r['shards']} | {r['load_vectors_per_s']:.0f} | {r['cluster_bytes_per_vector']:.0f} | "
            f"{r['faiss_bytes_per_vector']:.0f} | {r['ram_ratio']:.2f} | {r['restart_seconds']:.1f} | "
            f"{r['faiss_build_seconds']:.1f} | {r['restart_over_build']:.2f} | {param} | "
            f"{r['cluster_recall']:.3f} / {r['faiss_recall']:.3f}{flag} | "
            f"{r.get('qps_b1', 0):.1f} / {r.get('faiss_qps_b1', 0):.1f} | {r.get('qps_ratio_b1', 0):.2f} | "
            f"{r.get('qps_b100', 0):.0f} / {r.get('faiss_qps_b100', 0):.0f} | {r.get('qps_ratio_b100', 0):.2f} | "
            f"{_fmt(r.get('qps_8_over_4_b1'))} | {_fmt(r.get('qps_8_over_4_b100'))} |")
    add("")
    add("| index | FAISS build: read + train + add s | FAISS QPS b1 all cores / 1 thread | "
        "FAISS QPS b100 all cores / 1 thread | shards | cluster start s | load s | wait trained s (how) | "
        "idle wait s | stop s | restart: Ray up / cluster up / full answer s | same ids after restart |")
    add("|---|---|---|---|---:|---:|---:|---|---:|---:|---|---|")
    for e in out["families"]:
        f = e["faiss"]
        q = f["qps"]
        fb = f"{f['read_seconds']:.1f} + {f.get('train_seconds', 0.0):.1f} + {f['add_seconds']:.1f}"
        q1, q100 = _faiss_qps(q, "1", ".1f"), _faiss_qps(q, "100", ".0f")
        for c in e["cluster"]:
            tr = c["trained"]
            add(f"| {e['spec']} | {fb} | {q1} | {q100} | {c['shards']} | {c['start_seconds']:.1f} | "
                f"{c['load']['seconds']:.1f} | {tr['seconds']:.1f} (v{tr.get('version', 0)}{'' if tr['trained'] else ', timed out'}) "
                f"| {c['idle_wait_seconds']:.0f} | {c['stop_seconds']:.1f} | {c['restart_ray_seconds']:.1f} / "
                f"{c['restart_cluster_seconds']:.1f} / {c['restart']['seconds']:.1f} | "
                f"{'yes' if c['restart']['same_ids_as_before'] else 'no'} |")
    add("")
    add("| index | shards | batch | cluster QPS by requests in flight | FAISS QPS by setting |")
    add("|---|---:|---:|---|---|")
    for e in out["families"]:
        for c in e["cluster"]:
            for b, by in c.get("qps_by_concurrency", {}).items():
                ours = ", ".join(f"{k}: {r['qps']:.0f}" for k, r in by.items())
                theirs = ", ".join(f"{k}: {r['qps']:.0f}" for k, r in e["faiss"]["qps"].get(b, {}).items())
                add(f"| {e['spec']} | {c['shards']} | {b} | {ours} | {theirs} |")
    same = [(e, c) for e in out["families"] for c in e["cluster"] if c.get("faiss_same_training")]
    if same:
        add("")
        add("FAISS filled from each cluster's own trained index (the same lists: the same answers at the same nprobe):")
        add("")
        add("| index | shards | trained version | param cluster / FAISS | recall cluster / FAISS | "
            "QPS b1 cluster / FAISS | ratio | QPS b100 cluster / FAISS | ratio | FAISS QPS b100 by setting |")
        add("|---|---:|---:|---|---|---|---:|---|---:|---|")
        for e, c in same:
            f = c["faiss_same_training"]
            cells = []
            for b in ("1", "100"):
                if b in f["qps"] and b in c["qps"]:
                    fq, cq = _best_faiss(f, int(b))["qps"], c["qps"][b]["qps"]
                    cells += [f"{cq:.1f} / {fq:.1f}", f"{cq / fq:.2f}"]
                else:
                    cells += ["-", "-"]
            by = ", ".join(f"{k}: {r['qps']:.0f}" for k, r in f["qps"].get("100", {}).items())
            add(f"| {e['spec']} | {c['shards']} | {f['trained_version']} | {c['param']} {c['sweep']['value']} / "
                f"{f['sweep']['value']} | {c['sweep']['recall']:.3f} / {f['sweep']['recall']:.3f} | "
                f"{' | '.join(cells)} | {by} |")
    turns = [(e, c) for e in out["families"] for c in e["cluster"] if c.get("turns")]
    if turns:
        add("")
        add("The cluster and FAISS searched in turns (bench/scale_turns.py: each round a window of each, seconds "
            "apart):")
        add("")
        add("| index | shards | against | batch | param cluster / FAISS | FAISS setting | QPS each round cluster / "
            "FAISS | ratio: median (lowest - highest) |")
        add("|---|---:|---|---:|---|---|---|---|")
        for e, c in turns:
            t = c["turns"]
            qps = ", ".join(f"{r['cluster_qps']:.0f} / {r['faiss_qps']:.0f}" for r in t["rounds"])
            param = f"{c['param']} {t['cluster_param']} / {t['faiss_param']}" if c["param"] else "-"
            add(f"| {e['spec']} | {c['shards']} | {t['against']} | {t['batch']} | {param} | {t['faiss_setting']} | "
                f"{qps} | **{t['ratio_median']:.2f}** ({t['ratio_min']:.2f} - {t['ratio_max']:.2f}) |")
    for e in out["families"]:
        for c in e["cluster"]:
            if c.get("note"):
                add("")
                add(f"Note, {e['spec']}, {c['shards']} shards: {c['note']}.")
        for f in e.get("failed", []):
            add("")
            add(f"Failed: {e['spec']}, {f['shards']} shards: {f['error']}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"
