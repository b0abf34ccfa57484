"""How fast `lookalike backup` and `restore` go: a real local cluster (shards and a router behind gRPC, in this
process) loaded with random vectors, backed up through the router and restored under another name; prints items a
second and the backup's bytes (docs/BENCHMARKS.md, "Storage per vector").

    python -m tools.backup_bench --vectors 200000 --dim 128 --buckets 16

May use: every layer (control.local for the cluster, router.server for its gRPC server, tools.cli for the commands).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from control.local import LocalCluster
from lookalike.client import Client
from router.server import create_router_server
from tools import cli


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--buckets", type=int, default=1024)
    p.add_argument("--replication", type=int, default=2)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(os.path.join(tmp, "data"), shards=2)
        server, port, _ = create_router_server(cluster.router, "127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        try:
            with Client(target, timeout=120) as c:
                c.create_collection("p", dim=a.dim, buckets=a.buckets, replication=a.replication)
                rng = np.random.default_rng(0)
                for i in range(0, a.vectors, 10_000):
                    n = min(10_000, a.vectors - i)
                    c.upsert("p", [f"item-{j:011d}" for j in range(i, i + n)],
                             rng.standard_normal((n, a.dim)).astype(np.float32),
                             [{"uri": f"s3://b/{j}.jpg"} for j in range(i, i + n)])
            bk = os.path.join(tmp, "backup")
            t0 = time.perf_counter()
            assert cli.main(["backup", "p", bk, "--target", target, "--quiet"]) == 0
            t1 = time.perf_counter()
            assert cli.main(["restore", bk, "--name", "p2", "--target", target, "--quiet"]) == 0
            t2 = time.perf_counter()
            size = sum(os.path.getsize(os.path.join(bk, f)) for f in os.listdir(bk))
        finally:
            server.stop(None)
            cluster.close()
    print(f"{a.vectors:,} x {a.dim}, {a.buckets} buckets, {a.replication} copies: backup {t1 - t0:.1f} s "
          f"({a.vectors / (t1 - t0):,.0f} items/s, {size / 1e6:.1f} MB), restore {t2 - t1:.1f} s "
          f"({a.vectors / (t2 - t1):,.0f} items/s)")


if __name__ == "__main__":
    main()
