"""A load test's inputs: the queries (given, rows of the data plus noise, or stored vectors fetched with Get), the
mean and deviation of the vectors it writes, and the check that the data's ids are what the collection stores
(else recall is not measured).

May use: the base package (lookalike: the client) and bench.loadtest.config.
"""

from __future__ import annotations

import numpy as np

from bench.loadtest.config import LoadConfig
from lookalike.client import Client


def _noisy(rows: np.ndarray, noise: float, rng) -> np.ndarray:
    if rows.dtype == np.uint8:  # hamming codes: flip each bit with probability `noise`
        flips = np.packbits(rng.random((len(rows), rows.shape[1] * 8)) < noise, axis=1)
        return np.bitwise_xor(rows, flips)
    std = rows.std(axis=0, keepdims=True) if len(rows) > 1 else np.ones((1, rows.shape[1]), np.float32)
    return (rows + noise * std * rng.standard_normal(rows.shape)).astype(np.float32)


def prepare(cfg: LoadConfig, queries: np.ndarray | None = None, data: np.ndarray | None = None,
            n_queries: int = 10_000, noise: float = 0.05, fetch=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, write_mean, write_std). ``fetch(n)`` returns n stored vectors when neither array is given."""
    rng = np.random.default_rng([cfg.seed, 99])
    if queries is None:
        base = data
        if base is None:
            if fetch is None:
                raise ValueError("give queries or data")
            base = fetch(n_queries)
        rows = base[rng.integers(0, len(base), min(n_queries, max(len(base), 1)))]
        queries = _noisy(rows, noise, rng)
    src = data if data is not None else queries
    sample = src[rng.integers(0, len(src), min(len(src), 100_000))].astype(np.float32)
    return np.ascontiguousarray(queries), sample.mean(axis=0), sample.std(axis=0) + 1e-6


def fetch_stored(target: str, collection: str, n: int, seed: int, conn: dict | None = None) -> np.ndarray:
    """n stored vectors of a collection loaded with row-number ids (``lookalike upsert`` without --ids); ``conn``:
    the Client's tls and token."""

    with Client(target, **(conn or {})) as client:
        count = client.describe_collection(collection).count
        if not count:
            raise ValueError(f"collection {collection!r} is empty: load it first, or give --queries")
        rng = np.random.default_rng(seed)
        want = rng.choice(count, size=min(n, count), replace=False)
        got = []
        for i in range(0, len(want), 1000):
            _, vecs, _ = client.get(collection, [str(j) for j in want[i:i + 1000]], include_vectors=True)
            if vecs is not None and len(vecs):
                got.append(vecs)
        if not got:
            raise ValueError(f"no stored vector of {collection!r} has a row-number id (0..{count - 1}): "
                             "give --queries FILE.npy or --data FILE.npy")
        return np.concatenate(got)


def recall_ids_problem(client, collection: str, rows: int, data_ids: list[str] | None = None,
                       ids_file: str | None = None, seed: int = 0, sample: int = 8) -> str | None:
    """Why recall@k against ``rows`` vectors of --data cannot be measured, or None when it can: recall compares the
    ids the cluster returns with the ids of the exact neighbours among those rows, which are ``data_ids`` or, without
    them, the row numbers. A few of those ids (``sample``) are asked for with Get; any missing means the collection
    holds the vectors under other ids (e.g. loaded with ``lookalike upsert --ids``), and recall would read 0."""
    if rows == 0:
        return "--data holds no vectors: recall is not measured"
    rng = np.random.default_rng([seed, 7])
    picked = rng.choice(rows, size=min(sample, rows), replace=False)
    want = [data_ids[i] if data_ids is not None else str(i) for i in picked.tolist()]
    found = set(client.get(collection, want, include_vectors=False)[0])
    missing = [u for u in want if u not in found]
    if not missing:
        return None
    if data_ids is None:
        return (f"collection {collection!r} holds no item under row numbers of --data (ids {', '.join(missing[:3])} "
                f"are not stored): recall needs --ids FILE, the ids the vectors were loaded with; recall is not "
                "measured")
    return (f"{len(missing)} of {len(want)} ids of --ids {ids_file} checked are not stored in collection "
            f"{collection!r} (e.g. {missing[0]!r}): give the ids file the vectors of --data were loaded with; recall "
            "is not measured")
