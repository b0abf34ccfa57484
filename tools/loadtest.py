"""``lookalike loadtest``: load a running cluster with searches, upserts and deletes, and report what it did.

Two ways to drive it:

- **open loop** (``--rate R``): every request's send time is fixed in advance (evenly spaced, or a Poisson
  process with ``--arrivals poisson``), whatever the server does; a request's latency runs from its *scheduled*
  time, so a server that falls behind shows its queueing as latency instead of silently lowering the rate
  (the "coordinated omission" of closed-loop testers). The report says how late requests left (``send lag``):
  large lag means the load generator itself could not keep up.
- **closed loop** (``--concurrency C``): C requests in flight at all times, each sent when the previous one of
  its slot finished; latency from the send.

Both stop by themselves: after ``--duration`` seconds or ``--requests`` requests, whichever comes first, then
wait at most ``--timeout`` for the requests still in flight.

The load comes from ``--processes`` worker processes (each an asyncio gRPC client), so one Python process is not
the bottleneck; the rate and the concurrency are split between them. Requests are a mix of searches, upserts and
deletes (``--mix search=0.9,upsert=0.08,delete=0.02``). Queries come from ``--queries FILE.npy``, or are rows of
``--data FILE.npy`` (the vectors that were loaded) plus Gaussian noise of ``--noise`` times the data's standard
deviation (flipped bits for hamming codes), or, without either, stored vectors fetched with Get (ids ``0..n-1``,
the default of ``lookalike upsert``). Upserts write new ids ``loadtest-<run>-...`` with random vectors drawn from
the data's per-dimension mean and deviation; deletes remove ids the same run wrote earlier (or, before any, ids
that do not exist). At the end the run deletes what it wrote (``--keep-writes`` keeps it).

Recall@k: with ``--data`` (and ``--ids`` when the data was loaded with its own ids), the first
``--recall-sample`` distinct queries of the run are checked against exact search (FAISS flat, the collection's
metric) over the data; ids the run wrote itself are left out of the returned lists before comparing. Before the
run, a few of those ids (the row numbers without ``--ids``) are looked up with Get: when any is not stored, the
collection holds the data under other ids, and recall is reported as not measured, saying why (``--ids FILE``),
instead of as 0.

Report: achieved rate, p50/p90/p99/p99.9 latency (all requests and per kind), errors by status code, send lag,
recall@k, a per-second timeline; printed, written as JSON (``--out``) and drawn as a PNG (``--plot``: latency over
time and its distribution; needs matplotlib, ``pip install 'lookalike[plot]'``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import multiprocessing
import os
import threading
import time
import uuid

import numpy as np

OPS = ("search", "upsert", "delete")
_OK = 0


@dataclasses.dataclass
class LoadConfig:
    """What a load test does (see the module docstring)."""

    target: str
    collection: str
    mode: str = "closed"
    rate: float = 100.0
    concurrency: int = 8
    duration: float = 10.0
    requests: int = 0
    mix: dict = dataclasses.field(default_factory=lambda: {"search": 1.0})
    k: int = 10
    batch: int = 1
    nprobe: int = 0
    ef_search: int = 0
    processes: int = 1
    timeout: float = 10.0
    arrivals: str = "uniform"
    recall_sample: int = 100
    keep_writes: bool = False
    seed: int = 0
    run_id: str = ""
    tls: object = None  # lookalike.security.TLSConfig
    token: str | None = dataclasses.field(default=None, repr=False)  # bearer token; never printed

    def check(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be open or closed, not {self.mode!r}")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError("an open-loop test needs --rate > 0")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("a closed-loop test needs --concurrency >= 1")
        if not self.duration > 0 and self.requests <= 0:
            raise ValueError("give --duration or --requests: a load test must stop by itself")
        if self.arrivals not in ("uniform", "poisson"):
            raise ValueError(f"arrivals must be uniform or poisson, not {self.arrivals!r}")
        if self.processes < 1 or self.batch < 1 or self.k < 1:
            raise ValueError("--processes, --batch and -k must be at least 1")
        unknown = set(self.mix) - set(OPS)
        if unknown or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix: give positive shares of {', '.join(OPS)}, e.g. search=0.9,upsert=0.1")


def parse_mix(text: str) -> dict:
    """``"search=0.9,upsert=0.1"`` -> {"search": 0.9, "upsert": 0.1}."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, share = part.partition("=")
        try:
            mix[name.strip()] = float(share) if share else 1.0
        except ValueError:
            raise ValueError(f"mix: {part!r} is not name=share") from None
    return mix


