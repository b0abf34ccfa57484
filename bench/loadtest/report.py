"""What a load test reports: the workers' records merged, latency percentiles (all requests and per kind), errors
by status code, send lag, a per-second timeline, recall@k against exact search, the printed report, its JSON and
its plot.

May use: bench.loadtest.config (and FAISS for exact search, matplotlib for the plot).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import grpc
import numpy as np

from bench.loadtest.config import OK, OPS, LoadConfig
from bench.loadtest.server_side import format_server


def percentile(values: np.ndarray, p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    if len(values) == 0:
        return float("nan")
    v = np.sort(np.asarray(values, dtype=np.float64))
    rank = min(len(v), max(1, math.ceil(p * len(v) / 100.0 - 1e-9)))  # the epsilon: 99.9 * 1000 / 100 > 999
    return float(v[rank - 1])


def _latency_stats(lat_s: np.ndarray) -> dict:
    ms = lat_s * 1000.0
    out = {"count": int(len(ms))}
    if len(ms):
        out.update({"mean": float(ms.mean()), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
                    "p99": percentile(ms, 99), "p99.9": percentile(ms, 99.9), "max": float(ms.max())})
    return out


def _code_name(code: int) -> str:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c.name
    return str(code)


def merge_records(records: list[dict]) -> dict:
    keys = ("op", "scheduled", "sent", "done", "code")
    out = {k: np.concatenate([r[k] for r in records]) if records else np.empty(0) for k in keys}
    order = np.argsort(out["scheduled"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    out["cpu_s"] = float(sum(r.get("cpu_s", 0.0) for r in records))
    out["recall"] = {}
    for r in records:
        for q, ids in r["recall"].items():
            out["recall"].setdefault(q, ids)
    return out


def summarize(rec: dict, cfg: LoadConfig, recall: dict | None = None) -> dict:
    """The report's figures from merged records (times in seconds from the start).

    - ``achieved_rate``: requests answered OK per second, over the time from the start to the last answer;
    - ``send_rate``: requests sent per second, over the time from the start to the last send;
    - latency: from the scheduled time (open loop) or the send (closed loop), in ms, nearest-rank percentiles,
      for all requests answered OK and for each kind; failed requests are counted under ``errors`` by code.
    """
    op, sched, sent, done, code = rec["op"], rec["scheduled"], rec["sent"], rec["done"], rec["code"]
    ok = code == OK
    span = float(done.max()) if len(done) else 0.0
    send_span = float(sent.max()) if len(sent) else 0.0
    lat = done - sched
    report = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "token"},  # no secret in reports
        "requests": int(len(op)),
        "ok": int(ok.sum()),
        "duration_s": span,
        "achieved_rate": float(ok.sum() / span) if span > 0 else 0.0,
        "send_rate": float(len(sent) / send_span) if send_span > 0 else 0.0,
        "queries_per_s": float((ok & (op == 0)).sum() * cfg.batch / span) if span > 0 else 0.0,
        "latency_ms": {"all": _latency_stats(lat[ok])},
        "send_lag_ms": _latency_stats(np.maximum(sent - sched, 0.0)),
        # CPU the load generator itself used (its processes; with one process, the whole calling process)
        "client_cpu_cores": float(rec.get("cpu_s", 0.0) / span) if span > 0 else 0.0,
        "errors": {},
    }
    for i, name in enumerate(OPS):
        sel = ok & (op == i)
        if (op == i).any():
            report["latency_ms"][name] = _latency_stats(lat[sel])
    for c in np.unique(code[~ok]).tolist():
        report["errors"][_code_name(int(c))] = int((code == c).sum())
    report["timeline"] = _timeline(sched, lat, ok)
    if recall is not None:
        report["recall"] = recall
    return report


def _timeline(sched: np.ndarray, lat: np.ndarray, ok: np.ndarray) -> list[dict]:
    """Per second of schedule: requests, errors, p50 and p99 latency (ms) of those answered OK."""
    out = []
    if not len(sched):
        return out
    sec = np.floor(sched).astype(np.int64)
    for s in range(int(sec.max()) + 1):
        sel = sec == s
        good = lat[sel & ok] * 1000.0
        out.append({"second": s, "requests": int(sel.sum()), "errors": int((sel & ~ok).sum()),
                    "p50_ms": percentile(good, 50), "p99_ms": percentile(good, 99)})
    return out


def exact_knn(metric: str, xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (D, I) from one FAISS flat index over ``xb`` in the metric (row numbers as ids)."""
    import faiss

    if metric == "hamming":
        index = faiss.IndexBinaryFlat(xb.shape[1] * 8)
    elif metric == "l2":
        index = faiss.IndexFlatL2(xb.shape[1])
    else:
        index = faiss.IndexFlatIP(xb.shape[1])
        if metric == "cosine":
            xb, xq = xb.copy(), xq.copy()
            faiss.normalize_L2(xb)
            faiss.normalize_L2(xq)
    index.add(np.ascontiguousarray(xb))
    return index.search(np.ascontiguousarray(xq), k)


