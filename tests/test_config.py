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
