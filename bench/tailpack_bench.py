"""A shard's resident memory when a load's tail comes after its IVF lists were packed.

    MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576 OMP_NUM_THREADS=1 python -m bench.tailpack_bench

One in-process shard (no Ray, no gRPC; the allocator settings of shard actors) loads 1M x 128 into IVF1024,Flat
(the collection's trained index first, as in a cluster), waits until the lists are packed, then takes 2.4% more
(the tail the 10M run's 4-shard IVF-Flat shards took after their last pack) and rests until they are packed again (at most 2 min). Prints the resident
memory growth per vector after the first pack and after the tail. Packing waits _REPACK_EVERY_S after the last pack
for growth under 5%; this run sets it to 10 s.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np

from bench.memory_bench import _BATCH, batch_of
from lookalike.config import CollectionConfig
from lookalike.indexspec import training_points
from shard.cpu_index import VectorIndex
from shard.osutil import release_memory
from shard.shard import Shard
from shard.trained import write_template
import shard.upkeep as up


def main(n: int = 1_000_000, tail: int = 24_000, dim: int = 128, spec: str = "IVF1024,Flat") -> None:
    up._REPACK_EVERY_S = 10.0
    with tempfile.TemporaryDirectory() as tmp:
        shard = Shard("mem-0", tmp)
        cfg = CollectionConfig("m", dim, "l2", index=spec, buckets=16).validated()
        sample = training_points(cfg.index)[1]
        x = np.concatenate([batch_of(i, _BATCH, dim, 0) for i in range(0, sample, _BATCH)])
        write_template(tmp, cfg, 1, VectorIndex(cfg).train_template(x), len(x), 0.0)
        cfg = dataclasses.replace(cfg, trained_version=1)
        shard.open_collection(cfg, range(16))
        sc = shard.collection("m")
        sc.upsert(["warm"], batch_of(10**9, 1, dim, 0), [None])  # what every shard pays once is not data
        sc.delete(["warm"])
        release_memory()
        before = shard.memory_bytes()
        for i in range(0, n + tail, _BATCH):
            if i == n:
                t0 = time.monotonic()
                while sc.upkeep.packed_at != n and time.monotonic() - t0 < 60:
                    time.sleep(0.5)
                time.sleep(5)  # the trim that follows the pack
                print(f"{spec}, {n} vectors, lists packed at {sc.upkeep.packed_at}: "
                      f"{(shard.memory_bytes() - before) / n:.1f} resident bytes a vector", flush=True)
            m = min(_BATCH, n + tail - i)
            sc.upsert([f"img-{j:08d}" for j in range(i, i + m)], batch_of(i, m, dim, 0), [None] * m)
        t0 = time.monotonic()
        while sc.upkeep.packed_at != n + tail and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        time.sleep(5)
        total = n + tail
        print(f"{tail} more, then {time.monotonic() - t0:.0f} s without writes: lists packed at {sc.upkeep.packed_at}: "
              f"{(shard.memory_bytes() - before) / total:.1f} resident bytes a vector (the index's own: "
              f"{sc.index.nbytes / total:.1f})")
        shard.close()


if __name__ == "__main__":
    main()
