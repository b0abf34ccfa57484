"""What the ids of a search's results cost a shard and the router: strings against packed bytes.

    python -m bench.answer_ids_bench --rows 1250000

A shard's answer to a batch of 100 queries at k=10 carries 1,000 ids. Before, a shard looked up the rows of the
1,000 labels (a binary search each), made 1,000 Python strings and sent them as a repeated string field; the
router parsed S x 1,000 strings and kept 1,000. Now a shard sorts the labels before the lookup and sends the ids'
bytes back to back with their lengths (``ShardSearchResponse.id_bytes``), and the router decodes only the ids it
keeps. This times both ways on an id table of ``rows`` rows (ids of 7 digits), with the CPU caches emptied before
each batch (a shard's table at 10M vectors is far larger than them): the shard's part (lookup, ids, serialized
answer) and the router's (parse S answers, merge, ids of the kept results). Medians over ``reps`` batches.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from protos import shard_pb2
from lookalike.topk import merge_topk
from router.search import _merge_responses
from shard.idtable import IdTable


def _old_shard(t: IdTable, D: np.ndarray, L: np.ndarray) -> bytes:
    pos = np.searchsorted(t.labels, np.maximum(L.ravel(), 0))
    return shard_pb2.ShardSearchResponse(distances=D.tobytes(), labels=L.tobytes(), ids=t.uids_at(pos),
                                         nq=L.shape[0], k=L.shape[1]).SerializeToString()


def _new_shard(t: IdTable, D: np.ndarray, L: np.ndarray) -> bytes:
    blob, lengths = t.packed_at(t.positions(L.ravel()))
    return shard_pb2.ShardSearchResponse(distances=D.tobytes(), labels=L.tobytes(), id_bytes=blob,
                                         id_lengths=lengths.astype("<u2").tobytes(), nq=L.shape[0],
                                         k=L.shape[1]).SerializeToString()


def _old_merge(responses, nq: int, k: int) -> list[list[str]]:
    Ds = [np.frombuffer(r.distances, dtype="<f4").reshape(nq, k) for r in responses]
    Ls = [np.frombuffer(r.labels, dtype="<i8").reshape(nq, k) for r in responses]
    ids = []
    for r in responses:
        ids.extend(r.ids)
    _, I = merge_topk(np.stack(Ds), np.stack(Ls), False)
    ids_arr = np.array(ids, dtype=object)
    return [ids_arr[I[q][I[q] >= 0]].tolist() for q in range(nq)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.answer_ids_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_250_000, help="rows of the shard's id table (default 1250000)")
    p.add_argument("--shards", type=int, default=8, help="answers the router merges (default 8)")
    p.add_argument("--nq", type=int, default=100, help="queries a batch (default 100)")
    p.add_argument("--k", type=int, default=10, help="results a query (default 10)")
    p.add_argument("--reps", type=int, default=40, help="batches timed (default 40)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    t = IdTable()
    uids = [str(i) for i in rng.choice(10 ** 7, args.rows, replace=False)]
    labels, existing = t.assign(rng.integers(0, 1 << 50, args.rows).astype(np.int64), uids)
    t.put(labels, uids, [None] * args.rows, existing)
    evict = np.ones(32 << 17)  # 32 MiB
    D = np.sort(rng.random((args.nq, args.k), dtype=np.float32), axis=1)

    def batch_labels() -> np.ndarray:
        return t.labels[rng.integers(0, args.rows, args.nq * args.k)].reshape(args.nq, args.k)

    print(f"id table of {args.rows} rows, {args.nq} queries x k={args.k}, {args.shards} answers merged; "
          f"median ms of {args.reps} batches")
    for name, shard, merge in (("strings (before)", _old_shard, _old_merge),
                               ("packed (now)", _new_shard,
                                lambda rs, nq, k: _merge_responses(rs, nq, k, False, False))):
        times = []
        for _ in range(args.reps):
            L = batch_labels()
            evict.sum()
            s = time.perf_counter()
            shard(t, D, L)
            times.append(time.perf_counter() - s)
        raw = [shard(t, D, batch_labels()) for _ in range(args.shards)]
        merges = []
        for _ in range(args.reps):
            s = time.perf_counter()
            merge([shard_pb2.ShardSearchResponse.FromString(x) for x in raw], args.nq, args.k)
            merges.append(time.perf_counter() - s)
        print(f"  {name:17s} shard {np.median(times) * 1e3:.3f} ms   router {np.median(merges) * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
