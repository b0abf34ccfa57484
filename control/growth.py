"""Automatic growth: a shard past the high-water mark of its capacity gets the cluster a new shard and a rebalance.

Uses lookalike.config and the controller's parts (control.state, control.roster, control.moves); reads each
shard's memory through a ``control.placer.ShardPlacer``.
"""

from __future__ import annotations

import logging
import threading

from control.moves import MoveRunner
from control.placer import ShardPlacer
from control.roster import ShardRoster
from control.state import ClusterState
from lookalike.config import MovePolicy

log = logging.getLogger(__name__)


class GrowthCheck:
    """Checks, every ``policy.autoscale_s``, whether a shard is nearly full, and grows the cluster if so."""

    def __init__(self, state: ClusterState, placer: ShardPlacer, policy: MovePolicy, roster: ShardRoster,
                 mover: MoveRunner):
        self._state = state
        self._placer = placer
        self._policy = policy
        self._roster = roster
        self._mover = mover

    def loop(self, stop: threading.Event) -> None:
        """Runs :meth:`check_growth` every ``policy.autoscale_s`` until ``stop`` is set."""
        while not stop.wait(self._policy.autoscale_s):
            try:
                self.check_growth()
            except Exception:
                log.exception("growth check failed")

    def check_growth(self) -> int:
        """Adds a shard and rebalances every collection when a shard is past the high-water mark of its capacity
        (and no move is under way). Returns the moves queued."""
        st = self._state
        with st.cond:
            if self._mover.pending():
                return 0
            if len(st.shards) >= self._policy.max_shards:
                return 0
            if st.problems:  # another shard would not start either
                return 0
            shards = list(st.shards)
        full = []
        for sid in shards:
            try:
                stats = self._placer.stats(sid)
            except Exception:
                continue
            cap = stats.get("capacity_bytes")
            if cap and stats["memory_bytes"] > self._policy.high_water * cap:
                full.append(sid)
        if not full:
            return 0
        log.info("shards %s passed %.0f%% of their capacity: adding a shard", ", ".join(full),
                 100 * self._policy.high_water)
        self._roster.add_shards(1)
        return self._mover.rebalance()