def compute_recall(found: dict, data: np.ndarray, data_ids: list[str] | None, queries: np.ndarray, metric: str,
                   k: int, own_prefix: str) -> dict:
    """Recall@k of the recorded answers (query row -> returned ids) against exact search over ``data``."""
    if not found:
        return {"k": k, "queries": 0, "recall_at_k": None}
    rows = np.array(sorted(found), dtype=np.int64)
    _, I = exact_knn(metric, data, queries[rows], k)
    hits = 0
    for row, truth in zip(rows.tolist(), I):
        want = {data_ids[i] if data_ids is not None else str(i) for i in truth.tolist() if i >= 0}
        got = [u for u in found[row] if not u.startswith(own_prefix)][:k]
        hits += len(want.intersection(got))
    return {"k": k, "queries": int(len(rows)), "recall_at_k": hits / (k * len(rows))}


def plot(report: dict, rec: dict, path: str, title: str = "") -> None:
    """Latency over time (each request, with per-second p50/p99) and its distribution, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = (rec["done"] - rec["scheduled"]) * 1000.0
    ok = rec["code"] == OK
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.7, 1]})
    colors = {"search": "tab:blue", "upsert": "tab:orange", "delete": "tab:green"}
    for i, name in enumerate(OPS):
        sel = ok & (rec["op"] == i)
        if sel.any():
            a.scatter(rec["scheduled"][sel], lat[sel], s=3, alpha=0.35, color=colors[name], label=name,
                      rasterized=True)
            v = np.sort(lat[sel])
            b.plot(v, np.arange(1, len(v) + 1) / len(v), color=colors[name], label=name)
    if (~ok).any():
        a.scatter(rec["scheduled"][~ok], np.full((~ok).sum(), max(lat[ok].max() if ok.any() else 1.0, 1.0)),
                  s=12, marker="x", color="tab:red", label="error")
    tl = report["timeline"]
    secs = [t["second"] + 0.5 for t in tl]
    a.plot(secs, [t["p50_ms"] for t in tl], color="black", lw=1.2, label="p50 per second")
    a.plot(secs, [t["p99_ms"] for t in tl], color="black", lw=1.2, ls="--", label="p99 per second")
    a.set_yscale("log")
    a.set_xlabel("scheduled time (s)")
    a.set_ylabel("latency (ms)")
    a.legend(loc="upper left", fontsize=8, markerscale=3)
    a.grid(True, which="both", alpha=0.3)
    allv = report["latency_ms"]["all"]
    for p in ("p50", "p99", "p99.9"):
        if p in allv:
            b.axvline(allv[p], color="grey", ls=":", lw=1)
            b.text(allv[p], 0.02, f" {p} {allv[p]:.1f}", rotation=90, fontsize=8, va="bottom")
    b.set_xscale("log")
    b.set_xlabel("latency (ms)")
    b.set_ylabel("fraction of requests")
    b.set_title("distribution (CDF)", fontsize=10)
    b.grid(True, which="both", alpha=0.3)
    b.legend(loc="lower right", fontsize=8)
    cfg = report["config"]
    load = f"rate {cfg['rate']:g}/s" if cfg["mode"] == "open" else f"concurrency {cfg['concurrency']}"
    p99 = allv.get("p99", float("nan"))
    fig.suptitle(title or f"lookalike loadtest: {cfg['collection']}, {cfg['mode']} loop, {load}, batch "
                 f"{cfg['batch']}; achieved {report['achieved_rate']:.0f} req/s, p99 {p99:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict) -> str:
    lines = []
    cfg = report["config"]
    load = f"rate {cfg['rate']:g}/s ({cfg['arrivals']})" if cfg["mode"] == "open" else \
        f"concurrency {cfg['concurrency']}"
    lines.append(f"loadtest {cfg['collection']} at {cfg['target']}: {cfg['mode']} loop, {load}, "
                 f"{cfg['processes']} process(es), batch {cfg['batch']}, k {cfg['k']}")
    lines.append(f"  requests {report['requests']} ({report['ok']} ok) in {report['duration_s']:.2f} s: "
                 f"achieved {report['achieved_rate']:.1f} req/s, sent {report['send_rate']:.1f} req/s, "
                 f"{report['queries_per_s']:.1f} queries/s")
    lines.append(f"  {'latency ms':<12}{'count':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}")
    for name, st in report["latency_ms"].items():
        if st["count"]:
            lines.append(f"  {name:<12}{st['count']:>8}" + "".join(f"{st[p]:>9.2f}" for p in
                                                                 ("p50", "p90", "p99", "p99.9", "max")))
        else:
            lines.append(f"  {name:<12}{0:>8}  (none answered ok)")
    lines.extend(format_server(report))
    lag = report["send_lag_ms"]
    if cfg["mode"] == "open" and lag["count"]:
        lines.append(f"  send lag ms: p50 {lag['p50']:.2f}, p99 {lag['p99']:.2f}, max {lag['max']:.2f}"
                     + ("  (the load generator fell behind: add --processes)" if lag["p99"] > 50 else ""))
    lines.append(f"  load generator CPU: {report['client_cpu_cores']:.2f} cores"
                 + (" (close to its processes' count: it may be the bottleneck, add --processes)"
                    if report["client_cpu_cores"] > 0.8 * cfg["processes"] else ""))
    errors = ", ".join(f"{k} {v}" for k, v in report["errors"].items()) or "none"
    lines.append(f"  errors: {errors}")
    rc = report.get("recall")
    if rc and rc.get("recall_at_k") is not None:
        lines.append(f"  recall@{rc['k']}: {rc['recall_at_k']:.4f} over {rc['queries']} queries (exact search)")
    elif rc is not None:
        lines.append(f"  recall: {rc.get('why', 'not measured')}")
    return "\n".join(lines)


def save(report: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
