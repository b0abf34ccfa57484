"""The shards' state as Prometheus gauges, read from each shard's stats when Prometheus scrapes (nothing is updated
on writes): vectors, index bytes, buckets, training, WAL bytes per shard and collection; memory, capacity and
serving per shard; the process's allocator (what its live allocations hold and what it keeps
free). Every Shard of the process registers itself (weakly: a shard that is gone drops out).

Uses prometheus_client and the base package's registry (lookalike.metrics).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shard.osutil import allocator_stats

log = logging.getLogger(__name__)

ALLOCATOR_EVERY_S = 30.0  # the allocator's statistics are read at most this often (ShardCollector._allocator)
_clock = time.monotonic


def _wal_bytes(path) -> int:
    total = 0
    for f in path.glob("wal-*.log"):
        try:
            total += f.stat().st_size
        except OSError:  # sealed and compacted away meanwhile
            pass
    return total


class ShardCollector(Collector):
    """Gauges of the shards of this process (see the module's docstring; docs/OPERATIONS.md names them)."""

    def __init__(self):
        self._shards: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._alloc: tuple[float, dict[str, int]] | None = None  # (when, allocator_stats) last read

    def watch(self, shard) -> None:
        with self._lock:
            self._shards[shard.shard_id] = shard

    def unwatch(self, shard) -> None:
        with self._lock:
            if self._shards.get(shard.shard_id) is shard:
                del self._shards[shard.shard_id]

    def collect(self):
        per_shard = {name: GaugeMetricFamily(f"lookalike_shard_{name}", doc, labels=["shard"]) for name, doc in (
            ("serving", "1 while the shard serves (its data loaded), else 0"),
            ("resident_memory_bytes", "Resident memory of the shard's process"),
            ("used_bytes", "Bytes the shard counts against its capacity (resident memory, or GPU memory on a GPU "
                           "shard)"),
            ("capacity_bytes", "Bytes the shard may fill (0: no limit)"))}
        per_coll = {name: GaugeMetricFamily(f"lookalike_shard_{name}", doc, labels=["shard", "collection"])
                    for name, doc in (
            ("vectors", "Items the shard holds of the collection"),
            ("index_bytes", "Bytes of the collection's index on the shard"),
            ("buckets", "Buckets of the collection the shard holds"),
            ("joining_buckets", "Buckets the shard is taking on (being copied in)"),
            ("index_trained", "1 when the collection's index on the shard is built from a trained version, else 0 "
                              "(untrained: exact answers from its buffer)"),
            ("trained_version", "The trained version the index was built from (0: none)"),
            ("damaged_files", "Storage files of the collection found damaged and kept aside"),
            ("wal_bytes", "Bytes of the collection's write-ahead log segments on the shard"))}
        with self._lock:
            shards = list(self._shards.items())
        for sid, shard in shards:
            try:
                st = shard.stats()
                rss = shard.memory_bytes()
            except Exception as err:  # closing, or closed: no sample rather than a failed scrape
                log.debug("metrics: no stats from %s: %s", sid, err)
                continue
            for name, value in (("serving", int(bool(st["serving"]))), ("resident_memory_bytes", rss),
                                ("used_bytes", st["memory_bytes"]), ("capacity_bytes", st["capacity_bytes"])):
                per_shard[name].add_metric([sid], value)
            for c in st["collections"]:
                if "vectors" not in c:  # quarantined: only its damage is known
                    per_coll["damaged_files"].add_metric([sid, c["name"]], len(c["damaged"]))
                    continue
                labels = [sid, c["name"]]
                for name, value in (("vectors", c["vectors"]), ("index_bytes", c["index_bytes"]),
                                    ("buckets", c["buckets"]), ("joining_buckets", c["joining"]),
                                    ("index_trained", int(bool(c["trained"]))),
                                    ("trained_version", c["trained_version"]), ("damaged_files", len(c["damaged"])),
                                    ("wal_bytes", _wal_bytes(shard.store_path(sid, c["name"])))):
                    per_coll[name].add_metric(labels, value)
        yield from per_shard.values()
        yield from per_coll.values()
        if shards:  # the process's allocator, once for all its shards
            alloc = GaugeMetricFamily("lookalike_shard_process_allocator_bytes",
                                      "The shard process's allocator: bytes by stat (shard.osutil.allocator_stats)",
                                      labels=["stat"])
            for stat, value in self._allocator().items():
                alloc.add_metric([stat], value)
            yield alloc

    def _allocator(self) -> dict[str, int]:
        """allocator_stats, read at most once in ALLOCATOR_EVERY_S: glibc's walks its free lists under each arena's
        lock (25 ms for a million free chunks here), so scrapes do not pause the process's allocations more often."""
        now = _clock()
        with self._lock:
            if self._alloc is None or now - self._alloc[0] >= ALLOCATOR_EVERY_S:
                self._alloc = (now, allocator_stats())
            return self._alloc[1]


SHARDS = ShardCollector()
REGISTRY.register(SHARDS)
