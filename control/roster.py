"""The shards of the cluster: which there are, where they serve, why one cannot start, and adding more.

Uses lookalike (config, errors, shardmap) and the controller's shared state (control.state); reaches shards
through a ``control.placer.ShardPlacer``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from control.placer import ShardPlacer
from control.state import ClusterState
from lookalike.config import MovePolicy
from lookalike.errors import InvalidArgument, NotFound
from lookalike.shardmap import ShardInfo

log = logging.getLogger(__name__)

PLACEMENT_CHECK_S = 1.0  # how often shards that do not serve are checked for a placement problem


class ShardRoster:
    """Shard membership: registration by the shards themselves, readiness, placement problems, new shards."""

    def __init__(self, state: ClusterState, placer: ShardPlacer, policy: MovePolicy):
        self._state = state
        self._placer = placer
        self._policy = policy

    def register_shard(self, shard_id: str, address: str, node: str = "", serving: bool = True) -> int:
        """Called by a shard once it serves (again, after a restart); returns the new epoch."""
        st = self._state
        with st.cond:
            if shard_id not in st.shards:
                raise NotFound(f"shard {shard_id!r} is not part of this cluster")
            st.shard_info[shard_id] = ShardInfo(shard_id, address, node, serving)
            return st.bump()

    def unregister_shard(self, shard_id: str) -> None:
        """Marks a shard as gone (its address is forgotten until it registers again)."""
        st = self._state
        with st.cond:
            st.shard_info[shard_id] = ShardInfo(shard_id)
            st.bump()

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Blocks until every shard has registered as serving; returns False on timeout."""
        st = self._state
        deadline = time.monotonic() + timeout
        with st.cond:
            while not all(st.info(s).serving for s in st.shards):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                st.cond.wait(left)
            return True

    def shards(self) -> list[ShardInfo]:
        """Every shard, with ``problem`` set for one that cannot start."""
        st = self._state
        with st.cond:
            return [dataclasses.replace(st.info(s), problem=st.problems[s]) if s in st.problems
                    else st.info(s) for s in st.shards]

    def add_shards(self, n: int) -> list[str]:
        """Starts ``n`` more shards (empty; rebalancing gives them buckets). Returns their ids."""
        st = self._state
        if n < 0:
            raise InvalidArgument(f"cannot add {n} shards")
        with st.cond:
            if len(st.shards) + n > self._policy.max_shards:
                raise InvalidArgument(
                    f"the cluster has {len(st.shards)} shards and may grow to {self._policy.max_shards}; "
                    f"adding {n} would pass that")
            top = max((int(s.rsplit("-", 1)[1]) for s in st.shards if s.rsplit("-", 1)[-1].isdigit()), default=-1)
            new = [f"shard-{top + 1 + i}" for i in range(n)]
            st.shards.extend(new)
            st.bump()
        for sid in new:
            self._placer.ensure_shard(sid)
        if new:
            log.info("added shards %s", ", ".join(new))
        return new

    def placement_loop(self, stop: threading.Event) -> None:
        """Asks the placer, every PLACEMENT_CHECK_S, why the shards that do not serve are not up, so that status and
        ``rebalance`` can tell (a shard Ray cannot place would otherwise just never register, and the moves onto it
        wait forever). Runs until ``stop`` is set."""
        st = self._state
        while not stop.wait(PLACEMENT_CHECK_S):
            with st.cond:
                down = [s for s in st.shards if not st.info(s).serving]
            found = {}
            for sid in down:
                try:
                    problem = self._placer.placement_problem(sid)
                except Exception as err:  # the check itself failed: say nothing rather than something wrong
                    log.debug("placement check of %s failed: %s", sid, err)
                    continue
                if problem:
                    found[sid] = problem
            with st.cond:
                for sid, problem in found.items():
                    if st.problems.get(sid) != problem:
                        log.warning("shard %s %s", sid, problem)
                for sid in set(st.problems) - set(found):
                    log.info("shard %s %s", sid, "serves" if st.info(sid).serving else "was placed")
                changed = found != st.problems
                st.problems = found
                if changed:
                    st.cond.notify_all()
