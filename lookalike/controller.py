"""The controller: owns the collections and the shard map, and places shards.

A plain class (in-process in tests); ``lookalike.ray_cluster`` runs it as a named, detached Ray actor. Its state
(collections, placement, epoch) is written atomically to ``<data_dir>/cluster.json`` on every change, so a
restarted controller, or a whole cluster restarted on the same storage, finds it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import threading
import time
from typing import Protocol

from lookalike.config import CollectionConfig
from lookalike.errors import AlreadyExists, NotFound
from lookalike.shardmap import ShardInfo, ShardMap, assign_buckets

log = logging.getLogger(__name__)


class ShardPlacer(Protocol):
    """Starts shards and forwards placement to them (Ray actors in production)."""

    def ensure_shard(self, shard_id: str) -> None: ...

    def open_collection(self, shard_id: str, cfg: CollectionConfig, buckets: list[int]) -> None: ...

    def drop_collection(self, shard_id: str, name: str) -> None: ...


class Controller:
    """Cluster state and placement.

    Args:
        data_dir: the storage root; the state file is ``cluster.json`` there.
        n_shards: shards to start when the storage holds no state yet (an existing state keeps its shards).
        placer: starts shards and tells them what they own.
    """

    def __init__(self, data_dir: str | pathlib.Path, n_shards: int, placer: ShardPlacer):
        self.data_dir = pathlib.Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.data_dir / "cluster.json"
        self._placer = placer
        self._cond = threading.Condition(threading.RLock())
        self._shard_info: dict[str, ShardInfo] = {}
        if self._path.exists():
            state = json.loads(self._path.read_text())
            self._epoch = int(state["epoch"]) + 1  # a restart is a change: routers must re-read addresses
            self._shards = list(state["shards"])
            self._collections = {
                name: (CollectionConfig(**c["config"]), tuple(tuple(o) for o in c["owners"]))
                for name, c in state["collections"].items()}
            if n_shards != len(self._shards):
                log.warning("storage holds a cluster of %d shards; keeping it (asked for %d)", len(self._shards),
                            n_shards)
        else:
            if n_shards < 1:
                raise ValueError(f"a cluster needs at least one shard, got {n_shards}")
            self._epoch = 1
            self._shards = [f"shard-{i}" for i in range(n_shards)]
            self._collections: dict[str, tuple[CollectionConfig, tuple]] = {}
        self._save()

    # --- persistence ----------------------------------------------------------------------------------------
    def _save(self) -> None:
        state = {"epoch": self._epoch, "shards": self._shards,
                 "collections": {n: {"config": dataclasses.asdict(c), "owners": [list(o) for o in owners]}
                                 for n, (c, owners) in self._collections.items()}}
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def _bump(self) -> None:
        self._epoch += 1
        self._save()
        self._cond.notify_all()

    # --- shards ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts (or finds) every shard."""
        for sid in self._shards:
            self._placer.ensure_shard(sid)

    def register_shard(self, shard_id: str, address: str, node: str = "", serving: bool = True) -> int:
        """Called by a shard once it serves (again, after a restart); returns the new epoch."""
        with self._cond:
            if shard_id not in self._shards:
                raise NotFound(f"shard {shard_id!r} is not part of this cluster")
            self._shard_info[shard_id] = ShardInfo(shard_id, address, node, serving)
            self._bump()
            return self._epoch

    def unregister_shard(self, shard_id: str) -> None:
        """Marks a shard as gone (its address is forgotten until it registers again)."""
        with self._cond:
            self._shard_info[shard_id] = ShardInfo(shard_id)
            self._bump()

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Blocks until every shard has registered as serving; returns False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(self._shard_info.get(s, ShardInfo(s)).serving for s in self._shards):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def assignments(self, shard_id: str) -> list[tuple[CollectionConfig, list[int]]]:
        """What a (re)starting shard must load: each collection with the buckets it owns."""
        with self._cond:
            return [(cfg, [b for b, own in enumerate(owners) if shard_id in own])
                    for cfg, owners in self._collections.values()]

    def shards(self) -> list[ShardInfo]:
        with self._cond:
            return [self._shard_info.get(s, ShardInfo(s)) for s in self._shards]

    # --- collections ----------------------------------------------------------------------------------------
    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig:
        """Validates, places and persists a collection, then tells its shards.

        Raises:
            InvalidArgument: a bad spec. AlreadyExists: the name is taken.
        """
        cfg = cfg.validated()
        with self._cond:
            if cfg.name in self._collections:
                raise AlreadyExists(f"collection {cfg.name!r} already exists")
            owners = assign_buckets(cfg.buckets, self._shards, cfg.replication)
            self._collections[cfg.name] = (cfg, owners)
            self._save()
        for sid in self._shards:
            buckets = [b for b, own in enumerate(owners) if sid in own]
            if buckets:
                self._placer.open_collection(sid, cfg, buckets)
        with self._cond:
            self._bump()
        log.info("created collection %s (%s, dim %d, %s, %d buckets)", cfg.name, cfg.metric, cfg.dim, cfg.index,
                 cfg.buckets)
        return cfg

    def drop_collection(self, name: str) -> None:
        with self._cond:
            if name not in self._collections:
                raise NotFound(f"collection {name!r} does not exist")
            del self._collections[name]
            self._bump()
        for sid in self._shards:
            self._placer.drop_collection(sid, name)
        log.info("dropped collection %s", name)

    def list_collections(self) -> list[CollectionConfig]:
        with self._cond:
            return [cfg for cfg, _ in self._collections.values()]

    def shard_map(self, name: str) -> ShardMap:
        with self._cond:
            if name not in self._collections:
                raise NotFound(f"collection {name!r} does not exist")
            cfg, owners = self._collections[name]
            return ShardMap(self._epoch, cfg, owners,
                            {s: self._shard_info.get(s, ShardInfo(s)) for s in self._shards})

    def epoch(self) -> int:
        return self._epoch
