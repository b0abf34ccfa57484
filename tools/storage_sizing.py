"""The volume a cluster needs (``lookalike size``'s storage lines): what the shards write under ``--data``, per item
and in all, and :func:`measure_storage`, which loads a real local cluster and counts the bytes of its data
directory by kind (``python -m tools.storage_sizing`` prints both; docs/BENCHMARKS.md, "Storage per vector").

What a shard writes for each copy of an item (shard.store, shard.checkpoint; every owning shard writes its own):

- the bucket snapshots and the log (``b<bucket>.snap``, ``wal-<seq>.log``): the item's ORIGINAL vector, whatever
  the index (4 x dim bytes; dim / 8 for hamming), its id, its serialized payload, and 2 bytes of framing each
  (``SNAPSHOT_FRAMING``): 100M x 512-d with 2 copies is 413 GB here whatever the index;
- the newest index checkpoint (``ckpt-<n>.index`` and ``.table``): the index's code and per-item structures
  (sizing.per_vector, without the allocator's slack) and the id table (20 bytes: label, offset and payload
  length; the id, the payload);
- and, at its peak, a second checkpoint (a new one is written in full before the old one goes) and the log a
  checkpoint has not covered yet, which shard.checkpointing bounds by half the index's bytes (at least
  ``CHECKPOINT_EVERY_BYTES``) plus the active segment and one being compacted (``segment_bytes`` each).

Per shard and collection the trained index (shard.trained: centroids and codebooks, the current version and the
next), and for bucket moves the copies of ``max_moves`` x ``move_buckets`` buckets on their targets before their
sources drop them. The volume is that peak with ``headroom`` left free (the catalog grows by that share before the
volume fills; NFS and cloud file stores also slow down when nearly full).

May use: the base package, shard (its constants), control.local (for :func:`measure_storage`) and tools.sizing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import pathlib
import re
import tempfile

import numpy as np

from lookalike.config import CollectionConfig, MovePolicy
from lookalike.indexspec import training_points
from protos import common_pb2
from shard.checkpointing import CHECKPOINT_EVERY_BYTES
from tools.sizing import GiB, MiB, fixed_bytes, format_bytes, per_vector

SNAPSHOT_FRAMING = 2  # protobuf's tag and length of the id (and of the payload, when there is one), per item
SEGMENT_BYTES = 64 << 20  # shard.shard.Shard's segment_bytes
CHECKPOINT_TABLE = 20  # an id table row in a checkpoint (IdTable.to_arrays): label 8, offset 4, payload length 8


@dataclasses.dataclass
class Volume:
    """Bytes on the volume, by part (all copies)."""

    snapshots: float
    checkpoints: float
    log: float
    checkpoint_rewrite: float
    move_slack: float
    trained: float
    headroom: float

    @property
    def steady(self) -> float:
        """What the volume holds once writes and moves have settled."""
        return self.snapshots + self.checkpoints + self.trained

    @property
    def peak(self) -> float:
        return self.steady + self.log + self.checkpoint_rewrite + self.move_slack

    @property
    def size(self) -> float:
        """The volume to provision: the peak with ``headroom`` of it left free."""
        return self.peak / (1 - self.headroom)


def item_bytes(dim: int, index: str, metric: str = "l2", id_bytes: int = 16,
               payload_bytes: int = 0) -> tuple[float, float]:
    """(snapshot or log bytes, checkpoint bytes) of one copy of one item."""
    vec = dim // 8 if metric == "hamming" else 4 * dim
    payload = payload_bytes + SNAPSHOT_FRAMING if payload_bytes else 0
    snapshot = vec + id_bytes + SNAPSHOT_FRAMING + payload
    pv = per_vector(dim, index, metric, id_bytes, payload_bytes)
    index_part = pv.code + (8 if re.search(r"(^|,)B?IVF\d+", index) else pv.index)  # no list slack on disk
    return snapshot, index_part + CHECKPOINT_TABLE + id_bytes + payload


def volume(vectors: int, dim: int, index: str, metric: str = "l2", replicas: int = 1, shards: int = 1,
           id_bytes: int = 16, payload_bytes: int = 0, buckets: int = 1024, headroom: float = 0.3,
           policy: MovePolicy = MovePolicy()) -> Volume:
    """The volume for ``vectors`` items in ``shards`` shards, ``replicas`` copies each (see the module docstring)."""
    if vectors < 0 or replicas < 1 or shards < 1 or not 0 <= headroom < 1:
        raise ValueError("vectors >= 0, replicas >= 1, shards >= 1, 0 <= headroom < 1")
    snap, ckpt = item_bytes(dim, index, metric, id_bytes, payload_bytes)
    copies = vectors * replicas
    index_bytes = copies * (ckpt - CHECKPOINT_TABLE - id_bytes)
    # The log a checkpoint has not covered: per shard, max(CHECKPOINT_EVERY_BYTES, half its index) of written
    # vectors (as log records), plus the active segment and one being compacted.
    vec = dim // 8 if metric == "hamming" else 4 * dim
    uncovered = max(shards * CHECKPOINT_EVERY_BYTES, index_bytes / 2) * snap / vec
    log = uncovered + shards * 2 * SEGMENT_BYTES
    moved = min(1.0, policy.max_moves * policy.move_buckets / buckets) * vectors * (snap + ckpt)
    trained = 2 * shards * fixed_bytes(dim, index, metric)
    return Volume(snapshots=copies * snap, checkpoints=copies * ckpt, log=log, checkpoint_rewrite=copies * ckpt,
                  move_slack=moved, trained=trained, headroom=headroom)


def k8s_storage(n: float) -> str:
    """A volume size as a Kubernetes quantity, rounded up to a GiB (a TiB above 16 TiB)."""
    return f"{math.ceil(n / (GiB << 10))}Ti" if n >= 16 * (GiB << 10) else f"{math.ceil(n / GiB)}Gi"


def report(v: Volume, vectors: int, replicas: int) -> list[str]:
    per = (v.snapshots + v.checkpoints) / max(1, vectors * replicas)
    return [
        f"  storage: snapshots and log {format_bytes(v.snapshots)} (the original vectors, every copy), index "
        f"checkpoints {format_bytes(v.checkpoints)}: {per:.0f} bytes per vector per copy, "
        f"{format_bytes(v.steady)} in all once settled",
        f"  storage peak: + log not yet checkpointed {format_bytes(v.log)} + a checkpoint rewritten "
        f"{format_bytes(v.checkpoint_rewrite)} + bucket moves {format_bytes(v.move_slack)} = {format_bytes(v.peak)}",
        f"  volume: {k8s_storage(v.size)} ({v.headroom:.0%} left free at the peak; ReadWriteMany, every Ray pod "
        "mounts it)",
    ]


def _kind(path: pathlib.Path) -> str:
    name = path.name
    if "trained" in path.parts:
        return "trained"
    if name.endswith(".snap") or name.startswith("wal-"):
        return "snapshots and log"
    if name.startswith("ckpt-"):
        return "checkpoints"
    return "other"


def measure_storage(vectors: int, dim: int, index: str = "Flat", replicas: int = 2, shards: int = 2,
                    payload_bytes: int = 0, seed: int = 0, batch: int = 10_000) -> dict:
    """Loads ``vectors`` random items (ids of 16 bytes, payloads of about ``payload_bytes`` serialized) into a
    real local cluster, waits for its index to be trained (if it needs it) and every shard to use it, closes it
    gracefully (the shards write their checkpoints) and returns the bytes of its data directory by kind, and
    per item and copy."""
    from control.local import LocalCluster  # deferred: the cluster's code (FAISS, gRPC servers) only to measure

    rng = np.random.default_rng(seed)
    value = "x" * max(0, payload_bytes - 9)  # a Payload of one field "uri": 9 bytes of framing and key
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(tmp, shards=shards)
        try:
            cluster.router.create_collection(CollectionConfig("sized", dim, "l2", index=index,
                                                              replication=replicas).validated())
            for i in range(0, vectors, batch):
                n = min(batch, vectors - i)
                payloads = [common_pb2.Payload(fields={"uri": value})] * n if payload_bytes else None
                cluster.router.upsert("sized", [f"item-{j:011d}" for j in range(i, i + n)],
                                      rng.standard_normal((n, dim)).astype(np.float32), payloads)
            if training_points(index)[0] and not cluster.controller._wait_trained("sized", 300):
                raise RuntimeError(f"{index} was not trained and used by every shard within 300 s")
        finally:
            cluster.close()
        sizes = collections.Counter()
        for p in pathlib.Path(tmp).rglob("*"):
            if p.is_file():
                sizes[_kind(p)] += p.stat().st_size
    copies = vectors * replicas
    return {"vectors": vectors, "copies": copies, "bytes": dict(sizes),
            "per_copy": {k: round(v / copies, 1) for k, v in sizes.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the bytes a real local cluster writes per vector, against the model")
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--index", default="Flat")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--payload-bytes", type=int, default=0)
    a = p.parse_args(argv)
    m = measure_storage(a.vectors, a.dim, a.index, a.replicas, payload_bytes=a.payload_bytes)
    snap, ckpt = item_bytes(a.dim, a.index, "l2", 16, a.payload_bytes)
    print(f"{a.vectors:,} vectors of dim {a.dim} in {a.index!r}, {a.replicas} copies, 2 shards")
    print(f"  measured per vector per copy: {m['per_copy']}")
    print(f"  model: snapshots and log {snap:g}, checkpoints {ckpt:g}")


if __name__ == "__main__":
    main()
