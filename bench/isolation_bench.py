"""Search latency on a shard while its writes are held up (a storage whose fsync hangs), with and without the write
gate (shard/admission.py).

    python -m bench.isolation_bench [--n 20000] [--dim 64] [--workers 8] [--writers 16] [--searches 200]

One shard in this process with its gRPC server (``--workers`` threads), a Flat collection of ``n`` vectors. Three
runs of ``--searches`` single-query searches, one after another, over gRPC:

- ``idle``: nothing else;
- ``held writes, gate``: ``--writers`` clients each keep an upsert in flight, and every append to the log waits
  until the run ends (a hung fsync); the gate lets a quarter of the threads run writes and half wait, and refuses
  the rest with RESOURCE_EXHAUSTED;
- ``held writes, no gate``: the same with a gate that admits every write (the shard before it): the held writes
  take every thread, and a search waits for its deadline (``--deadline`` s); 10 searches only.

Prints p50 / p99 latency and how many searches were answered in each. Not a test: no assertion on timings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import threading
import time

import grpc
import numpy as np

from bench.timing import make_data
from lookalike.config import CollectionConfig
from lookalike.net import create_channel
from lookalike.wire import vectors_to_proto
from protos import shard_pb2, shard_pb2_grpc
from shard.admission import WriteGate
from shard.server import create_shard_server
from shard.shard import Shard


def _searches(stub, xq, deadline: float) -> tuple[list[float], int]:
    times, failed = [], 0
    for q in xq:
        req = shard_pb2.ShardSearchRequest(collection="c", k=10)
        req.queries.CopyFrom(vectors_to_proto(q[None]))
        t0 = time.perf_counter()
        try:
            stub.Search(req, timeout=deadline)
            times.append(time.perf_counter() - t0)
        except grpc.RpcError:
            failed += 1
    return times, failed


def _run(stub, sc, servicer, gate, xq, writers: int, deadline: float) -> dict:
    servicer.writes = gate
    release = threading.Event()
    append = sc.store.append

    def held(*args, **kw):  # a storage whose fsync hangs until the run ends
        release.wait()
        return append(*args, **kw)

    sc.store.append = held
    stop = threading.Event()

    def writer(i: int) -> None:
        req = shard_pb2.ShardUpsertRequest(collection="c", ids=[f"w{i}"])
        req.vectors.CopyFrom(vectors_to_proto(xq[:1]))
        while not stop.is_set():
            try:
                stub.Upsert(req, timeout=60)
            except grpc.RpcError:
                time.sleep(0.01)  # refused by the gate: back off a little, as a client should

    with concurrent.futures.ThreadPoolExecutor(max(1, writers)) as pool:
        for i in range(writers):
            pool.submit(writer, i)
        time.sleep(0.5 if writers else 0)
        times, failed = _searches(stub, xq, deadline)
        stop.set()
        release.set()
    sc.store.append = append
    ms = np.array(times) * 1e3
    return {"answered": len(times), "failed": failed,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--writers", type=int, default=16)
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--deadline", type=float, default=2.0)
    args = ap.parse_args()
    xb, xq = make_data(args.n, args.dim, args.searches, seed=0)
    with tempfile.TemporaryDirectory() as root:
        shard = Shard("s0", root)
        shard.open_collection(CollectionConfig("c", args.dim, "l2", buckets=16), range(16))
        sc = shard.collection("c")
        sc.upsert([str(i) for i in range(args.n)], xb, [None] * args.n)
        shard.serving = True
        server, port, servicer, _health = create_shard_server(shard, "127.0.0.1:0", max_workers=args.workers)
        gated = servicer.writes
        open_gate = WriteGate(10_000, 10_000, "shard s0")
        rows = {}
        try:
            with create_channel(f"127.0.0.1:{port}") as ch:
                stub = shard_pb2_grpc.ShardStub(ch)
                rows["idle"] = _run(stub, sc, servicer, gated, xq, 0, args.deadline)
                rows["held writes, gate"] = _run(stub, sc, servicer, gated, xq, args.writers, args.deadline)
                # each search here waits for its deadline: a few of them tell
                rows["held writes, no gate"] = _run(stub, sc, servicer, open_gate, xq[:10], args.writers,
                                                    args.deadline)
        finally:
            servicer.health_checker.stop()
            server.stop(None)
            shard.close()
    print(f"| run | searches answered | failed (deadline {args.deadline:g} s) | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")
        print(f"| {name} | {r['answered']} | {r['failed']} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} |")
    print(f"\nn={args.n} dim={args.dim} workers={args.workers} writers={args.writers}; "
          f"reproduce: python -m bench.isolation_bench --n {args.n} --dim {args.dim} --workers {args.workers} "
          f"--writers {args.writers} --searches {args.searches}")


if __name__ == "__main__":
    main()