# --- schedules --------------------------------------------------------------------------------------------------
def open_schedule(rate: float, duration: float, requests: int, processes: int, worker: int, arrivals: str,
                  seed: int) -> np.ndarray:
    """Send times (seconds after the start) of one worker's requests in an open-loop test.

    The whole test sends ``rate`` requests a second for ``duration`` seconds (at most ``requests`` when > 0);
    worker w of P sends the requests w, w+P, w+2P... of the uniform schedule, or its own Poisson process of rate
    rate/P (the merge of P Poisson processes is one of rate ``rate``).
    """
    total = int(math.floor(rate * duration)) if duration > 0 else requests
    if requests > 0:
        total = min(total, requests)
    if arrivals == "uniform":
        return np.arange(worker, total, processes, dtype=np.float64) / rate
    rng = np.random.default_rng([seed, worker, 1])
    n = len(range(worker, total, processes))
    return np.cumsum(rng.exponential(processes / rate, n))


def _split(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


# --- the worker -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WorkerInput:
    cfg: LoadConfig
    worker: int
    queries: np.ndarray
    write_mean: np.ndarray
    write_std: np.ndarray


class _Recorder:
    def __init__(self):
        self.op, self.scheduled, self.sent, self.done, self.code = [], [], [], [], []
        self.recall: dict[int, list[str]] = {}
        self.cpu_s = 0.0  # CPU seconds this worker's process spent while loading

    def add(self, op: int, scheduled: float, sent: float, done: float, code: int) -> None:
        self.op.append(op)
        self.scheduled.append(scheduled)
        self.sent.append(sent)
        self.done.append(done)
        self.code.append(code)

    def arrays(self) -> dict:
        return {"op": np.array(self.op, np.int8), "scheduled": np.array(self.scheduled, np.float64),
                "sent": np.array(self.sent, np.float64), "done": np.array(self.done, np.float64),
                "code": np.array(self.code, np.int16), "recall": self.recall, "cpu_s": self.cpu_s}


class _Worker:
    """One process's share of the load: an asyncio gRPC client."""

    def __init__(self, inp: WorkerInput, progress=None):
        cfg = inp.cfg
        self.cfg, self.inp, self.progress = cfg, inp, progress
        self.rng = np.random.default_rng([cfg.seed, inp.worker])
        names = [op for op in OPS if cfg.mix.get(op, 0) > 0]
        shares = np.array([cfg.mix[op] for op in names], dtype=np.float64)
        self._ops = np.array([OPS.index(op) for op in names])
        self._p = shares / shares.sum()
        self._written: list[str] = []
        self._single: dict = {}
        self._serial = 0
        self._recall_left = _split(cfg.recall_sample, cfg.processes, inp.worker)
        self.rec = _Recorder()
        self.prefix = f"loadtest-{cfg.run_id}-{inp.worker}-"

    # requests
    def _next_op(self) -> int:
        return int(self._ops[0] if len(self._ops) == 1 else self.rng.choice(self._ops, p=self._p))

    def _search_request(self):
        rows = self.rng.integers(0, len(self.inp.queries), self.cfg.batch)
        if self.cfg.batch == 1:  # single queries: each query's request is built once (the client's CPU is the load's)
            row = int(rows[0])
            req = self._single.get(row)
            if req is None:
                req = self._single[row] = self._build_search(rows)
            return req, row
        return self._build_search(rows), int(rows[0])

    def _build_search(self, rows):
        from lookalike.wire import vectors_to_proto
        from protos import lookalike_pb2

        req = lookalike_pb2.SearchRequest(collection=self.cfg.collection, k=self.cfg.k)
        req.queries.CopyFrom(vectors_to_proto(self.inp.queries[rows]))
        req.params.nprobe = self.cfg.nprobe
        req.params.ef_search = self.cfg.ef_search
        return req

    def _new_ids(self, n: int) -> list[str]:
        ids = [f"{self.prefix}{self._serial + i}" for i in range(n)]
        self._serial += n
        return ids

    def _write_vectors(self, n: int) -> np.ndarray:
        mean, std = self.inp.write_mean, self.inp.write_std
        if self.inp.queries.dtype == np.uint8:
            return self.rng.integers(0, 256, (n, len(mean)), dtype=np.uint8)
        return (mean + std * self.rng.standard_normal((n, len(mean)))).astype(np.float32)

    async def _one(self, stub, op: int, scheduled: float) -> None:
        import grpc

        from lookalike.wire import vectors_to_proto
        from protos import lookalike_pb2

        qrow = -1
        if op == 0:
            req, qrow = self._search_request()
            call = stub.Search
        elif op == 1:
            ids = self._new_ids(self.cfg.batch)
            req = lookalike_pb2.UpsertRequest(collection=self.cfg.collection, ids=ids)
            req.vectors.CopyFrom(vectors_to_proto(self._write_vectors(len(ids))))
            call = stub.Upsert
        else:
            ids = self._written[:self.cfg.batch]
            del self._written[:len(ids)]
            ids += self._new_ids(self.cfg.batch - len(ids))  # nothing of ours left: ids that do not exist
            req = lookalike_pb2.DeleteRequest(collection=self.cfg.collection, ids=ids)
            call = stub.Delete
        sent = time.monotonic() - self.t0
        code = _OK
        try:
            resp = await call(req, timeout=self.cfg.timeout)
        except grpc.aio.AioRpcError as err:
            code = err.code().value[0]
            resp = None
        done = time.monotonic() - self.t0
        self.rec.add(op, scheduled, sent, done, code)
        if resp is not None:
            if op == 1:
                self._written.extend(req.ids)
            elif op == 0 and self._recall_left > 0 and qrow not in self.rec.recall:
                self.rec.recall[qrow] = list(resp.results[0].ids)
                self._recall_left -= 1
        if self.progress is not None:
            self.progress.value += 1

    async def run(self, t0: float) -> dict:
        """Runs this worker's share, starting at the monotonic time ``t0``; returns its records."""
        from lookalike.net import create_aio_channel
        from protos import lookalike_pb2_grpc

        self.t0 = t0
        cfg, w = self.cfg, self.inp.worker
        async with create_aio_channel(cfg.target, cfg.tls, cfg.token) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=max(cfg.timeout, 10.0))
            stub = lookalike_pb2_grpc.LookalikeStub(channel)
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            cpu0 = time.process_time()
            if cfg.mode == "open":
                await self._open(stub, open_schedule(cfg.rate, cfg.duration, cfg.requests, cfg.processes, w,
                                                     cfg.arrivals, cfg.seed))
            else:
                await self._closed(stub)
            self.rec.cpu_s = time.process_time() - cpu0
            if self._written and not cfg.keep_writes:
                await self._clean_up(stub)
        return self.rec.arrays()

    async def _open(self, stub, schedule: np.ndarray) -> None:
        tasks = set()
        for at in schedule.tolist():
            delay = self.t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self._one(stub, self._next_op(), at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=self.cfg.timeout + 1.0)

    async def _closed(self, stub) -> None:
        cfg, w = self.cfg, self.inp.worker
        slots = _split(cfg.concurrency, cfg.processes, w)
        budget = [_split(cfg.requests, cfg.processes, w) if cfg.requests > 0 else -1]
        end = self.t0 + cfg.duration if cfg.duration > 0 else math.inf

        async def slot():
            while time.monotonic() < end and budget[0] != 0:
                budget[0] -= 1
                await self._one(stub, self._next_op(), time.monotonic() - self.t0)

        await asyncio.gather(*(slot() for _ in range(slots)))

    async def _clean_up(self, stub) -> None:
        from protos import lookalike_pb2

        for i in range(0, len(self._written), 1000):
            await stub.Delete(lookalike_pb2.DeleteRequest(collection=self.cfg.collection,
                                                          ids=self._written[i:i + 1000]), timeout=60)
        self._written = []


