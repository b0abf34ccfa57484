"""How long a shard's writes wait while it moves its items into a new trained version (shard.training.adopt_trained).

    python -m bench.adopt_bench                          # 300k x 128, IVF1024,Flat, one shard in-process
    python -m bench.adopt_bench --n 1000000 --spec IVF1024,PQ32

One ``shard.shard.Shard`` in-process (no Ray, no gRPC) holds one collection of 16 buckets, trained once (v1) and
loaded with ``--n`` clustered vectors (bench.timing.make_data). A second version is trained on other vectors, and the
shard moves into it (``adopt_trained``, as the controller's ``use_trained`` asks) while a writer upserts batches of
``--batch`` new items, one after the other, as fast as each is acknowledged. Prints the move's time and the writes'
latency during it: count, median, p99 and the longest, against the same writes before the move; and checks that
every item written during the move is in the new index (searched for by its own vector).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

from bench.timing import make_data
from lookalike.config import CollectionConfig
from shard.cpu_index import VectorIndex
from shard.shard import Shard
from shard.trained import write_template
from shard.training import adopt_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--spec", default="IVF1024,Flat")
    ap.add_argument("--batch", type=int, default=100, help="items a write")
    args = ap.parse_args()

    xb, _ = make_data(args.n + 200_000, args.dim, 1, seed=7)
    with tempfile.TemporaryDirectory() as root:
        cfg = CollectionConfig("a", args.dim, index=args.spec, buckets=16).validated()
        t1 = VectorIndex(cfg).train_template(xb[:100_000])
        write_template(root, cfg, 1, t1, 100_000, 0.0)
        cfg = dataclasses.replace(cfg, trained_version=1)
        shard = Shard("a-0", root)
        shard.open_collection(cfg, range(16))
        sc = shard.collection("a")
        t = time.perf_counter()
        for s in range(0, args.n, 10_000):
            sc.upsert([f"v{i}" for i in range(s, min(s + 10_000, args.n))], xb[s:s + 10_000],
                      [None] * len(xb[s:s + 10_000]))
        print(f"loaded {args.n} x {args.dim} ({args.spec}) in {time.perf_counter() - t:.1f}s", flush=True)
        template = VectorIndex(cfg).train_template(xb[100_000:200_000])
        moved = dataclasses.replace(cfg, trained_version=2)
        spare = iter(range(args.n, len(xb), args.batch))

        def writes(stop: threading.Event, until: float = 0.0) -> tuple[list[float], list[int]]:
            took, firsts = [], []
            while not stop.is_set() and (not until or time.perf_counter() < until):
                s = next(spare)
                t0 = time.perf_counter()
                sc.upsert([f"w{i}" for i in range(s, s + args.batch)], xb[s:s + args.batch], [None] * args.batch)
                took.append(time.perf_counter() - t0)
                firsts.append(s)
            return took, firsts

        before, _ = writes(threading.Event(), time.perf_counter() + 5.0)
        stop, out = threading.Event(), {}
        writer = threading.Thread(target=lambda: out.update(zip(("took", "firsts"), writes(stop))))
        writer.start()
        t = time.perf_counter()
        adopt_trained(sc, moved, template)
        move_s = time.perf_counter() - t
        stop.set()
        writer.join()
        during, firsts = out["took"], out["firsts"]
        assert sc.index.trained_version == 2
        x = np.concatenate([xb[s:s + 1] for s in firsts])
        D, _ = sc.index.search(x, 1, nprobe=4096)
        found = int((D[:, 0] <= 1e-3).sum())

        def line(name: str, took: list[float]) -> str:
            ms = sorted(1e3 * v for v in took)
            return (f"{name}: {len(ms)} writes of {args.batch}, median {statistics.median(ms):.1f} ms, "
                    f"p99 {ms[int(0.99 * (len(ms) - 1))]:.1f} ms, longest {ms[-1]:.1f} ms")

        print(f"moved {sc.index.ntotal} vectors into v2 in {move_s:.1f}s", flush=True)
        print(line("before the move", before))
        print(line("during the move", during))
        print(f"items written during the move found in the new index: {found} of {len(firsts)} writes' first items")
        shard.close()
    sys.exit(0 if found == len(firsts) else 1)


if __name__ == "__main__":
    main()
