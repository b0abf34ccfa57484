"""A collection can take down no more than itself: writes that fail to apply are never logged for replay, and a
collection whose replay fails or kills the process is quarantined while the shard serves the others."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import wait_for

from lookalike.config import CollectionConfig, MovePolicy
from lookalike.errors import FailedPrecondition, Unavailable
from control.local import LocalCluster
from shard.shard import Shard
from shard.cpu_index import VectorIndex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name: str, index: str = "Flat", validate: bool = True) -> CollectionConfig:
    cfg = CollectionConfig(name, 8, "l2", index, buckets=4)
    return cfg.validated() if validate else cfg


def _xb(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def _wait_serving(shard: Shard, name: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            sc = shard.collection(name)
            sc._check_live()
            return sc
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_write_that_fails_to_apply_is_taken_out_of_the_log_and_the_collection_reloads(tmp_path, monkeypatch):
    shard = Shard("shard-0", tmp_path)
    shard.open_collection(_cfg("a"), range(4))
    sc = shard.collection("a")
    sc.upsert([f"v{i}" for i in range(5)], _xb(5), [None] * 5)
    real_add = VectorIndex.add

    def failing_add(self, labels, x):
        raise RuntimeError("add does not make sense with this index")

    monkeypatch.setattr(VectorIndex, "add", failing_add)
    with pytest.raises(FailedPrecondition, match="nothing of it was stored"):
        sc.upsert(["bad-1", "bad-2"], _xb(2, 1), [None] * 2)
    monkeypatch.setattr(VectorIndex, "add", real_add)
    sc = _wait_serving(shard, "a")
    assert len(sc.table) == 5
    sc.upsert(["w"], _xb(1, 2), [None])  # writes go on, after the retracted one
    shard.close()
    again = Shard("shard-0", tmp_path)
    assert again.open_collection(_cfg("a"), range(4)) == 6  # the failed write is not replayed
    assert not again.quarantined and not again.collection("a").store.damage
    found, _, _ = again.collection("a").get(["bad-1", "bad-2", "v0", "w"], False)
    assert found == ["v0", "w"]
    again.close()


def test_a_training_failure_keeps_the_exact_buffer_and_is_reported_then_retried(tmp_path, monkeypatch):
    def failing_train(self, x, gpu=None):
        raise RuntimeError("Error in Clustering::train: not enough points")

    monkeypatch.setattr(VectorIndex, "train_template", failing_train)
    cl = LocalCluster(tmp_path / "data", shards=2, transport="inprocess",
                      policy=MovePolicy(grace_s=0.3, train_check_s=0.05, train_retry_s=0.5))
    try:
        cl.router.create_collection(_cfg("ivf", "IVF4,Flat"))
        n = 1010
        xb = _xb(n)
        assert cl.router.upsert("ivf", [f"v{i}" for i in range(n)], xb) == n  # acknowledged: training is apart
        assert wait_for(lambda: "training v1 failed" in cl.router.training_status("ivf")["message"], 10)
        st = cl.router.training_status("ivf")
        assert st["state"] == "untrained" and "not enough points" in st["message"]
        assert cl.router.search("ivf", xb[:3], k=1).ids == [["v0"], ["v1"], ["v2"]]  # exact meanwhile
        monkeypatch.undo()  # FAISS takes the data now: the next try trains
        assert cl.controller._wait_trained("ivf", 10)
        assert cl.router.training_status("ivf")["version"] == 1
    finally:
        cl.close()
    again = Shard("shard-0", tmp_path / "data")
    assert again.open_collection(cl.controller.shard_map("ivf").collection, range(4)) > 0
    again.close()


def test_a_stored_spec_the_grammar_refuses_is_quarantined_not_loaded(tmp_path):
    shard = Shard("shard-0", tmp_path)
    shard.open_collection(_cfg("good"), range(4))
    shard.collection("good").upsert(["g"], _xb(1), [None])
    assert shard.open_collection(_cfg("bad", "HNSW0", validate=False), range(4)) == 0
    assert "not supported" in shard.quarantined["bad"]
    with pytest.raises(FailedPrecondition, match="quarantined"):
        shard.collection("bad")
    stats = {c["name"]: c for c in shard.stats()["collections"]}
    assert stats["bad"]["damaged"][0].startswith("QUARANTINED")
    assert stats["good"]["vectors"] == 1
    shard.drop_collection("bad")  # the operator's way out: dropping it removes the quarantine
    assert "bad" not in shard.quarantined and not (tmp_path / "shards" / "shard-0" / "bad").exists()
    shard.close()


_REPLAY = textwrap.dedent("""
    import os, sys
    import numpy as np
    from lookalike.config import CollectionConfig, MovePolicy
    from shard.shard import Shard
    from shard.cpu_index import VectorIndex

    root, mode = sys.argv[1], sys.argv[2]
    cfgs = [CollectionConfig(n, 8, "l2", "Flat", buckets=4).validated() for n in ("good", "bad")]
    shard = Shard("shard-0", root)
    if mode == "write":
        for cfg in cfgs:
            shard.open_collection(cfg, range(4))
            x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
            shard.collection(cfg.name).upsert([f"{cfg.name}{i}" for i in range(50)], x, [None] * 50)
        os._exit(0)  # as a kill would: no index checkpoint, so the next start replays the log
    real_add = VectorIndex.add
    def add(self, labels, x):  # what a FAISS assertion does to the process
        if self.coll.name == "bad":
            os.abort()
        return real_add(self, labels, x)
    VectorIndex.add = add
    for cfg in cfgs:
        shard.open_collection(cfg, range(4))
    print("good", len(shard.collection("good").table), "quarantined", sorted(shard.quarantined), flush=True)
    print(shard.quarantined.get("bad", ""), flush=True)
