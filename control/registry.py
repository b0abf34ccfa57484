"""The collections of the cluster: creating, dropping and listing them, their shard maps, what each shard holds.

Uses lookalike (config, errors, shardmap), numpy and the controller's shared state (control.state); reaches shards
through a ``control.placer.ShardPlacer``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from control.placer import ShardPlacer
from control.state import ClusterState, CollectionState
from encoder import with_encoder
from lookalike.config import CollectionConfig
from lookalike.errors import AlreadyExists, NotFound
from lookalike.shardmap import ShardMap, assign_buckets, order_by_node
from shard.specs import check_index_spec

log = logging.getLogger(__name__)


class CollectionRegistry:
    """Collections: their configs, owners and shard maps; placing a new one and dropping one."""

    def __init__(self, state: ClusterState, placer: ShardPlacer):
        self._state = state
        self._placer = placer

    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig:
        """Validates, places and persists a collection, then tells its shards.

        Raises:
            InvalidArgument: a bad spec. AlreadyExists: the name is taken.
        """
        st = self._state
        cfg = with_encoder(cfg).validated()  # the encoder's dim and metric, then the fields and the spec's grammar
        check_index_spec(cfg.dim, cfg.metric, cfg.index, cfg.gpu_float16)  # and the spec builds in FAISS
        cfg = dataclasses.replace(cfg, trained_version=0)  # the controller's to set, never the user's
        with st.cond:
            if cfg.name in st.collections:
                raise AlreadyExists(f"collection {cfg.name!r} already exists")
            ordered = order_by_node(st.shards, {s: st.info(s).node for s in st.shards})
            owners = [list(o) for o in assign_buckets(cfg.buckets, ordered, cfg.replication)]
            st.collections[cfg.name] = CollectionState(cfg, owners)
            st.save()
            epoch = st.epoch
        for sid in st.shards:
            buckets = [b for b, own in enumerate(owners) if sid in own]
            if buckets:
                self._placer.open_collection(sid, cfg, buckets)
        with st.cond:
            st.bump()
        log.info("created collection %s (%s, dim %d, %s, %d buckets, epoch %d)", cfg.name, cfg.metric, cfg.dim,
                 cfg.index, cfg.buckets, epoch)
        return cfg

    def drop_collection(self, name: str) -> None:
        st = self._state
        with st.cond:
            if name not in st.collections:
                raise NotFound(f"collection {name!r} does not exist")
            del st.collections[name]
            st.bump()
        for sid in st.shards:
            self._placer.drop_collection(sid, name)
        log.info("dropped collection %s", name)

    def list_collections(self) -> list[CollectionConfig]:
        with self._state.cond:
            return [c.cfg for c in self._state.collections.values()]

    def shard_map(self, name: str) -> ShardMap:
        st = self._state
        with st.cond:
            c = st.coll(name)
            joining = leaving = ()
            if c.moves:
                joining = tuple((m.target,) if (m := c.moves.get(b)) and m.phase == "copy" else ()
                                for b in range(len(c.owners)))
                leaving = tuple((m.source,) if (m := c.moves.get(b)) and m.phase == "leaving" else ()
                                for b in range(len(c.owners)))
            return ShardMap(st.epoch, c.cfg, tuple(tuple(o) for o in c.owners),
                            {s: st.info(s) for s in st.shards}, joining, leaving)

    def shard_maps(self) -> dict[str, ShardMap]:
        """Every collection's shard map, all at the current epoch (one call for status and listings, rather than
        one per collection)."""
        with self._state.cond:
            return {name: self.shard_map(name) for name in self._state.collections}

    def assignments(self, shard_id: str) -> list[tuple[CollectionConfig, list[int]]]:
        """What a (re)starting shard must load: each collection with the buckets it owns (not those it was
        copying in: that move is rolled back; not those it was leaving: it has given them away)."""
        with self._state.cond:
            return [(c.cfg, [b for b, own in enumerate(c.owners) if shard_id in own])
                    for c in self._state.collections.values()]

    def bucket_sizes(self, name: str) -> np.ndarray:
        """Items per bucket, as the owners report them (the largest report of any owner)."""
        with self._state.cond:
            c = self._state.coll(name)
            holders = sorted(c.holders())
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