def _worker_main(inp: WorkerInput, barrier, start, counter, results) -> None:
    """A worker process: connects, waits for the others, runs, sends its records back. ``counter``: completed
    requests, a ``multiprocessing.Value`` shared with the progress bar."""
    try:
        worker = _Worker(inp, counter)
        barrier.wait()
        barrier.wait()  # the parent has set the start time
        results.put((inp.worker, asyncio.run(worker.run(start.value)), None))
    except BaseException as err:  # report instead of hanging the parent
        results.put((inp.worker, None, f"{type(err).__name__}: {err}"))


# --- the run ----------------------------------------------------------------------------------------------------
def run_workers(inputs: list[WorkerInput], show_progress: bool = True) -> list[dict]:
    """Runs the workers (in this process when there is one, else one process each); returns their records."""
    cfg = inputs[0].cfg
    expected = (int(cfg.rate * cfg.duration) if cfg.mode == "open" and cfg.duration > 0 else 0) or cfg.requests
    if cfg.mode == "open" and cfg.requests > 0:
        expected = min(expected, cfg.requests)
    bar = _progress_bar(expected, cfg, show_progress)
    stop = threading.Event()
    procs, tickers = [], []
    try:
        if len(inputs) == 1:
            counter = _Box()
            tickers.append(threading.Thread(target=_tick, args=(bar, counter, stop), daemon=True))
            tickers[0].start()
            return [asyncio.run(_Worker(inputs[0], counter).run(time.monotonic() + 0.05))]
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(len(inputs) + 1)
        start = ctx.Value("d", 0.0)
        counter = ctx.Value("q", 0, lock=False)
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker_main, args=(inp, barrier, start, counter, results), daemon=True)
                 for inp in inputs]
        for p in procs:
            p.start()
        barrier.wait(timeout=120)
        start.value = time.monotonic() + 0.2
        barrier.wait(timeout=30)
        tickers.append(threading.Thread(target=_tick, args=(bar, counter, stop), daemon=True))
        tickers[0].start()
        out: dict[int, dict] = {}
        limit = (cfg.duration if cfg.duration > 0 else 3600) + 2 * cfg.timeout + 120
        for _ in inputs:
            worker, rec, err = results.get(timeout=limit)
            if err is not None:
                raise RuntimeError(f"load worker {worker} failed: {err}")
            out[worker] = rec
        return [out[i] for i in sorted(out)]
    finally:
        stop.set()
        for t in tickers:
            t.join()
        bar.close()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


