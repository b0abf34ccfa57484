"""bench/peers_bench.py at a tiny size: lookalike (client -> router -> shards on the session's Ray) and in-process
FAISS on the same data, and milvus-lite (a child process) where an interpreter with pymilvus + milvus-lite exists."""

from __future__ import annotations

import pytest

from bench import peers_bench

DIM = 16
TINY = ["--n", "3000", "--dims", str(DIM), "--queries", "100", "--calib-queries", "100", "--seconds", "0.2",
        "--recall-seconds", "10", "--shards", "2", "--quiet-wait", "0"]


def _args(systems: str):
    return peers_bench.build_parser().parse_args([*TINY, "--systems", systems])


def _check(out: dict, systems: list[str]) -> None:
    got = {(r["system"], r["index"]): r for r in out["results"]}
    assert set(got) == {(s, i) for s in systems for i in ("Flat", "IVF", "HNSW")}, out["notes"]
    for (system, index), r in got.items():
        assert [row["batch"] for row in r["rows"]] == [1, 100]
        assert all(row["qps"] > 0 and row["requests"] >= 1 for row in r["rows"]), (system, index, r["rows"])
        assert r["recall_queries"] == 100
        if index == "Flat":
            assert r["recall"] == 1.0, (system, r["recall"])
        else:
            assert r["target_reached"] and r["recall"] >= 0.9, (system, index, r["calibration"], r["recall"])
    out["summary"] = peers_bench.summarize(out)
    text = peers_bench.markdown(out)
    assert "### Ratios (QPS)" in text and "| 16 | HNSW | 100 |" in text


def test_lookalike_and_inprocess_faiss(ray_cluster_factory):
    cluster = ray_cluster_factory(shards=2)
    args = _args("lookalike,faiss")
    out = peers_bench.new_report(args)
    peers_bench.run_dim(args, DIM, out, client=cluster.client)
    _check(out, ["lookalike", "faiss"])
    ratios = [r for r in out["summary"]["ratios"] if r["batch"] == 1]
    assert all(r["lookalike_over_faiss"] > 0 and r["lookalike_over_milvus"] is None for r in ratios)
    assert not cluster.client.list_collections()  # every benchmark collection was dropped


def test_milvus_lite_worker():
    python, why = peers_bench.find_milvus_python()
    if python is None:
        pytest.skip(why)
    args = _args("milvus")
    out = peers_bench.new_report(args)
    peers_bench.run_dim(args, DIM, out, milvus_python=python)
    _check(out, ["milvus"])
    used = {r["index"]: r["used"] for r in out["results"]}
    assert used["Flat"].startswith("FLAT (NumPy brute force)")
    assert used["IVF"].startswith("IVF_FLAT (FAISS IndexIVFFlat)")
    # the build parameters reached milvus-lite (pymilvus 3.0.2 and milvus-lite 3.2.2 disagree on how to send them)
    assert used["HNSW"].startswith("HNSW (FAISS IndexHNSWFlat) M=32 efConstruction=40"), used["HNSW"]
