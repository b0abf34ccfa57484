"""The controller's state: shards, collections (owners, moves, trainings), the epoch; kept in ``cluster.json``.

:class:`ClusterState` holds it under one lock (a condition, so that waiters wake on every change) and writes it
atomically to ``<data_dir>/cluster.json`` on every change, so a restarted controller, or a whole cluster
restarted on the same storage, finds it again. The parts of the controller (``control.roster``,
``control.registry``, ``control.moves``, ``control.training``, ``control.growth``) share one instance.

Uses lookalike (config, errors, shardmap) and the standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import threading

from lookalike.config import CollectionConfig
from lookalike.errors import NotFound
from lookalike.shardmap import ShardInfo

log = logging.getLogger(__name__)


def stored_shards(data_dir: str | pathlib.Path) -> int:
    """The number of shards of the cluster state kept in ``data_dir`` (0: none there yet)."""
    try:
        return len(json.loads((pathlib.Path(data_dir) / "cluster.json").read_text())["shards"])
    except FileNotFoundError:
        return 0


@dataclasses.dataclass
class Move:
    """Some buckets of one collection going from one shard to another."""

    collection: str
    buckets: list[int]
    source: str
    target: str
    phase: str = "queued"  # queued -> copy -> leaving -> (done)
    items: int = 0         # items copied (known once the copy is done)
    attempts: int = 0      # failed tries so far (rolled back each time)
    retry_at: float = 0.0  # time.monotonic() before which it is not tried again
    owned_epoch: int = 0   # the epoch at which the target took over (E2)

    @property
    def key(self) -> tuple[str, int]:
        return self.collection, self.buckets[0]


@dataclasses.dataclass
class Training:
    """Where a collection's training stands (in memory; the trained version and sample size are in its state)."""

    running: bool = False
    running_version: int = 0  # the version the training under way will have
    started: float = 0.0
    requested: bool = False  # asked for (lookalike train): train again even if trained
    next_version: int = 0  # the version number a requested training will have (0: take the next one then)
    error: str = ""  # the last failure
    retry_at: float = 0.0
    vectors: int = 0  # items the collection held at the last check
    counted_at: float = 0.0
    ready: dict[str, int] = dataclasses.field(default_factory=dict)  # shard -> trained version it moved into
    adopting: set[str] = dataclasses.field(default_factory=set)  # shards moving into the current version now
    adopt_errors: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CollectionState:
    """A collection as the controller keeps it: its config, the owners of each bucket, its moves, its training."""

    cfg: CollectionConfig
    owners: list[list[str]]
    moves: dict[int, Move] = dataclasses.field(default_factory=dict)
    trained_on: int = 0  # vectors the current trained version was trained on
    training: Training = dataclasses.field(default_factory=Training)

    def holders(self) -> set[str]:
        """The shards that own a bucket of the collection."""
        return {s for own in self.owners for s in own}


class ClusterState:
    """The cluster's state and its lock, read from ``cluster.json`` (or started anew) and written back on change.

    Callers hold ``cond`` while they read or change the state; :meth:`save` and :meth:`bump` expect it held.

    Args:
        data_dir: the storage root; the state file is ``cluster.json`` there.
        n_shards: shards to start when the storage holds no state yet (an existing state keeps its shards).
    """

    def __init__(self, data_dir: str | pathlib.Path, n_shards: int):
        self.data_dir = pathlib.Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.data_dir / "cluster.json"
        self.cond = threading.Condition(threading.RLock())
        self.shard_info: dict[str, ShardInfo] = {}
        self.collections: dict[str, CollectionState] = {}
        self.cleanups: list[tuple[str, str, list[int]]] = []  # (shard, collection, buckets): rolled-back copies
        self.problems: dict[str, str] = {}  # shard id -> why it cannot start (see ShardInfo.problem)
        if self._path.exists():
            state = json.loads(self._path.read_text())
            self.epoch = int(state["epoch"]) + 1  # a restart is a change: routers must re-read addresses
            self.shards = list(state["shards"])
            self.trained_seq = int(state.get("trained_seq", 0))
            for name, c in state["collections"].items():
                coll = CollectionState(CollectionConfig(**c["config"]), [list(o) for o in c["owners"]],
                                       trained_on=int(c.get("trained_on", 0)))
                for m in c.get("moves", []):
                    move = Move(**{**m, "retry_at": 0.0})
                    if move.phase == "copy":  # caught half way: roll back, run again later
                        self.cleanups.append((move.target, name, move.buckets))
                        move.phase = "queued"
                    for b in move.buckets:
                        coll.moves[b] = move
                self.collections[name] = coll
            if n_shards != len(self.shards):
                log.warning("storage holds a cluster of %d shards; keeping it (asked for %d)", len(self.shards),
                            n_shards)
        else:
            if n_shards < 1:
                raise ValueError(f"a cluster needs at least one shard, got {n_shards}")
            self.epoch = 1
            self.shards = [f"shard-{i}" for i in range(n_shards)]
            self.trained_seq = 0
        self.save()

    def save(self) -> None:
        """Writes the state to ``cluster.json`` atomically (caller holds the lock)."""
        state = {"epoch": self.epoch, "shards": self.shards, "trained_seq": self.trained_seq,
                 "collections": {n: {"config": dataclasses.asdict(c.cfg), "owners": c.owners,
                                     "trained_on": c.trained_on,
                                     "moves": [dataclasses.asdict(m) for m in unique(c.moves.values())]}
                                 for n, c in self.collections.items()}}
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def bump(self) -> int:
        """A change the routers must see: the next epoch, saved, and every waiter woken. Returns the new epoch."""
        self.epoch += 1
        self.save()
        self.cond.notify_all()
        return self.epoch

    def info(self, sid: str) -> ShardInfo:
        """A shard's address and state (an empty one until it registers)."""
        return self.shard_info.get(sid, ShardInfo(sid))

    def coll(self, name: str) -> CollectionState:
        """Raises NotFound for an unknown collection."""
        c = self.collections.get(name)
        if c is None:
            raise NotFound(f"collection {name!r} does not exist")
        return c

    def next_trained_version(self) -> int:
        """The next trained version number of the cluster (caller holds the lock)."""
        self.trained_seq += 1
        self.save()
        return self.trained_seq


def unique(moves) -> list[Move]:
    """Each move once (a move is listed under every bucket it takes)."""
    return list({id(m): m for m in moves}.values())


def span(buckets: list[int]) -> str:
    """Buckets for a log line: "3", or "3..5 (3)"."""
    return f"{buckets[0]}" if len(buckets) == 1 else f"{buckets[0]}..{buckets[-1]} ({len(buckets)})"
