"""Configuration validation: the sentences people see."""

import pytest

from lookalike.config import CollectionConfig, storage_path
from lookalike.errors import InvalidArgument


def test_storage_uri():
    assert storage_path("./data") == "./data"
    assert storage_path("file:///mnt/lookalike") == "/mnt/lookalike"
    with pytest.raises(ValueError, match="mount"):
        storage_path("s3://bucket/prefix")


def test_collection_defaults_and_errors():
    cfg = CollectionConfig("imgs", 64, "hamming", "Flat").validated()
    assert cfg.index == "BFlat" and cfg.code_size == 8 and not cfg.larger_is_better
    assert CollectionConfig("c", 8, "cosine").validated().larger_is_better
    for bad, words in [(CollectionConfig("", 8), "name"), (CollectionConfig("c", 8, "manhattan"), "metric"),
                       (CollectionConfig("c", 8, buckets=0), "buckets"), (CollectionConfig("c", 8, replication=0),
                                                                          "replication")]:
        with pytest.raises(InvalidArgument, match=words):
            bad.validated()


def test_the_create_path_fills_from_the_encoder_and_builds_the_spec(tmp_path, monkeypatch):
    """What the base config cannot check, the create path (router -> controller) does, with the same sentences:
    the encoder's dim and metric, and whether FAISS builds the spec."""
    from control.local import LocalCluster
    from lookalike import gpu

    monkeypatch.setattr(gpu, "has_cuvs", lambda: False)
    cl = LocalCluster(tmp_path, shards=1, transport="inprocess")
    try:
        cfg = cl.router.create_collection(CollectionConfig("p", 0, encoder="phash"))
        assert (cfg.dim, cfg.metric, cfg.index, cfg.encoder) == (64, "hamming", "BFlat", "phash")
        for bad, words in [(CollectionConfig("e", 0, encoder="nope"), "unknown encoder 'nope'"),
                           (CollectionConfig("e", 32, encoder="phash"), "gives 64-bit hamming vectors.*leave them out"),
                           (CollectionConfig("g", 32, index="HNSW16", gpu_float16=True), "gpu_float16 applies to"),
                           (CollectionConfig("c", 64, index="CAGRA"), "needs FAISS built with cuVS")]:
            with pytest.raises(InvalidArgument, match=words):
                cl.router.create_collection(bad)
        assert [c.name for c in cl.router.list_collections()] == ["p"]
    finally:
        cl.close()