""")


def test_a_collection_whose_replay_kills_the_process_is_quarantined_while_the_others_serve(tmp_path):
    def run(mode):
        return subprocess.run([sys.executable, "-c", _REPLAY, str(tmp_path), mode], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)

    assert run("write").returncode == 0
    first, second = run("replay"), run("replay")  # each start dies replaying "bad", as a crash-looping shard would
    assert first.returncode < 0 and second.returncode < 0, (first.stderr[-500:], second.stderr[-500:])
    third = run("replay")
    assert third.returncode == 0, third.stderr[-2000:]
    lines = third.stdout.splitlines()
    assert lines[0] == "good 50 quarantined ['bad']"
    assert "died 2 times in a row while replaying it" in lines[1] and "drop the collection" in lines[1]
    fourth = run("replay")  # stays quarantined, without trying the replay again
    assert fourth.returncode == 0 and fourth.stdout.splitlines()[0] == "good 50 quarantined ['bad']"


def test_a_collection_opened_twice_at_once_opens_one_store_and_a_drop_waits_for_the_open(tmp_path, monkeypatch):
    """Two opens of one collection at once (a create and a bucket move, say) open its directory once: a second
    store would check the files under the first one's appends and could cut off one in flight (store_check). A
    drop meanwhile waits for the open, then deletes what it opened."""
    import shard.shard as shard_mod
    from shard.collection import ShardCollection

    shard = Shard("s", tmp_path)
    cfg = _cfg("c")
    shard.open_collection(cfg, range(4))
    shard.collection("c").upsert([f"i{i}" for i in range(50)], _xb(50), [None] * 50)
    shard.close()
    stores, real_store, real_load = [], shard_mod.CollectionStore, ShardCollection.load

    def counted_store(*args, **kwargs):
        stores.append(args[0])
        return real_store(*args, **kwargs)

    def slow_load(self, *args):
        time.sleep(0.3)
        return real_load(self, *args)

    monkeypatch.setattr(shard_mod, "CollectionStore", counted_store)
    monkeypatch.setattr(ShardCollection, "load", slow_load)
    got, errors = [], []

    def opening(shard):
        try:
            got.append(shard.open_collection(cfg, range(4)))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    shard = Shard("s", tmp_path)
    threads = [threading.Thread(target=opening, args=(shard,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [50, 50] and len(stores) == 1
    shard.close()

    shard = Shard("s", tmp_path)
    t = threading.Thread(target=opening, args=(shard,))
    t.start()
    time.sleep(0.1)
    shard.drop_collection("c")
    t.join()
    assert not errors and got == [50, 50, 50]
    assert not (tmp_path / "shards" / "s" / "c").exists()
    with pytest.raises(Exception, match="does not exist"):
        shard.collection("c")


def test_shards_of_one_process_replay_one_at_a_time_so_a_death_marks_only_the_collection_it_killed(tmp_path,
                                                                                                   monkeypatch):
    """Shards sharing a process (shard.host) load at once. Were their replays marked REPLAYING together, a process
    death during them would count against every one: each would distrust its checkpoint at the next start, and two
    deaths would quarantine them all. One replay runs at a time in a process."""
    from shard.collection import ShardCollection

    shards = [Shard(f"s{i}", tmp_path) for i in range(3)]
    for i, shard in enumerate(shards):
        shard.open_collection(_cfg("c"), range(4))
        shard.collection("c").upsert([f"i{i}-{j}" for j in range(20)], _xb(20, i), [None] * 20)
        shard.close()
    shards = [Shard(f"s{i}", tmp_path) for i in range(3)]
    seen, real_load = [], ShardCollection.load

    def watched_load(self, *args):
        for _ in range(5):
            seen.append(len(list(tmp_path.glob("shards/*/c/REPLAYING"))))
            time.sleep(0.05)
        return real_load(self, *args)

    monkeypatch.setattr(ShardCollection, "load", watched_load)
    threads = [threading.Thread(target=shard.open_collection, args=(_cfg("c"), range(4))) for shard in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and max(seen) == 1, seen
    assert [len(s.collection("c").table) for s in shards] == [20, 20, 20]
    assert not list(tmp_path.glob("shards/*/c/REPLAYING"))


def test_a_collection_with_nothing_stored_opens_without_waiting_for_another_replay(tmp_path, monkeypatch):
    """One replay at a time in a process: a shard given its first bucket of a collection (a bucket move's join, a
    new collection) waited behind another collection's whole replay, though it has nothing to replay."""
    from shard.collection import ShardCollection

    old = Shard("s0", tmp_path)
    old.open_collection(_cfg("c"), range(4))
    old.collection("c").upsert([f"i{j}" for j in range(20)], _xb(20, 0), [None] * 20)
    old.close()
    old, new = Shard("s0", tmp_path), Shard("s1", tmp_path)
    replaying, release, real_load = threading.Event(), threading.Event(), ShardCollection.load

    def slow_load(self, *args):
        if self.coll.name == "c" and len(self.buckets) == 4:
            replaying.set()
            release.wait(30)
        return real_load(self, *args)

    monkeypatch.setattr(ShardCollection, "load", slow_load)
    t = threading.Thread(target=old.open_collection, args=(_cfg("c"), range(4)))
    t.start()
    try:
        assert replaying.wait(10)
        opened = threading.Thread(target=new.open_collection, args=(_cfg("c"), range(2)))
        opened.start()
        opened.join(10)
        assert not opened.is_alive(), "waited for the other shard's replay"
        assert len(new.collection("c").table) == 0 and not (tmp_path / "shards/s1/c/REPLAYING").exists()
    finally:
        release.set()
        t.join()
    assert len(old.collection("c").table) == 20