class _Box:
    """The completed-request count of a worker in this process (what ``multiprocessing.Value`` is across them)."""

    value = 0


def _progress_bar(total: int, cfg: LoadConfig, show: bool):
    from tqdm import tqdm

    return tqdm(total=total or None, unit="req", disable=not show, desc=f"loadtest {cfg.mode} loop", leave=False)


def _tick(bar, value, stop: threading.Event) -> None:
    last = 0
    while not stop.wait(0.25):
        now = value.value
        bar.update(now - last)
        last = now
    bar.update(value.value - last)


# --- the report -------------------------------------------------------------------------------------------------
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
    import grpc

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
    ok = code == _OK
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
    ok = rec["code"] == _OK
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


# --- inputs -----------------------------------------------------------------------------------------------------
def _noisy(rows: np.ndarray, noise: float, rng) -> np.ndarray:
    if rows.dtype == np.uint8:  # hamming codes: flip each bit with probability `noise`
        flips = np.packbits(rng.random((len(rows), rows.shape[1] * 8)) < noise, axis=1)
        return np.bitwise_xor(rows, flips)
    std = rows.std(axis=0, keepdims=True) if len(rows) > 1 else np.ones((1, rows.shape[1]), np.float32)
    return (rows + noise * std * rng.standard_normal(rows.shape)).astype(np.float32)


