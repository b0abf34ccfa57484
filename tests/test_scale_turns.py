"""bench/scale_turns.py: the cluster and in-process FAISS searched in turns, so that their ratio is of windows
seconds apart (this machine's speed drifts by up to half within an hour)."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from bench.scale_turns import faiss_setting, fastest, in_turns


def test_rounds_alternate_the_two_sides_and_each_faiss_caller_sets_its_threads():
    events, threads_set = [], []
    xq = np.zeros((300, 4), dtype=np.float32)

    def cluster(q):
        events.append("cluster")

    def faiss_side(q):
        events.append("faiss")

    out = in_turns(cluster, 1, faiss_side, 1, 2, xq, 100, 0.05, 3, rounds=3,
                   set_threads=lambda n: threads_set.append((n, threading.current_thread().name)))
    assert len(out["rounds"]) == 3
    # each round: the cluster's window (a warm-up and 3 requests), then FAISS's (a warm-up and 3 requests)
    sides = [e for i, e in enumerate(events) if i == 0 or events[i - 1] != e]
    assert sides == ["cluster", "faiss"] * 3
    assert out["ratio_min"] <= out["ratio_median"] <= out["ratio_max"]
    assert all(r["ratio"] == pytest.approx(r["cluster_qps"] / r["faiss_qps"]) for r in out["rounds"])
    # this thread before each FAISS window, and each of its 2 caller threads
    assert len(threads_set) == 3 * 3 and {n for n, _ in threads_set} == {1}
    assert len({t for _, t in threads_set}) == 1 + 3 * 2


def test_fastest_is_the_setting_of_the_highest_qps():
    assert fastest({"all cores": {"qps": 10.0}, "1 thread": {"qps": 12.0}, "2 callers x 1 thread": {"qps": 11.0}}) \
        == "1 thread"


def test_a_measurements_setting_is_put_back_threads_callers_and_ivfpq_tables():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    idx = faiss.index_factory(16, "IVF8,PQ4")
    idx.train(x)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(idx))
    ivf.use_precomputed_table = 1
    ivf.precompute_table()
    assert faiss_setting(idx, {"faiss_threads": 1, "concurrency": 1, "precomputed_table": -1}) == (1, 1)
    assert ivf.use_precomputed_table == -1
    assert faiss_setting(idx, {"faiss_threads": 1, "concurrency": 3, "precomputed_table": 1}) == (1, 3)
    assert ivf.use_precomputed_table == 1
    assert faiss_setting(faiss.IndexFlatL2(16), {"faiss_threads": 2, "concurrency": 1, "precomputed_table": None}) \
        == (2, 1)
