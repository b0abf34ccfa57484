"""The load's workers: each an asyncio gRPC client (:class:`_Worker`) in its own process, sending searches, upserts
and deletes on the open loop's schedule or the closed loop's slots and recording every request; :func:`run_workers`
starts them together, shows the progress and gathers their records.

May use: the base package (lookalike: wire format, channels), protos and bench.loadtest.config.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import threading
import time

import grpc
import numpy as np
from tqdm import tqdm

from bench.loadtest.config import OK, OPS, LoadConfig, WorkerInput, open_schedule, split_share
from lookalike.net import create_aio_channel
from lookalike.wire import vectors_to_proto
from protos import lookalike_pb2, lookalike_pb2_grpc


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
        self._recall_left = split_share(cfg.recall_sample, cfg.processes, inp.worker)
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
        req = lookalike_pb2.SearchRequest(collection=self.cfg.collection, k=self.cfg.k)
        req.queries.CopyFrom(vectors_to_proto(self.inp.queries[rows]))
        req.params.nprobe = self.cfg.nprobe
        req.params.ef_search = self.cfg.ef_search
        if self.cfg.filter:  # a serialized Filter (--filter)
            req.filter.ParseFromString(self.cfg.filter)
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
        code = OK
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
        slots = split_share(cfg.concurrency, cfg.processes, w)
        budget = [split_share(cfg.requests, cfg.processes, w) if cfg.requests > 0 else -1]
        end = self.t0 + cfg.duration if cfg.duration > 0 else math.inf

        async def slot():
            while time.monotonic() < end and budget[0] != 0:
                budget[0] -= 1
                await self._one(stub, self._next_op(), time.monotonic() - self.t0)

        await asyncio.gather(*(slot() for _ in range(slots)))

    async def _clean_up(self, stub) -> None:
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
    return tqdm(total=total or None, unit="req", disable=not show, desc=f"loadtest {cfg.mode} loop", leave=False)


def _tick(bar, value, stop: threading.Event) -> None:
    last = 0
    while not stop.wait(0.25):
        now = value.value
        bar.update(now - last)
        last = now
    bar.update(value.value - last)