def prepare(cfg: LoadConfig, queries: np.ndarray | None = None, data: np.ndarray | None = None,
            n_queries: int = 10_000, noise: float = 0.05, fetch=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, write_mean, write_std). ``fetch(n)`` returns n stored vectors when neither array is given."""
    rng = np.random.default_rng([cfg.seed, 99])
    if queries is None:
        base = data
        if base is None:
            if fetch is None:
                raise ValueError("give queries or data")
            base = fetch(n_queries)
        rows = base[rng.integers(0, len(base), min(n_queries, max(len(base), 1)))]
        queries = _noisy(rows, noise, rng)
    src = data if data is not None else queries
    sample = src[rng.integers(0, len(src), min(len(src), 100_000))].astype(np.float32)
    return np.ascontiguousarray(queries), sample.mean(axis=0), sample.std(axis=0) + 1e-6


def fetch_stored(target: str, collection: str, n: int, seed: int, conn: dict | None = None) -> np.ndarray:
    """n stored vectors of a collection loaded with row-number ids (``lookalike upsert`` without --ids); ``conn``:
    the Client's tls and token."""
    from lookalike.client import Client

    with Client(target, **(conn or {})) as client:
        count = client.describe_collection(collection).count
        if not count:
            raise ValueError(f"collection {collection!r} is empty: load it first, or give --queries")
        rng = np.random.default_rng(seed)
        want = rng.choice(count, size=min(n, count), replace=False)
        got = []
        for i in range(0, len(want), 1000):
            _, vecs, _ = client.get(collection, [str(j) for j in want[i:i + 1000]], include_vectors=True)
            if vecs is not None and len(vecs):
                got.append(vecs)
        if not got:
            raise ValueError(f"no stored vector of {collection!r} has a row-number id (0..{count - 1}): "
                             "give --queries FILE.npy or --data FILE.npy")
        return np.concatenate(got)


def recall_ids_problem(client, collection: str, rows: int, data_ids: list[str] | None = None,
                       ids_file: str | None = None, seed: int = 0, sample: int = 8) -> str | None:
    """Why recall@k against ``rows`` vectors of --data cannot be measured, or None when it can: recall compares the
    ids the cluster returns with the ids of the exact neighbours among those rows, which are ``data_ids`` or, without
    them, the row numbers. A few of those ids (``sample``) are asked for with Get; any missing means the collection
    holds the vectors under other ids (e.g. loaded with ``lookalike upsert --ids``), and recall would read 0."""
    if rows == 0:
        return "--data holds no vectors: recall is not measured"
    rng = np.random.default_rng([seed, 7])
    picked = rng.choice(rows, size=min(sample, rows), replace=False)
    want = [data_ids[i] if data_ids is not None else str(i) for i in picked.tolist()]
    found = set(client.get(collection, want, include_vectors=False)[0])
    missing = [u for u in want if u not in found]
    if not missing:
        return None
    if data_ids is None:
        return (f"collection {collection!r} holds no item under row numbers of --data (ids {', '.join(missing[:3])} "
                f"are not stored): recall needs --ids FILE, the ids the vectors were loaded with; recall is not "
                "measured")
    return (f"{len(missing)} of {len(want)} ids of --ids {ids_file} checked are not stored in collection "
            f"{collection!r} (e.g. {missing[0]!r}): give the ids file the vectors of --data were loaded with; recall "
            "is not measured")


def run(cfg: LoadConfig, queries: np.ndarray, write_mean: np.ndarray, write_std: np.ndarray,
        data: np.ndarray | None = None, data_ids: list[str] | None = None, metric: str = "l2",
        show_progress: bool = True, recall_off: str | None = None) -> tuple[dict, dict]:
    """Runs a load test; returns (report, merged records). ``recall_off``: why recall cannot be measured against
    ``data`` (see :func:`recall_ids_problem`), reported instead of a number."""
    cfg.check()
    if not cfg.run_id:
        cfg.run_id = uuid.uuid4().hex[:8]
    inputs = [WorkerInput(cfg, w, queries, write_mean, write_std) for w in range(cfg.processes)]
    records = run_workers(inputs, show_progress)
    rec = merge_records(records)
    recall = None
    if cfg.mix.get("search", 0) > 0 and cfg.recall_sample > 0:
        if data is None or recall_off:
            recall = {"k": cfg.k, "queries": 0, "recall_at_k": None,
                      "why": recall_off or "not measured: give --data (the vectors loaded) for exact search"}
        else:
            recall = compute_recall(rec["recall"], data, data_ids, queries, metric, cfg.k, f"loadtest-{cfg.run_id}-")
    return summarize(rec, cfg, recall), rec


def save(report: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
