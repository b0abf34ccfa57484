"""The controller: owns the collections and the shard map, places shards, and moves buckets between them.

A plain class (in-process in tests); ``control.ray_actors.ControllerActor`` runs it as a named, detached Ray
actor. :class:`Controller` is the facade the router, the shards and the tools call; the work is done by parts that
share one state (``control.state``: shards, collections, placement, moves, epoch; written atomically to
``<data_dir>/cluster.json`` on every change, so a restarted controller, or a whole cluster restarted on the same
storage, finds it again):

- ``control.roster``: the shards (registration, readiness, why one cannot start, adding shards);
- ``control.registry``: the collections (create, drop, list, shard maps, what a shard must load);
- ``control.moves``: bucket moves (planning a rebalance, running the moves, rollback and retries);
- ``control.growth``: automatic growth (a new shard and a rebalance when a shard is nearly full);
- ``control.training``: trained indexes (the collection-wide training, and shards moving into it).

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

Uses lookalike (config, shardmap) and the parts above; reaches shards through a ``control.placer.ShardPlacer``.
"""

from __future__ import annotations

import pathlib
import threading

from control.growth import GrowthCheck
from control.moves import MoveRunner
from control.placer import ShardPlacer
from control.registry import CollectionRegistry
from control.roster import ShardRoster
from control.state import ClusterState, Move
from control.training import Trainings
from lookalike.config import CollectionConfig, MovePolicy
from lookalike.shardmap import ShardInfo, ShardMap


class Controller:
    """Cluster state, placement, moves and trainings: the control plane's one entry point.

    Args:
        data_dir: the storage root; the state file is ``cluster.json`` there.
        n_shards: shards to start when the storage holds no state yet (an existing state keeps its shards).
        placer: starts shards and tells them what they own.
        policy: moves and growth.
    """

    def __init__(self, data_dir: str | pathlib.Path, n_shards: int, placer: ShardPlacer,
                 policy: MovePolicy = MovePolicy()):
        self.state = ClusterState(data_dir, n_shards)
        self.data_dir = self.state.data_dir
        self.policy = policy
        self._placer = placer
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.roster = ShardRoster(self.state, placer, policy)
        self.registry = CollectionRegistry(self.state, placer)
        self.mover = MoveRunner(self.state, placer, policy, self.registry, self.roster, self._stop)
        self.growth = GrowthCheck(self.state, placer, policy, self.roster, self.mover)
        self.trainings = Trainings(self.state, placer, policy, self.registry)

    # --- running --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts (or finds) every shard, and the threads that run moves and watch for growth."""
        for sid in self.state.shards:
            self._placer.ensure_shard(sid)
        self._spawn(self.mover.loop, "mover")
        if hasattr(self._placer, "placement_problem"):
            self._spawn(lambda: self.roster.placement_loop(self._stop), "placement")
        if self.policy.autoscale_s > 0:
            self._spawn(lambda: self.growth.loop(self._stop), "autoscale")
        if self.policy.train_check_s > 0 and hasattr(self._placer, "train_collection"):
            self._spawn(lambda: self.trainings.loop(self._stop), "training")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, daemon=True, name=name)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Stops the background threads (moves in progress are left to a restarted controller)."""
        self._stop.set()
        with self.state.cond:
            self.state.cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def epoch(self) -> int:
        return self.state.epoch

    # --- shards (control.roster) ----------------------------------------------------------------------------
    def register_shard(self, shard_id: str, address: str, node: str = "", serving: bool = True) -> int:
        """Called by a shard once it serves (again, after a restart); returns the new epoch."""
        return self.roster.register_shard(shard_id, address, node, serving)

    def unregister_shard(self, shard_id: str) -> None:
        """Marks a shard as gone (its address is forgotten until it registers again)."""
        self.roster.unregister_shard(shard_id)

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Blocks until every shard has registered as serving; returns False on timeout."""
        return self.roster.wait_ready(timeout)

    def shards(self) -> list[ShardInfo]:
        """Every shard, with ``problem`` set for one that cannot start."""
        return self.roster.shards()

    def add_shards(self, n: int) -> list[str]:
        """Starts ``n`` more shards (empty; rebalancing gives them buckets). Returns their ids."""
        return self.roster.add_shards(n)

    # --- collections (control.registry) ---------------------------------------------------------------------
    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig:
        """Validates, places and persists a collection, then tells its shards (see
        :meth:`CollectionRegistry.create_collection`)."""
        return self.registry.create_collection(cfg)

    def drop_collection(self, name: str) -> None:
        self.registry.drop_collection(name)

    def list_collections(self) -> list[CollectionConfig]:
        return self.registry.list_collections()

    def shard_map(self, name: str) -> ShardMap:
        return self.registry.shard_map(name)

    def shard_maps(self) -> dict[str, ShardMap]:
        """Every collection's shard map, all at the current epoch."""
        return self.registry.shard_maps()

    def assignments(self, shard_id: str) -> list[tuple[CollectionConfig, list[int]]]:
        """What a (re)starting shard must load: each collection with the buckets it owns."""
        return self.registry.assignments(shard_id)

    # --- moves and growth (control.moves, control.growth) ---------------------------------------------------
    def rebalance(self, name: str | None = None, add_shards: int = 0) -> int:
        """Adds shards (if asked), then queues the bucket moves that even out the load of one collection (or of
        all). Returns the moves queued; they run in the background (see :meth:`moves`)."""
        return self.mover.rebalance(name, add_shards)

    def moves(self) -> list[Move]:
        """Moves queued or running."""
        return self.mover.moves()

    def move_counts(self) -> tuple[int, int]:
        """(moves finished, moves failed) since this controller started."""
        return self.mover.done, self.mover.failed

    def move_metrics(self) -> dict:
        """Moves queued, done and failed since this controller started, and the durations of those done
        (lookalike.metrics.Durations.snapshot under "seconds"): what the router exports (router.metrics)."""
        m = self.mover
        return {"queued": m.queued, "done": m.done, "failed": m.failed, "seconds": m.seconds.snapshot()}

    def wait_moves(self, timeout: float = 600.0) -> bool:
        """Blocks until no move is queued or running; returns False on timeout."""
        return self.mover.wait_moves(timeout)

    def check_growth(self) -> int:
        """One growth check (see :class:`GrowthCheck`); returns the moves queued."""
        return self.growth.check_growth()

    # --- trained indexes (control.training) -----------------------------------------------------------------
    def check_training(self) -> None:
        """One pass of the training loop (also called by tests)."""
        self.trainings.check_training()

    def train(self, name: str) -> int:
        """Asks for a new training of a collection (``lookalike train``); returns the new version's number."""
        return self.trainings.train(name)

    def training_status(self, name: str) -> dict:
        """Where a collection's training stands, for describe and status (see :meth:`Trainings.training_status`)."""
        return self.trainings.training_status(name)

    def training_statuses(self) -> dict[str, dict]:
        """:meth:`training_status` of every collection, in one call."""
        return self.trainings.training_statuses()

    def _wait_trained(self, name: str, timeout: float = 60.0) -> bool:
        """Blocks until the collection is trained and every holder moved into the version (tests, tools)."""
        return self.trainings.wait_trained(name, timeout)
