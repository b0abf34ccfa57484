"""The controller: owns the collections and the shard map, places shards, and moves buckets between them.

A plain class (in-process in tests); ``control.ray_cluster`` runs it as a named, detached Ray actor. Its state
(shards, collections, placement, moves, epoch) is written atomically to ``<data_dir>/cluster.json`` on every
change, so a restarted controller, or a whole cluster restarted on the same storage, finds it again.

A move takes a few buckets from a source S to a target T (a few moves run at once, at most one onto a node):

1. T *joins* the bucket: it logs a RESET for it and accepts its writes from now on.
2. Epoch E1 is published with T *joining*: routers send the bucket's writes to S and T; searches still use S.
3. S is *fenced* at E1: it refuses writes routed with an older map, so every write it accepted before is in its
   log. T then *copies* the bucket from S's storage (the volume every node mounts), skipping ids written to it
   directly since step 1 (those are newer), while S serves.
4. Epoch E2: T owns the bucket and S is *leaving*: searches use T; writes still reach both.
5. After a grace period (routers have seen E2), S drops the bucket (RESET in its log, items out of memory, and a
   fence at E2 so a router still searching it for that bucket gets told its map is stale), and epoch E3 forgets S.

A failure before step 4 rolls the move back (T drops what it copied; S never stopped owning the bucket); after
step 4 it rolls forward. Either way the bucket always has an owner holding all of it. A restarted controller
rolls back moves caught before step 4 and finishes those after it.
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

import numpy as np

from encoder import with_encoder
from lookalike.config import CollectionConfig, MovePolicy
from lookalike.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from lookalike.indexspec import RETRAIN_GROWTH, training_points
from lookalike.shardmap import ShardInfo, ShardMap, assign_buckets, order_by_node
from shard.index import check_index_spec

log = logging.getLogger(__name__)

MOVE_ATTEMPTS = 3
PLACEMENT_CHECK_S = 1.0  # how often shards that do not serve are checked for a placement problem


def stored_shards(data_dir: str | pathlib.Path) -> int:
    """The number of shards of the cluster state kept in ``data_dir`` (0: none there yet)."""
    try:
        return len(json.loads((pathlib.Path(data_dir) / "cluster.json").read_text())["shards"])
    except FileNotFoundError:
        return 0


class ShardPlacer(Protocol):
    """Starts shards and forwards placement to them (Ray actors in production)."""

    def ensure_shard(self, shard_id: str) -> None: ...

    def open_collection(self, shard_id: str, cfg: CollectionConfig, buckets: list[int]) -> None: ...

    def drop_collection(self, shard_id: str, name: str) -> None: ...

    # bucket moves: these raise on failure (the controller rolls the move back)
    def join_buckets(self, shard_id: str, cfg: CollectionConfig, buckets: list[int], epoch: int) -> None: ...

    def fence(self, shard_id: str, name: str, epoch: int) -> None: ...

    def copy_in(self, shard_id: str, name: str, buckets: list[int], source: str, rate_bytes_s: float = 0) -> int: ...

    def finish_join(self, shard_id: str, name: str, buckets: list[int]) -> None: ...

    def drop_buckets(self, shard_id: str, name: str, buckets: list[int], epoch: int) -> int: ...

    def bucket_counts(self, shard_id: str, name: str) -> list[int]: ...

    def stats(self, shard_id: str) -> dict: ...

    # optional (the controller asks only placers that have it):
    # def placement_problem(self, shard_id: str) -> str
    #     why a shard that does not serve cannot start, e.g. "cannot be placed: it needs 1 CPU and 0.0 of 2.0 CPUs
    #     are free"; "" when it is starting or the placer does not know.


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


_GROWTH_CHECK_S = 10.0  # seconds between counts of a trained collection that may be trained again as it grows


@dataclasses.dataclass
class _Training:
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
class _Collection:
    cfg: CollectionConfig
    owners: list[list[str]]
    moves: dict[int, Move] = dataclasses.field(default_factory=dict)
    trained_on: int = 0  # vectors the current trained version was trained on
    training: _Training = dataclasses.field(default_factory=_Training)


class Controller:
    """Cluster state, placement and moves.

    Args:
        data_dir: the storage root; the state file is ``cluster.json`` there.
        n_shards: shards to start when the storage holds no state yet (an existing state keeps its shards).
        placer: starts shards and tells them what they own.
        policy: moves and growth.
    """

    def __init__(self, data_dir: str | pathlib.Path, n_shards: int, placer: ShardPlacer,
                 policy: MovePolicy = MovePolicy()):
        self.data_dir = pathlib.Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.data_dir / "cluster.json"
        self._placer = placer
        self.policy = policy
        self._cond = threading.Condition(threading.RLock())
        self._shard_info: dict[str, ShardInfo] = {}
        self._collections: dict[str, _Collection] = {}
        self._cleanups: list[tuple[str, str, list[int]]] = []  # (shard, collection, buckets): rolled-back copies
        self._running: set[tuple[str, int]] = set()
        self._problems: dict[str, str] = {}  # shard id -> why it cannot start (see ShardInfo.problem)
        self.moves_done = 0
        self.moves_failed = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if self._path.exists():
            state = json.loads(self._path.read_text())
            self._epoch = int(state["epoch"]) + 1  # a restart is a change: routers must re-read addresses
            self._shards = list(state["shards"])
            self._trained_seq = int(state.get("trained_seq", 0))
            for name, c in state["collections"].items():
                coll = _Collection(CollectionConfig(**c["config"]), [list(o) for o in c["owners"]],
                                   trained_on=int(c.get("trained_on", 0)))
                for m in c.get("moves", []):
                    move = Move(**{**m, "retry_at": 0.0})
                    if move.phase == "copy":  # caught half way: roll back, run again later
                        self._cleanups.append((move.target, name, move.buckets))
                        move.phase = "queued"
                    for b in move.buckets:
                        coll.moves[b] = move
                self._collections[name] = coll
            if n_shards != len(self._shards):
                log.warning("storage holds a cluster of %d shards; keeping it (asked for %d)", len(self._shards),
                            n_shards)
        else:
            if n_shards < 1:
                raise ValueError(f"a cluster needs at least one shard, got {n_shards}")
            self._epoch = 1
            self._shards = [f"shard-{i}" for i in range(n_shards)]
            self._trained_seq = 0
        self._save()

    # --- persistence ----------------------------------------------------------------------------------------
    def _save(self) -> None:
        state = {"epoch": self._epoch, "shards": self._shards, "trained_seq": self._trained_seq,
                 "collections": {n: {"config": dataclasses.asdict(c.cfg), "owners": c.owners,
                                     "trained_on": c.trained_on,
                                     "moves": [dataclasses.asdict(m) for m in _unique(c.moves.values())]}
                                 for n, c in self._collections.items()}}
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def _bump(self) -> int:
        self._epoch += 1
        self._save()
        self._cond.notify_all()
        return self._epoch

    # --- shards ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts (or finds) every shard, and the threads that run moves and watch for growth."""
        for sid in self._shards:
            self._placer.ensure_shard(sid)
        self._spawn(self._mover_loop, "mover")
        if hasattr(self._placer, "placement_problem"):
            self._spawn(self._placement_loop, "placement")
        if self.policy.autoscale_s > 0:
            self._spawn(self._autoscale_loop, "autoscale")
        if self.policy.train_check_s > 0 and hasattr(self._placer, "train_collection"):
            self._spawn(self._training_loop, "training")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, daemon=True, name=name)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Stops the background threads (moves in progress are left to a restarted controller)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def register_shard(self, shard_id: str, address: str, node: str = "", serving: bool = True) -> int:
        """Called by a shard once it serves (again, after a restart); returns the new epoch."""
        with self._cond:
            if shard_id not in self._shards:
                raise NotFound(f"shard {shard_id!r} is not part of this cluster")
            self._shard_info[shard_id] = ShardInfo(shard_id, address, node, serving)
            return self._bump()

    def unregister_shard(self, shard_id: str) -> None:
        """Marks a shard as gone (its address is forgotten until it registers again)."""
        with self._cond:
            self._shard_info[shard_id] = ShardInfo(shard_id)
            self._bump()

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Blocks until every shard has registered as serving; returns False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(self._info(s).serving for s in self._shards):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _info(self, sid: str) -> ShardInfo:
        return self._shard_info.get(sid, ShardInfo(sid))

    def assignments(self, shard_id: str) -> list[tuple[CollectionConfig, list[int]]]:
        """What a (re)starting shard must load: each collection with the buckets it owns (not those it was
        copying in: that move is rolled back; not those it was leaving: it has given them away)."""
        with self._cond:
            return [(c.cfg, [b for b, own in enumerate(c.owners) if shard_id in own])
                    for c in self._collections.values()]

    def shards(self) -> list[ShardInfo]:
        """Every shard, with ``problem`` set for one that cannot start."""
        with self._cond:
            return [dataclasses.replace(self._info(s), problem=self._problems[s]) if s in self._problems
                    else self._info(s) for s in self._shards]

    def _placement_loop(self) -> None:
        """Asks the placer, every PLACEMENT_CHECK_S, why the shards that do not serve are not up, so that status and
        ``rebalance`` can tell (a shard Ray cannot place would otherwise just never register, and the moves onto it
        wait forever)."""
        while not self._stop.wait(PLACEMENT_CHECK_S):
            with self._cond:
                down = [s for s in self._shards if not self._info(s).serving]
            found = {}
            for sid in down:
                try:
                    problem = self._placer.placement_problem(sid)
                except Exception as err:  # the check itself failed: say nothing rather than something wrong
                    log.debug("placement check of %s failed: %s", sid, err)
                    continue
                if problem:
                    found[sid] = problem
            with self._cond:
                for sid, problem in found.items():
                    if self._problems.get(sid) != problem:
                        log.warning("shard %s %s", sid, problem)
                for sid in set(self._problems) - set(found):
                    log.info("shard %s %s", sid, "serves" if self._info(sid).serving else "was placed")
                changed = found != self._problems
                self._problems = found
                if changed:
                    self._cond.notify_all()

    def add_shards(self, n: int) -> list[str]:
        """Starts ``n`` more shards (empty; rebalancing gives them buckets). Returns their ids."""
        if n < 0:
            raise InvalidArgument(f"cannot add {n} shards")
        with self._cond:
            if len(self._shards) + n > self.policy.max_shards:
                raise InvalidArgument(
                    f"the cluster has {len(self._shards)} shards and may grow to {self.policy.max_shards}; "
                    f"adding {n} would pass that")
            top = max((int(s.rsplit("-", 1)[1]) for s in self._shards if s.rsplit("-", 1)[-1].isdigit()), default=-1)
            new = [f"shard-{top + 1 + i}" for i in range(n)]
            self._shards.extend(new)
            self._bump()
        for sid in new:
            self._placer.ensure_shard(sid)
        if new:
            log.info("added shards %s", ", ".join(new))
        return new

    # --- collections ----------------------------------------------------------------------------------------
    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig:
        """Validates, places and persists a collection, then tells its shards.

        Raises:
            InvalidArgument: a bad spec. AlreadyExists: the name is taken.
        """
        cfg = with_encoder(cfg).validated()  # the encoder's dim and metric, then the fields and the spec's grammar
        check_index_spec(cfg.dim, cfg.metric, cfg.index, cfg.gpu_float16)  # and the spec builds in FAISS
        cfg = dataclasses.replace(cfg, trained_version=0)  # the controller's to set, never the user's
        with self._cond:
            if cfg.name in self._collections:
                raise AlreadyExists(f"collection {cfg.name!r} already exists")
            ordered = order_by_node(self._shards, {s: self._info(s).node for s in self._shards})
            owners = [list(o) for o in assign_buckets(cfg.buckets, ordered, cfg.replication)]
            self._collections[cfg.name] = _Collection(cfg, owners)
            self._save()
            epoch = self._epoch
        for sid in self._shards:
            buckets = [b for b, own in enumerate(owners) if sid in own]
            if buckets:
                self._placer.open_collection(sid, cfg, buckets)
        with self._cond:
            self._bump()
        log.info("created collection %s (%s, dim %d, %s, %d buckets, epoch %d)", cfg.name, cfg.metric, cfg.dim,
                 cfg.index, cfg.buckets, epoch)
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
            return [c.cfg for c in self._collections.values()]

    def _coll(self, name: str) -> _Collection:
        c = self._collections.get(name)
        if c is None:
            raise NotFound(f"collection {name!r} does not exist")
        return c

    def shard_map(self, name: str) -> ShardMap:
        with self._cond:
            c = self._coll(name)
            joining = leaving = ()
            if c.moves:
                joining = tuple((m.target,) if (m := c.moves.get(b)) and m.phase == "copy" else ()
                                for b in range(len(c.owners)))
                leaving = tuple((m.source,) if (m := c.moves.get(b)) and m.phase == "leaving" else ()
                                for b in range(len(c.owners)))
            return ShardMap(self._epoch, c.cfg, tuple(tuple(o) for o in c.owners),
                            {s: self._info(s) for s in self._shards}, joining, leaving)

    def shard_maps(self) -> dict[str, ShardMap]:
        """Every collection's shard map, all at the current epoch (one call for status and listings, rather than
        one per collection)."""
        with self._cond:
            return {name: self.shard_map(name) for name in self._collections}

    def epoch(self) -> int:
        return self._epoch

    # --- rebalancing ----------------------------------------------------------------------------------------
    def rebalance(self, name: str | None = None, add_shards: int = 0) -> int:
        """Adds shards (if asked), then queues the bucket moves that even out the load of one collection (or of
        all). Returns the moves queued; they run in the background (see :meth:`moves`)."""
        if name is not None:
            with self._cond:
                self._coll(name)
        if add_shards:
            self.add_shards(add_shards)
        with self._cond:
            names = [name] if name is not None else list(self._collections)
        queued = 0
        for n in names:
            counts = self._bucket_sizes(n)
            with self._cond:
                if n not in self._collections:
                    continue
                c = self._collections[n]
                for m in self._plan(c, counts):
                    for b in m.buckets:
                        c.moves[b] = m
                    queued += 1
                self._save()
                self._cond.notify_all()
        if queued:
            log.info("rebalance: %d bucket move(s) queued", queued)
        return queued

    def _bucket_sizes(self, name: str) -> np.ndarray:
        """Items per bucket, as the owners report them (the largest report of any owner)."""
        with self._cond:
            c = self._coll(name)
            holders = sorted({s for own in c.owners for s in own})
            n = c.cfg.buckets
        sizes = np.zeros(n, dtype=np.int64)
        for sid in holders:
            try:
                counts = self._placer.bucket_counts(sid, name)
            except Exception as err:  # down: plan with what the others say
                log.warning("no bucket counts from %s: %s", sid, err)
                continue
            if len(counts) == n:
                sizes = np.maximum(sizes, np.asarray(counts, dtype=np.int64))
        return sizes

    def _plan(self, c: _Collection, sizes: np.ndarray) -> list[Move]:
        """Greedy plan (caller holds the lock): move a bucket from the most to the least loaded shard while that
        narrows their gap, as if the moves already queued had run. A bucket weighs its items plus one, so empty
        collections even out their bucket counts. Never two replicas of a bucket on one shard, nor on one node
        when another node is free."""
        weight = sizes.astype(np.float64) + 1.0
        owners = [list(o) for o in c.owners]
        for b, m in c.moves.items():
            if m.phase != "leaving":
                owners[b] = [m.target if s == m.source else s for s in owners[b]]
        shards = list(self._shards)
        load = {s: 0.0 for s in shards}
        for b, own in enumerate(owners):
            for s in own:
                load[s] = load.get(s, 0.0) + weight[b]
        node = {s: self._info(s).node for s in shards}
        busy = set(c.moves)
        steps: list[tuple[int, str, str]] = []
        mean = sum(load.values()) / max(len(load), 1)
        for _ in range(len(owners) * c.cfg.replication):
            src = max(load, key=load.get)
            gap_best = None
            for dst in sorted(load, key=load.get):
                gap = load[src] - load[dst]
                if gap <= self.policy.tolerance * mean or dst == src:
                    break
                best, best_score = None, None
                for b, own in enumerate(owners):
                    if src not in own or dst in own or b in busy or weight[b] >= gap:
                        continue
                    others = {node[s] for s in own if s != src}
                    if node[dst] and node[dst] in others and any(node[t] not in others for t in shards if t not in own):
                        continue
                    score = abs(gap - 2 * weight[b])
                    if best_score is None or score < best_score:
                        best, best_score = b, score
                if best is not None:
                    gap_best = (best, dst)
                    break
            if gap_best is None:
                break
            b, dst = gap_best
            owners[b] = [dst if s == src else s for s in owners[b]]
            load[src] -= weight[b]
            load[dst] += weight[b]
            busy.add(b)
            steps.append((b, src, dst))
        # One move per (source, target) pair and group of up to move_buckets buckets.
        by_pair: dict[tuple[str, str], list[int]] = {}
        for b, src, dst in steps:
            by_pair.setdefault((src, dst), []).append(b)
        size = max(1, self.policy.move_buckets)
        return [Move(c.cfg.name, sorted(bs[i:i + size]), src, dst)
                for (src, dst), bs in by_pair.items() for i in range(0, len(bs), size)]

    def moves(self) -> list[Move]:
        """Moves queued or running."""
        with self._cond:
            return [dataclasses.replace(m, buckets=list(m.buckets))
                    for c in self._collections.values() for m in _unique(c.moves.values())]

    def move_counts(self) -> tuple[int, int]:
        """(moves finished, moves failed) since this controller started."""
        return self.moves_done, self.moves_failed

    def wait_moves(self, timeout: float = 600.0) -> bool:
        """Blocks until no move is queued or running; returns False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(c.moves for c in self._collections.values()) or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    # --- running moves --------------------------------------------------------------------------------------
    def _mover_loop(self) -> None:
        for target, name, buckets in self._cleanups:
            self._quiet(self._placer.drop_buckets, target, name, buckets, self._epoch)
        self._cleanups.clear()
        while not self._stop.is_set():
            with self._cond:
                move = self._next_move()
                if move is None:
                    self._cond.wait(0.5)
                    continue
                self._running.add(move.key)
            threading.Thread(target=self._run_move, args=(move,), daemon=True,
                             name=f"move-{move.collection}-{move.buckets[0]}").start()

    def _next_move(self) -> Move | None:
        """The next move allowed to start (caller holds the lock): at most max_moves copying, one per target
        node, and both ends serving. Moves past their copy (leaving) finish at once: that costs nothing."""
        copying = [m for c in self._collections.values() for m in _unique(c.moves.values())
                   if m.key in self._running and m.phase != "leaving"]
        busy_nodes = {self._info(m.target).node or m.target for m in copying}
        for c in self._collections.values():
            for m in _unique(c.moves.values()):
                if m.key in self._running:
                    continue
                if m.phase == "leaving":
                    return m
                if len(copying) >= self.policy.max_moves or time.monotonic() < m.retry_at:
                    continue
                if not (self._info(m.source).serving and self._info(m.target).serving):
                    continue
                if (self._info(m.target).node or m.target) in busy_nodes:
                    continue
                return m
        return None

    def _run_move(self, m: Move) -> None:
        try:
            if m.phase != "leaving":
                try:
                    self._copy_phase(m)
                except Exception as err:
                    self._roll_back(m, err)
                    return
                with self._cond:
                    self._cond.notify_all()  # the copy slot is free: the next move may start
            self._leave_phase(m)
        finally:
            with self._cond:
                self._running.discard(m.key)
                self._cond.notify_all()

    def _copy_phase(self, m: Move) -> None:
        with self._cond:
            c = self._coll(m.collection)
            cfg, epoch = c.cfg, self._epoch
            for b in m.buckets:
                if m.source not in c.owners[b] or m.target in c.owners[b]:
                    raise RuntimeError(f"bucket {b} is no longer on {m.source} without {m.target}")
        t0 = time.monotonic()
        self._placer.join_buckets(m.target, cfg, m.buckets, epoch)
        with self._cond:
            m.phase = "copy"
            e1 = self._bump()
        self._placer.fence(m.source, m.collection, e1)
        m.items = self._placer.copy_in(m.target, m.collection, m.buckets, m.source, self.policy.copy_mb_s * 1e6)
        self._placer.finish_join(m.target, m.collection, m.buckets)
        with self._cond:
            c = self._coll(m.collection)
            for b in m.buckets:
                c.owners[b] = [m.target if s == m.source else s for s in c.owners[b]]
            m.phase = "leaving"
            m.owned_epoch = self._bump()
        log.info("moved buckets %s of %s from %s to %s: %d items in %.1fs", _span(m.buckets), m.collection,
                 m.source, m.target, m.items, time.monotonic() - t0)

    def _leave_phase(self, m: Move) -> None:
        if self._stop.wait(self.policy.grace_s):
            return  # stopping: a restarted controller finishes it
        # Fence at E2, not at the current epoch: routers that refreshed since E2 (the grace period is longer than
        # their refresh) keep searching the source for its other buckets without being told their map is stale.
        e2 = m.owned_epoch or self._epoch
        self._quiet(self._placer.drop_buckets, m.source, m.collection, m.buckets, e2)
        with self._cond:
            c = self._collections.get(m.collection)
            if c is not None:
                for b in m.buckets:
                    c.moves.pop(b, None)
            self.moves_done += 1
            self._bump()

    def _roll_back(self, m: Move, err: Exception) -> None:
        """Undoes a move that failed before its target took over, and queues it again (up to MOVE_ATTEMPTS)."""
        with self._cond:
            m.attempts += 1
            m.phase = "queued"
            m.retry_at = time.monotonic() + 2.0 ** m.attempts
            retry = m.attempts < MOVE_ATTEMPTS
            c = self._collections.get(m.collection)
            if c is not None and not retry:
                for b in m.buckets:
                    c.moves.pop(b, None)
            self.moves_failed += 1
            epoch = self._bump()
        log.warning("move of buckets %s of %s from %s to %s failed (%s); rolled back, %s", _span(m.buckets),
                    m.collection, m.source, m.target, err, "will retry" if retry else "giving up")
        # Before the slot is released, so a retry cannot join before this drop.
        self._quiet(self._placer.drop_buckets, m.target, m.collection, m.buckets, epoch)

    @staticmethod
    def _quiet(fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # the shard is down: it loads only what it owns when it comes back
            log.warning("%s%s failed: %s", fn.__name__, args[:2], err)

    # --- automatic growth -----------------------------------------------------------------------------------
    def _autoscale_loop(self) -> None:
        while not self._stop.wait(self.policy.autoscale_s):
            try:
                self.check_growth()
            except Exception:
                log.exception("growth check failed")

    def check_growth(self) -> int:
        """Adds a shard and rebalances every collection when a shard is past the high-water mark of its capacity
        (and no move is under way). Returns the moves queued."""
        with self._cond:
            if self._running or any(c.moves for c in self._collections.values()):
                return 0
            if len(self._shards) >= self.policy.max_shards:
                return 0
            if self._problems:  # another shard would not start either
                return 0
            shards = list(self._shards)
        full = []
        for sid in shards:
            try:
                st = self._placer.stats(sid)
            except Exception:
                continue
            if st.get("capacity_bytes") and st["memory_bytes"] > self.policy.high_water * st["capacity_bytes"]:
                full.append(sid)
        if not full:
            return 0
        log.info("shards %s passed %.0f%% of their capacity: adding a shard", ", ".join(full),
                 100 * self.policy.high_water)
        self.add_shards(1)
        return self.rebalance()

    # --- training --------------------------------------------------------------------------------------------------
    def _training_loop(self) -> None:
        """Trains collections that reached their threshold (or were asked to), and moves every shard into the current
        trained version."""
        while not self._stop.wait(self.policy.train_check_s):
            try:
                self.check_training()
            except Exception:  # noqa: BLE001: a failed check is logged and tried again at the next one
                log.exception("training check failed")


    def check_training(self) -> None:
        """One pass of the training loop (also called by tests)."""
        with self._cond:
            names = [n for n, c in self._collections.items() if training_points(c.cfg.index)[0]]
        for name in names:
            with self._cond:
                c = self._collections.get(name)
                if c is None or c.training.running:
                    continue
                cfg, tr, trained_on = c.cfg, c.training, c.trained_on
            needed, sample = training_points(cfg.index)
            # Counting asks every shard: once trained, only now and then, to see whether it grew enough to train again.
            recount = time.monotonic() >= tr.counted_at + (_GROWTH_CHECK_S if cfg.trained_version else 0)
            if (cfg.trained_version == 0 or tr.requested or trained_on < sample) and recount:
                sizes = self._bucket_sizes(name)
                tr.vectors = int(sizes.sum())
                tr.counted_at = time.monotonic()
                grown = cfg.trained_version and trained_on < sample and tr.vectors >= RETRAIN_GROWTH * trained_on
                if tr.vectors >= needed and (cfg.trained_version == 0 or tr.requested or grown) \
                        and time.monotonic() >= tr.retry_at:
                    self._train(name, cfg, tr, sample, sizes)
            self._sync_trained(name)

    def _train(self, name: str, cfg: CollectionConfig, tr: _Training, sample: int, sizes: np.ndarray) -> None:
        """Trains the next version on one shard (reading a sample of every bucket from storage), then publishes it.

        Versions are numbered across the whole cluster, never twice (``trained_seq`` in the state): a collection
        dropped and created again under its name never meets a version number its predecessor used, so a router
        or shard holding the old one's coarse centroids cannot take them for the new one's."""
        with self._cond:
            c = self._collections.get(name)
            if c is None or c.cfg != cfg:
                return
            version = tr.next_version = tr.next_version or self._next_trained_version()  # a retry keeps its number
            order = np.random.default_rng(version).permutation(cfg.buckets)
            trainer = next((s for s in sorted({s for own in c.owners for s in own}) if self._info(s).serving), None)
            owners = [list(o) for o in c.owners]
            tr.running, tr.running_version, tr.started = True, version, time.monotonic()
        try:
            if trainer is None:
                raise FailedPrecondition("no shard of the collection is serving")
            upto = int(np.searchsorted(np.cumsum(sizes[order]), sample)) + 1
            sources: dict[str, list[int]] = {}
            for b in order[:upto].tolist():
                sources.setdefault(owners[b][0], []).append(b)
            note = self._placer.train_collection(trainer, cfg, version, list(sources.items()), sample)
        except Exception as err:  # noqa: BLE001: reported in describe/status, tried again later
            with self._cond:
                tr.running = False
                tr.error = f"training v{version} failed: {err}"
                tr.retry_at = time.monotonic() + self.policy.train_retry_s
            log.error("%s: %s; trying again in %.0fs", name, tr.error, self.policy.train_retry_s)
            return
        with self._cond:
            tr.running = False
            c = self._collections.get(name)
            if c is None or c.cfg != cfg:  # dropped (or recreated) meanwhile
                return
            c.cfg = dataclasses.replace(cfg, trained_version=version)
            c.trained_on = int(note.get("trained_on", 0))
            tr.error = ""
            if tr.next_version == version:  # else `train` asked for another one meanwhile: it comes next
                tr.requested, tr.next_version = False, 0
            tr.ready, tr.adopt_errors = {}, {}
            self._bump()
        log.info("%s: trained index v%d (%s) on %d vectors in %.1fs; moving the shards into it", name, version,
                 cfg.index, c.trained_on, note.get("seconds", 0.0))


    def _sync_trained(self, name: str) -> None:
        """Tells each shard holding the collection that is not yet on the current trained version to move into it,
        each in a thread of its own (encoding a shard's items takes a while)."""
        with self._cond:
            c = self._collections.get(name)
            if c is None or not c.cfg.trained_version:
                return
            cfg, tr = c.cfg, c.training
            holders = {s for own in c.owners for s in own} | {m.target for m in c.moves.values()}
            todo = [s for s in sorted(holders) if tr.ready.get(s) != cfg.trained_version and s not in tr.adopting
                    and self._info(s).serving]
            tr.adopting.update(todo)

        def adopt(sid):
            try:
                self._placer.use_trained(sid, cfg)
            except Exception as err:  # noqa: BLE001: tried again at the next check
                with self._cond:
                    tr.adopt_errors[sid] = str(err)
                log.warning("%s: shard %s could not move into trained index v%d: %s", name, sid, cfg.trained_version,
                            err)
            else:
                with self._cond:
                    tr.ready[sid] = cfg.trained_version
                    tr.adopt_errors.pop(sid, None)
            finally:
                with self._cond:
                    tr.adopting.discard(sid)
                    self._cond.notify_all()

        for sid in todo:
            threading.Thread(target=adopt, args=(sid,), name=f"adopt-{name}-{sid}", daemon=True).start()


    def train(self, name: str) -> int:
        """Asks for a new training of a collection (``lookalike train``): the next check trains version N+1 on a fresh
        sample and the shards move into it, searching the old version meanwhile. Returns the new version's number
        (versions are numbered across the cluster: the next one, not necessarily N+1).

        Raises:
            NotFound; FailedPrecondition: the spec needs no training, or the collection holds too few vectors.
        """
        with self._cond:
            c = self._coll(name)
            cfg = c.cfg
        needed, _ = training_points(cfg.index)
        if not needed:
            raise FailedPrecondition(f"collection {name!r} ({cfg.index}) has an index that needs no training")
        size = int(self._bucket_sizes(name).sum())
        if size < needed:
            raise FailedPrecondition(f"collection {name!r} ({cfg.index}) holds {size} vectors; training needs "
                                     f"{needed} (until then its searches are exact)")
        with self._cond:
            if c.training.running and c.training.next_version == c.training.running_version:
                c.training.next_version = 0  # the training under way began before this request: one more after it
            if not (c.training.requested and c.training.next_version):
                c.training.next_version = self._next_trained_version()
            c.training.requested = True
            c.training.retry_at = c.training.counted_at = 0.0
            return c.training.next_version

    def _next_trained_version(self) -> int:
        """The next trained version number of the cluster (caller holds the lock)."""
        self._trained_seq += 1
        self._save()
        return self._trained_seq

    def training_statuses(self) -> dict[str, dict]:
        """:meth:`training_status` of every collection, in one call."""
        with self._cond:
            return {name: self.training_status(name) for name in self._collections}

    def training_status(self, name: str) -> dict:
        """Where a collection's training stands, for describe and status: state ("not_needed", "untrained",
        "training", "trained"), version, vectors, vectors_needed, trained_on, shards_ready, shards, and a sentence."""
        with self._cond:
            c = self._coll(name)
            cfg, tr = c.cfg, c.training
            needed, _ = training_points(cfg.index)
            holders = sorted({s for own in c.owners for s in own})
            ready = sum(tr.ready.get(s) == cfg.trained_version for s in holders) if cfg.trained_version else 0
            out = {"version": cfg.trained_version, "vectors": tr.vectors, "vectors_needed": needed,
                   "trained_on": c.trained_on, "shards_ready": ready, "shards": len(holders),
                   "next_version": tr.next_version}
            if not needed:
                return {**out, "shards_ready": len(holders), "state": "not_needed",
                        "message": f"{cfg.index} needs no training"}
            if tr.running:
                state = "training"
                msg = (f"training v{tr.running_version} ({time.monotonic() - tr.started:.0f}s so far); "
                       + (f"searching v{cfg.trained_version} meanwhile" if cfg.trained_version else "searches are exact"))
            elif not cfg.trained_version:
                state = "untrained"
                msg = f"untrained: {tr.vectors:,} of {needed:,} vectors needed; searches are exact"
            else:
                state = "trained"
                msg = f"trained v{cfg.trained_version} on {c.trained_on:,} vectors; {ready} of {len(holders)} shards use it"
                if ready < len(holders):
                    msg += " (the others are moving into it, or search exactly or the previous version meanwhile)"
            if tr.requested and (not tr.running or tr.next_version != tr.running_version):
                msg += f"; v{tr.next_version} asked for, starting" + (" after it" if tr.running else "")
            if tr.error:
                msg += f"; {tr.error}"
            if tr.adopt_errors:
                msg += "; " + "; ".join(f"{s}: {e}" for s, e in sorted(tr.adopt_errors.items()))
            return {**out, "state": state, "message": msg}


    def _wait_trained(self, name: str, timeout: float = 60.0) -> bool:
        """Blocks until the collection is trained and every holder moved into the version (tests, tools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.training_status(name)
            if st["state"] in ("trained", "not_needed") and st["shards_ready"] == st["shards"]:
                return True
            time.sleep(0.05)
        return False


def _unique(moves) -> list[Move]:
    """Each move once (a move is listed under every bucket it takes)."""
    return list({id(m): m for m in moves}.values())


def _span(buckets: list[int]) -> str:
    return f"{buckets[0]}" if len(buckets) == 1 else f"{buckets[0]}..{buckets[-1]} ({len(buckets)})"
