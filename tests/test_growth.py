"""Growth without downtime: bucket moves under load, the pieces of the protocol, capacity, automatic growth."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import MixedLoad
from conftest import assert_holds_exactly as _exact_equal
from lookalike.config import CollectionConfig, MovePolicy
from lookalike.errors import ResourceExhausted, StaleShardMap
from lookalike.ids import buckets_of
from control.local import LocalCluster
from lookalike.shardmap import ShardInfo, ShardMap, order_by_node
from shard.bucket_reader import read_buckets
from shard.records import RESET, UPSERT
from shard.store import CollectionStore


def test_grow_from_1_to_4_shards_under_load(tmp_path):
    cl = LocalCluster(tmp_path, shards=1, policy=MovePolicy(grace_s=0.3, move_buckets=8))
    try:
        router = cl.router
        router.create_collection(CollectionConfig("grow", dim=16, buckets=64))
        load = MixedLoad(router, "grow", 16)
        load.preload(3000)
        with load:
            time.sleep(0.3)
            queued = cl.controller.rebalance("grow", add_shards=3)
            assert queued > 0
            assert cl.controller.wait_moves(timeout=120)
            time.sleep(0.3)
        assert not load.errors, load.errors[:5]
        assert load.searches > 20 and load.writes > 20
        assert min(load.coverages) == 1.0
        smap = cl.controller.shard_map("grow")
        per_shard = {s: sum(s in own for own in smap.owners) for s in smap.shard_ids}
        assert sorted(per_shard) == ["shard-0", "shard-1", "shard-2", "shard-3"]
        # Even by items (what memory follows), not by bucket count.
        items = {sid: sum(shard.bucket_counts("grow")) for sid, shard in cl.placer.shards.items()}
        assert max(items.values()) <= 1.25 * min(items.values()), items
        done, failed = cl.controller.move_counts()
        assert done == queued and failed == 0
        # The sources gave the buckets away: each shard holds exactly what it owns.
        for sid, shard in cl.placer.shards.items():
            counts = np.array(shard.bucket_counts("grow"))
            assert not counts[~smap.served_by(sid)].any()
        _exact_equal(router, "grow", load.acked, 16)
    finally:
        cl.close()
    # Everything is still there after a restart of the whole cluster on the same storage.
    cl = LocalCluster(tmp_path, shards=1)
    try:
        assert len(cl.controller.shards()) == 4
        _exact_equal(cl.router, "grow", load.acked, 16)
    finally:
        cl.close()


def test_replicas_keep_full_coverage_when_a_shard_stops(tmp_path):
    cl = LocalCluster(tmp_path, shards=3)
    try:
        router = cl.router
        router.create_collection(CollectionConfig("rep", dim=8, buckets=30, replication=2))
        smap = cl.controller.shard_map("rep")
        assert all(len(set(own)) == 2 for own in smap.owners)
        load = MixedLoad(router, "rep", 8, searchers=1)
        load.preload(1000)
        cl.placer.stop_shard("shard-1")
        # Writes need every owner: they fail while an owner is down (nothing is acknowledged without it)...
        retry_ids, retry_x = [f"x{i}" for i in range(20)], np.ones((20, 8), np.float32)
        with pytest.raises(Exception):
            router.upsert("rep", retry_ids, retry_x, timeout=1)
        # ...while every search still covers all buckets, from the other replica.
        xq = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
        for _ in range(5):
            assert router.search("rep", xq, 5).coverage == 1.0
        cl.placer.ensure_shard("shard-1")
        router.upsert("rep", retry_ids, retry_x)  # the client's retry of the write that was not acknowledged
        load.acked.update(zip(retry_ids, retry_x))
        load.sent.update(retry_ids)
        with load:
            time.sleep(1.0)
        assert not load.errors, load.errors[:5]
        _exact_equal(router, "rep", load.acked, 8)
    finally:
        cl.close()


def test_cover_asks_one_owner_per_bucket_and_fails_over():
    cfg = CollectionConfig("c", dim=4, buckets=8, replication=2)
    owners = tuple((f"s{b % 4}", f"s{(b + 1) % 4}") for b in range(8))
    smap = ShardMap(1, cfg, owners, {f"s{i}": ShardInfo(f"s{i}") for i in range(4)})
    assert sorted(smap.cover(rotation=0)) == ["s0", "s2"]
    assert sorted(smap.cover(rotation=1)) == ["s1", "s3"]
    # s0 down: its buckets come from the others
    rest = smap.cover(exclude={"s0"})
    covered = np.zeros(8, bool)
    for s in rest:
        covered |= smap.served_by(s)
    assert covered.all() and "s0" not in rest
    # a joining shard gets writes but is not searched
    joining = tuple(("s3",) if b == 0 else () for b in range(8))
    smap2 = ShardMap(2, cfg, owners, smap.shards, joining=joining)
    assert smap2.write_mask[0, smap2.shard_ids.index("s3")]
    assert not smap2.served_by("s3")[0]
    assert order_by_node(["a", "b", "c", "d"], {"a": "n1", "b": "n1", "c": "n2", "d": "n2"}) == ["a", "c", "b", "d"]


def test_reset_records_and_reading_another_shards_store(tmp_path):
    store = CollectionStore(tmp_path / "s", n_buckets=4, segment_bytes=1 << 12)
    ids = [f"id{i}" for i in range(200)]
    x = np.arange(200 * 4, dtype=np.float32).reshape(200, 4)
    store.append(UPSERT, ids, x, [None] * 200)
    store.compact()
    b = buckets_of(ids, 4)
    store.reset([1])
    store.append(UPSERT, ["late"], np.ones((1, 4), np.float32), [None])
    expect = {u for u, bb in zip(ids, b) if bb != 1} | {"late"}  # "late" came after the RESET
    # replay honours the RESET
    live: dict[str, int] = {}
    for batch in store.load():
        if batch.op == RESET:
            for u in [u for u in live if live[u] in batch.buckets]:
                del live[u]
        else:
            live.update(zip(batch.ids, buckets_of(batch.ids, 4).tolist()))
    assert set(live) == expect
    # another shard reading it sees the same live items, also across a compaction
    got = {u for batch in read_buckets(store.path, 4, range(4)) for u in batch.ids}
    assert got == expect
    store.compact()
    got = {u for batch in read_buckets(store.path, 4, range(4)) for u in batch.ids}
    assert got == expect
    assert not any(u for batch in read_buckets(store.path, 4, [1]) for u in batch.ids if u != "late")
    store.close()


def test_read_buckets_while_the_owner_writes_and_compacts(tmp_path):
    store = CollectionStore(tmp_path / "s", n_buckets=2, segment_bytes=1 << 14)
    done = threading.Event()
    written: list[str] = []

    def writer():
        i = 0
        while not done.is_set():
            batch = [f"w{i + j}" for j in range(20)]
            store.append(UPSERT, batch, np.zeros((20, 8), np.float32), [None] * 20)
            written.extend(batch)
            i += 20
            if i % 400 == 0:
                store.compact()

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(20):
            before = set(written)
            got = {u for batch in read_buckets(store.path, 2, [0, 1]) for u in batch.ids}
            assert before <= got
    finally:
        done.set()
        t.join()
        store.close()


def test_stale_epochs_are_refused_after_a_bucket_leaves(tmp_path):
    cl = LocalCluster(tmp_path, shards=2)
    try:
        cl.router.create_collection(CollectionConfig("f", dim=4, buckets=4))
        shard = cl.placer.shards["shard-0"]
        sc = shard.collection("f")
        owned = sorted(sc.buckets)
        sc.drop_buckets(owned[:1], epoch=1000)
        with pytest.raises(StaleShardMap):
            sc.search(np.zeros((1, 4), np.float32), 1, epoch=999)
        sc.search(np.zeros((1, 4), np.float32), 1, epoch=1000)
        assert owned[0] not in sc.buckets
    finally:
        cl.close()


def test_a_full_shard_refuses_writes_and_growth_adds_a_shard(tmp_path):
    cl = LocalCluster(tmp_path, shards=1, capacity_bytes=100 << 20,
                      policy=MovePolicy(grace_s=0.1, high_water=0.5, max_shards=3))
    try:
        # In this process the resident size is the test's as well: pretend the shard uses 90 MiB plus its index.
        shard = cl.placer.shards["shard-0"]
        shard.memory_bytes = lambda: (90 << 20) + sum(c["index_bytes"] for c in shard.stats_collections())
        router = cl.router
        router.create_collection(CollectionConfig("cap", dim=256, buckets=16))
        x = np.zeros((10000, 256), np.float32)  # 10 MB of vectors: over the 10 MiB left
        with pytest.raises(ResourceExhausted, match="is full"):
            router.upsert("cap", [f"a{i}" for i in range(len(x))], x)
        router.upsert("cap", ["small"], x[:1])  # the shard keeps serving and takes what fits
        assert router.count("cap") == 1
        # Past the high-water mark: a check adds a shard and rebalances.
        queued = cl.controller.check_growth()
        assert queued > 0 and len(cl.controller.shards()) == 2
        assert cl.controller.wait_moves(timeout=60)
        assert router.get("cap", ["small"])[0] == ["small"]
    finally:
        cl.close()


def test_moves_run_a_few_at_a_time_and_never_two_onto_one_node(tmp_path):
    from control.controller import Controller
    from control.state import Move

    class Placer:  # accepts everything; the moves are only scheduled here, not run
        def __getattr__(self, name):
            return lambda *args: None

    ctl = Controller(tmp_path, 4, Placer(), MovePolicy(max_moves=2))
    for sid, node in zip(["shard-0", "shard-1", "shard-2", "shard-3"], ["a", "a", "b", "b"]):
        ctl.register_shard(sid, "127.0.0.1:1", node)
    ctl.create_collection(CollectionConfig("m", dim=4, buckets=8))
    owners = ctl.shard_map("m").owners
    coll = ctl.state.collections["m"]
    assert [owners[b][0] for b in range(4)] == ["shard-0", "shard-2", "shard-1", "shard-3"]  # nodes a, b, a, b
    to_b1 = Move("m", [0], "shard-0", "shard-2")
    to_b2 = Move("m", [2], "shard-1", "shard-3")
    to_a = Move("m", [1], "shard-2", "shard-1")
    for m in (to_b1, to_b2, to_a):
        coll.moves[m.buckets[0]] = m
    with ctl.state.cond:
        first = ctl.mover.next_move()
        ctl.mover.running.add(first.key)
        second = ctl.mover.next_move()
        ctl.mover.running.add(second.key)
        assert {first.target, second.target} in ({"shard-2", "shard-1"}, {"shard-3", "shard-1"})  # one per node
        assert ctl.mover.next_move() is None  # two copying: the third waits
    # The map shows a copying move's target as joining (writes) but not as an owner (searches).
    with ctl.state.cond:
        first.phase = "copy"
    smap = ctl.shard_map("m")
    b = first.buckets[0]
    assert first.target in smap.joining[b] and first.target not in smap.owners[b]


def test_a_failed_copy_rolls_back_and_is_retried(tmp_path):
    cl = LocalCluster(tmp_path, shards=1, policy=MovePolicy(grace_s=0.1, move_buckets=4))
    try:
        router = cl.router
        router.create_collection(CollectionConfig("rb", dim=8, buckets=8))
        load = MixedLoad(router, "rb", 8, searchers=1)
        load.preload(1000)
        real_copy, calls = cl.placer.copy_in, []

        def flaky_copy(*args):
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("target lost during the copy")
            return real_copy(*args)

        cl.placer.copy_in = flaky_copy
        with load:
            queued = cl.controller.rebalance("rb", add_shards=1)
            assert cl.controller.wait_moves(timeout=60)
        done, failed = cl.controller.move_counts()
        assert failed == 1 and done == queued and len(calls) == queued + 1
        assert not load.errors, load.errors[:5]
        assert {s for own in cl.controller.shard_map("rb").owners for s in own} == {"shard-0", "shard-1"}
        _exact_equal(router, "rb", load.acked, 8)
    finally:
        cl.close()


def test_a_restarted_controller_rolls_back_copies_and_finishes_takeovers(tmp_path):
    import json

    from control.controller import Controller

    class Placer:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            def call(*args):
                self.calls.append((name, *args))
                return 0
            return call

    first = Controller(tmp_path, 2, Placer())
    first.create_collection(CollectionConfig("r", dim=4, buckets=4))
    # A state as a controller killed in the middle of two moves leaves it.
    state = json.loads((tmp_path / "cluster.json").read_text())
    owners = state["collections"]["r"]["owners"]  # [[shard-0], [shard-1], [shard-0], [shard-1]]
    owners[1] = ["shard-0"]  # bucket 1 was taken over by shard-0 (leaving shard-1)
    state["collections"]["r"]["moves"] = [
        {"collection": "r", "buckets": [0], "source": "shard-0", "target": "shard-1", "phase": "copy"},
        {"collection": "r", "buckets": [1], "source": "shard-1", "target": "shard-0", "phase": "leaving",
         "owned_epoch": state["epoch"]}]
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    placer = Placer()
    ctl = Controller(tmp_path, 2, placer, MovePolicy(grace_s=0.1))
    for sid in ("shard-0", "shard-1"):
        ctl.register_shard(sid, "127.0.0.1:1", sid)
    ctl.start()
    try:
        assert ctl.wait_moves(timeout=30)
        names = [c[:4] for c in placer.calls if c[0] != "ensure_shard"]
        # the half-done copy is dropped from its target before anything else, then run again from the start
        assert names[0] == ("drop_buckets", "shard-1", "r", [0])
        assert [n[:2] for n in names].index(("join_buckets", "shard-1")) > 0
        # the takeover is finished: the source drops the bucket
        assert ("drop_buckets", "shard-1", "r", [1]) in names
        assert ctl.shard_map("r").owners == (("shard-1",), ("shard-0",), ("shard-0",), ("shard-1",))
    finally:
        ctl.stop()
