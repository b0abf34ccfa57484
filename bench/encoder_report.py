"""The Markdown report of bench/encoder_bench.py: retrieval accuracy per edit, copy and different-photo distances,
thresholds, the CNNs on training and held-out photos, faces and throughput.

May use: bench.encoder_photos.
"""

from __future__ import annotations

from bench.encoder_photos import EDIT_NAMES


def _f(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == int(x) and abs(x) < 1e6 and nd == 0:
            return str(int(x))
        return f"{x:.{nd}f}"
    return str(x)


def _acc(s: dict | None) -> str:
    if not s or not s["n"]:
        return "-"
    return f"{s['correct']}/{s['n']}"


def markdown(out: dict) -> str:
    L = []
    m = out["machine"]
    L.append(f"# Encoder benchmark ({out['date']})\n")
    L.append(f"{m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}; total {out['total_seconds']} s.\n")
    L.append("## Photos\n")
    L.append("| photo | source | size | split |")
    L.append("|---|---|---|---|")
    for p in out["photos"]:
        L.append(f"| {p['name']} | {p['source']} | {p['size'][0]}x{p['size'][1]} | {p['split']} |")
    if out["photos_failed"]:
        L.append("\nLoaders skipped (not bundled offline): " + ", ".join(
            f"{f['name']} ({f['reason'][:70]})" for f in out["photos_failed"]))
    L.append("")
    q = out["quality"]
    grey_c = "greyscale (colour photos)"
    folds = out.get("folds", 1)
    L.append("## Top-1 retrieval of edited copies (database = all originals)\n")
    if folds > 1:
        L.append(f"CNN rows: {folds} models per method, each trained without one fold; held-out = every photo "
                 "scored by the model that did not see it.\n")
    L.append("| encoder | " + " | ".join(EDIT_NAMES) + f" | all | {grey_c} |")
    L.append("|---|" + "---:|" * (len(EDIT_NAMES) + 2))
    for label, r in q.items():
        g = "all" if "all" in r["accuracy"] else "held-out"
        a = r["accuracy"][g]
        L.append(f"| {label}{'' if g == 'all' else f' (held-out, {folds} folds)'} | "
                 + " | ".join(_acc(a[e]) for e in EDIT_NAMES) + f" | {_acc(a['all'])} | {_acc(a.get(grey_c))} |")
    L.append("\n## Training vs held-out photos\n")
    L.append("| encoder | photos | " + " | ".join(EDIT_NAMES) + f" | all | {grey_c} |")
    L.append("|---|---|" + "---:|" * (len(EDIT_NAMES) + 2))
    for label, r in q.items():
        for g in ("train", "held-out"):
            a = r["accuracy"].get(g)
            if a:
                L.append(f"| {label} | {g} | " + " | ".join(_acc(a[e]) for e in EDIT_NAMES)
                         + f" | {_acc(a['all'])} | {_acc(a.get(grey_c))} |")
    L.append("\n## Training\n")
    L.append("| model | method | epochs | photos | seconds | loss first -> last |")
    L.append("|---|---|---:|---:|---:|---|")
    for label, t in out["training"].items():
        L.append(f"| {label} | {t['method']} | {t['epochs']} | {t['images']} | {t['seconds']} | "
                 f"{t['loss_first']:.4f} -> {t['loss_last']:.4f} |")
    L.append("\n## Copy distances (largest per edit) vs different-photo distances\n")
    L.append("| encoder | photos | " + " | ".join(EDIT_NAMES) + " | diff min | diff p5 | diff median |")
    L.append("|---|---|" + "---:|" * (len(EDIT_NAMES) + 3))
    for label, r in q.items():
        nd = 0 if r["metric"] == "hamming" else 3
        for g in ("all", "held-out"):
            if g == "held-out" and not label.startswith("cnn"):
                continue
            cd, th = r["copy_distance"].get(g), r["thresholds"].get(g)
            if not cd or not th:
                continue
            L.append(f"| {label} | {g} | " + " | ".join(_f(cd[e]["max"] if cd[e] else None, nd) for e in EDIT_NAMES)
                     + f" | {_f(th['diff_min'], nd)} | {_f(th['diff_p5'], nd)} | {_f(th['diff_median'], nd)} |")
    L.append("\n## Thresholds (a pair is a copy when distance <= t)\n")
    L.append("| encoder | photos | metric | t (min miss + false) | miss | false match | t (no false match) | miss |"
             " misses per edit at the first t |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---|")
    for label, r in q.items():
        nd = 0 if r["metric"] == "hamming" else 3
        for g in ("all", "held-out"):
            if g == "held-out" and not label.startswith("cnn"):
                continue
            th = r["thresholds"].get(g)
            if not th:
                continue
            z = th["zero_false_match"]
            pe = ", ".join(f"{e} {v:.2f}" for e, v in th["miss_per_edit_at_best"].items() if v)
            L.append(f"| {label} | {g} | {r['metric']} | {_f(th['best']['t'], nd)} | {th['best']['miss']:.3f} | "
                     f"{th['best']['false_match']:.4f} | {_f(z['t'], nd) if z else '-'} | "
                     f"{_f(z['miss']) if z else '-'} | {pe or 'none'} |")
    L.append("\n## Copies within the default match threshold (what the contact sheet marks as a match)\n")
    L.append("| encoder | photos | rule | " + " | ".join(EDIT_NAMES) + " | false match |")
    L.append("|---|---|---|" + "---:|" * (len(EDIT_NAMES) + 1))
    for label, r in q.items():
        for g in ("all", "held-out"):
            if g == "held-out" and not label.startswith("cnn"):
                continue
            fx = (r["thresholds"].get(g) or {}).get("fixed")
            if not fx:
                continue
            w = fx["within_per_edit"]
            L.append(f"| {label} | {g} | {r.get('match_rule') or '-'} | "
                     + " | ".join(f"{w[e]['within']}/{w[e]['n']}" for e in EDIT_NAMES)
                     + f" | {fx['false_match']:.4f} |")
    f = out.get("face")
    if f:
        L.append("\n## Face encoder (dlib, Euclidean)\n")
        if "skipped" in f:
            L.append(f"Skipped: {f['skipped']}")
        else:
            L.append(f"Face detected in: {', '.join(f['photos_with_face']) or 'none'} "
                     f"(of {len(f['photos_with_face']) + len(f['photos_without_face'])} photos).")
            if "lfw" in f:
                L.append(f" LFW subset: {f['lfw']}.")
            L.append("")
            L.append("| queries | " + " | ".join(EDIT_NAMES) + " | all |")
            L.append("|---|" + "---:|" * (len(EDIT_NAMES) + 1))
            for g, a in f.get("accuracy", {}).items():
                L.append(f"| {g} (top-1) | " + " | ".join(
                    f"{_acc(a[e])}" + (f" ({a[e]['n'] - a[e]['encoded']} no face)" if a[e]["n"] - a[e]["encoded"] else "")
                    for e in EDIT_NAMES) + f" | {_acc(a['all'])} |")
            for g, cd in f.get("copy_distance", {}).items():
                L.append(f"| {g} (max copy dist) | " + " | ".join(_f(cd[e]["max"] if cd[e] else None) for e in EDIT_NAMES)
                         + " | |")
            for g, th in f.get("thresholds", {}).items():
                z = th["zero_false_match"]
                L.append(f"\n{g}: different-face distance min {th['diff_min']:.3f}, p5 {th['diff_p5']:.3f}, median "
                         f"{th['diff_median']:.3f}; t = {th['best']['t']:.3f}: miss {th['best']['miss']:.3f}, false "
                         f"match {th['best']['false_match']:.4f}"
                         + (f"; no false match up to {z['t']:.3f} (miss {z['miss']:.3f})" if z else "")
                         + (f"; at dlib's 0.6: miss {th['fixed']['miss']:.3f}, false match "
                            f"{th['fixed']['false_match']:.4f}" if "fixed" in th else ""))
    t = out.get("throughput")
    if not t:
        return "\n".join(L) + "\n"
    L.append(f"\n## Throughput ({t['images']} crops, long side {t['side']} px, JPEG q90 mean {t['jpeg_kib_mean']} KiB)\n")
    L.append("| encoder | batch | encode_images img/s | others' cores | encode_many (decode + encode) img/s | others' cores |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for r in t["rows"]:
        L.append(f"| {r['encoder']} | {r['batch']} | {r['encode_images']['images_per_s']} | "
                 f"{r['encode_images']['others_cores']} | {r['decode_encode']['images_per_s']} | "
                 f"{r['decode_encode']['others_cores']} |")
    ing = out.get("ingest")
    if ing:
        L.append(f"\n## Ingest end to end ({ing['files']} JPEGs, {ing['mib']} MiB, batch {ing['batch']}; LocalCluster 2 "
                 "shards + router gRPC, one process)\n")
        L.append("| encoder | stored | failed | seconds | img/s | others' cores | resume (all stored) s | "
                 "search-by-image top-1 |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in ing["rows"]:
            L.append(f"| {r['label']} | {r['stored']} | {r['failed']} | {r['seconds']} | {r['images_per_s']} | "
                     f"{r['others_cores']} | {r['resume_seconds']} | {r['search_check']} |")
    return "\n".join(L) + "\n"
