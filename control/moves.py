"""Bucket moves: planning a rebalance, and running the moves (a few at once), rolling back and retrying failures.

The steps of a move, and what a failure at each one does, are described in ``control.controller``. Moves are
kept in the collection's state (``control.state``), so a restarted controller rolls back those caught copying and
finishes those past the takeover.

Uses lookalike.config, numpy and the controller's parts (control.state, control.registry, control.roster);
reaches shards through a ``control.placer.ShardPlacer``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np

from control.placer import ShardPlacer
from control.registry import CollectionRegistry
from control.roster import ShardRoster
from control.state import ClusterState, CollectionState, Move, span, unique
from lookalike.config import MovePolicy
from lookalike.metrics import Durations

log = logging.getLogger(__name__)

MOVE_ATTEMPTS = 3


def plan_moves(c: CollectionState, sizes: np.ndarray, shards: list[str], node: dict[str, str],
               policy: MovePolicy) -> list[Move]:
    """Greedy plan: move a bucket from the most to the least loaded shard while that narrows their gap, as if the
    moves already queued had run. A bucket weighs its items plus one, so empty collections even out their bucket
    counts. Never two replicas of a bucket on one shard, nor on one node when another node is free.

    Args:
        c: the collection (its owners and queued moves).
        sizes: items per bucket.
        shards: every shard of the cluster; node: each one's node ("" when unknown).
        policy: the tolerance (a gap it leaves alone) and the buckets per move.
    """
    weight = sizes.astype(np.float64) + 1.0
    owners = [list(o) for o in c.owners]
    for b, m in c.moves.items():
        if m.phase != "leaving":
            owners[b] = [m.target if s == m.source else s for s in owners[b]]
    shards = list(shards)
    load = {s: 0.0 for s in shards}
    for b, own in enumerate(owners):
        for s in own:
            load[s] = load.get(s, 0.0) + weight[b]
    busy = set(c.moves)
    steps: list[tuple[int, str, str]] = []
    mean = sum(load.values()) / max(len(load), 1)
    for _ in range(len(owners) * c.cfg.replication):
        src = max(load, key=load.get)
        gap_best = None
        for dst in sorted(load, key=load.get):
            gap = load[src] - load[dst]
            if gap <= policy.tolerance * mean or dst == src:
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
    size = max(1, policy.move_buckets)
    return [Move(c.cfg.name, sorted(bs[i:i + size]), src, dst)
            for (src, dst), bs in by_pair.items() for i in range(0, len(bs), size)]


class MoveRunner:
    """Queues the moves of a rebalance and runs them in the background, each in a thread of its own.

    Args:
        stop: set when the controller stops (a move waiting out its grace period leaves the rest to a restart).
    """

    def __init__(self, state: ClusterState, placer: ShardPlacer, policy: MovePolicy, registry: CollectionRegistry,
                 roster: ShardRoster, stop: threading.Event):
        self._state = state
        self._placer = placer
        self._policy = policy
        self._registry = registry
        self._roster = roster
        self._stop = stop
        self.running: set[tuple[str, int]] = set()  # keys of the moves under way
        self.done = 0
        self.failed = 0
        self.queued = 0  # moves queued since this controller started
        self.seconds = Durations()  # how long each move that finished took, from its start to its source's drop

    # --- planning -------------------------------------------------------------------------------------------
    def rebalance(self, name: str | None = None, add_shards: int = 0) -> int:
        """Adds shards (if asked), then queues the bucket moves that even out the load of one collection (or of
        all). Returns the moves queued; they run in the background (see :meth:`moves`)."""
        st = self._state
        if name is not None:
            with st.cond:
                st.coll(name)
        if add_shards:
            self._roster.add_shards(add_shards)
        with st.cond:
            names = [name] if name is not None else list(st.collections)
        queued = 0
        for n in names:
            counts = self._registry.bucket_sizes(n)
            with st.cond:
                if n not in st.collections:
                    continue
                c = st.collections[n]
                for m in plan_moves(c, counts, st.shards, {s: st.info(s).node for s in st.shards}, self._policy):
                    for b in m.buckets:
                        c.moves[b] = m
                    queued += 1
                st.save()
                st.cond.notify_all()
        if queued:
            self.queued += queued
            log.info("rebalance: %d bucket move(s) queued", queued)
        return queued

    def moves(self) -> list[Move]:
        """Moves queued or running."""
        with self._state.cond:
            return [dataclasses.replace(m, buckets=list(m.buckets))
                    for c in self._state.collections.values() for m in unique(c.moves.values())]

    def pending(self) -> bool:
        """Whether a move is queued or running (caller holds the lock)."""
        return bool(self.running) or any(c.moves for c in self._state.collections.values())

    def wait_moves(self, timeout: float = 600.0) -> bool:
        """Blocks until no move is queued or running; returns False on timeout."""
        st = self._state
        deadline = time.monotonic() + timeout
        with st.cond:
            while self.pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                st.cond.wait(min(left, 1.0))
            return True

    # --- running --------------------------------------------------------------------------------------------
    def loop(self) -> None:
        """Drops the copies a restarted controller rolled back, then starts moves as they are allowed, until the
        controller stops."""
        st = self._state
        for target, name, buckets in st.cleanups:
            self._quiet(self._placer.drop_buckets, target, name, buckets, st.epoch)
        st.cleanups.clear()
        while not self._stop.is_set():
            with st.cond:
                move = self.next_move()
                if move is None:
                    st.cond.wait(0.5)
                    continue
                self.running.add(move.key)
            threading.Thread(target=self._run_move, args=(move,), daemon=True,
                             name=f"move-{move.collection}-{move.buckets[0]}").start()

    def next_move(self) -> Move | None:
        """The next move allowed to start (caller holds the lock): at most max_moves copying, one per target
        node, and both ends serving. Moves past their copy (leaving) finish at once: that costs nothing."""
        st = self._state
        copying = [m for c in st.collections.values() for m in unique(c.moves.values())
                   if m.key in self.running and m.phase != "leaving"]
        busy_nodes = {st.info(m.target).node or m.target for m in copying}
        for c in st.collections.values():
            for m in unique(c.moves.values()):
                if m.key in self.running:
                    continue
                if m.phase == "leaving":
                    return m
                if len(copying) >= self._policy.max_moves or time.monotonic() < m.retry_at:
                    continue
                if not (st.info(m.source).serving and st.info(m.target).serving):
                    continue
                if (st.info(m.target).node or m.target) in busy_nodes:
                    continue
                return m
        return None

    def _run_move(self, m: Move) -> None:
        st = self._state
        t0, done = time.monotonic(), self.done
        try:
            if m.phase != "leaving":
                try:
                    self._copy_phase(m)
                except Exception as err:
                    self._roll_back(m, err)
                    return
                with st.cond:
                    st.cond.notify_all()  # the copy slot is free: the next move may start
            self._leave_phase(m)
            if self.done > done:
                self.seconds.observe(time.monotonic() - t0)
        finally:
            with st.cond:
                self.running.discard(m.key)
                st.cond.notify_all()

    def _copy_phase(self, m: Move) -> None:
        st = self._state
        with st.cond:
            c = st.coll(m.collection)
            cfg, epoch = c.cfg, st.epoch
            for b in m.buckets:
                if m.source not in c.owners[b] or m.target in c.owners[b]:
                    raise RuntimeError(f"bucket {b} is no longer on {m.source} without {m.target}")
        t0 = time.monotonic()
        self._placer.join_buckets(m.target, cfg, m.buckets, epoch)
        with st.cond:
            m.phase = "copy"
            e1 = st.bump()
        self._placer.fence(m.source, m.collection, e1)
        m.items = self._placer.copy_in(m.target, m.collection, m.buckets, m.source, self._policy.copy_mb_s * 1e6)
        self._placer.finish_join(m.target, m.collection, m.buckets)
        with st.cond:
            c = st.coll(m.collection)
            for b in m.buckets:
                c.owners[b] = [m.target if s == m.source else s for s in c.owners[b]]
            m.phase = "leaving"
            m.owned_epoch = st.bump()
        log.info("moved buckets %s of %s from %s to %s: %d items in %.1fs", span(m.buckets), m.collection,
                 m.source, m.target, m.items, time.monotonic() - t0)

    def _leave_phase(self, m: Move) -> None:
        st = self._state
        if self._stop.wait(self._policy.grace_s):
            return  # stopping: a restarted controller finishes it
        # Fence at E2, not at the current epoch: routers that refreshed since E2 (the grace period is longer than
        # their refresh) keep searching the source for its other buckets without being told their map is stale.
        e2 = m.owned_epoch or st.epoch
        self._quiet(self._placer.drop_buckets, m.source, m.collection, m.buckets, e2)
        with st.cond:
            c = st.collections.get(m.collection)
            if c is not None:
                for b in m.buckets:
                    c.moves.pop(b, None)
            self.done += 1
            st.bump()

    def _roll_back(self, m: Move, err: Exception) -> None:
        """Undoes a move that failed before its target took over, and queues it again (up to MOVE_ATTEMPTS)."""
        st = self._state
        with st.cond:
            m.attempts += 1
            m.phase = "queued"
            m.retry_at = time.monotonic() + 2.0 ** m.attempts
            retry = m.attempts < MOVE_ATTEMPTS
            c = st.collections.get(m.collection)
            if c is not None and not retry:
                for b in m.buckets:
                    c.moves.pop(b, None)
            self.failed += 1
            epoch = st.bump()
        log.warning("move of buckets %s of %s from %s to %s failed (%s); rolled back, %s", span(m.buckets),
                    m.collection, m.source, m.target, err, "will retry" if retry else "giving up")
        # Before the slot is released, so a retry cannot join before this drop.
        self._quiet(self._placer.drop_buckets, m.target, m.collection, m.buckets, epoch)

    @staticmethod
    def _quiet(fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # the shard is down: it loads only what it owns when it comes back
            log.warning("%s%s failed: %s", fn.__name__, args[:2], err)
