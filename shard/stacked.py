"""A search of several shards of one process answered once: the lists they share searched once
(:func:`search_lists_shared`: shard.list_groups), their IVF-PQ lists searched as one index (:func:`search_as_one`),
or each shard's index in turn (:func:`search_one_by_one`).

Shards of a collection hold one trained index (shard.trained), so their list ``l`` is the same list, split over
them. Searched one by one, each shard builds the distance table of every list a query probes (nlist x M x 256
floats, the residual of the query to the list's centroid against the PQ codebooks): S shards, S tables. Searched
as one index (``HStackInvertedLists`` over their lists), each table is built once. Measured in-process at 5M x 128,
IVF4096,PQ32, nprobe 12, batch 100 (docs/BENCHMARKS.md, "Shards sharing one process"): 8 parts one by one 1.99x
one index's CPU, as one view 1.27x (the view copies each probed list's codes out of the parts as it reads them).
For IVF-Flat the copy costs more than the tables it saves, so those shards are searched one by one.

Taken only when it gives what the shards one by one would: no filter, the router's lists, every shard a CPU
IVF-PQ of the same trained version without precomputed tables (shard.specs.drop_precomputed_tables: they sum
their terms in another order) and no bucket held by two of them (a move between them); otherwise, or when a shard
cannot answer, the caller searches them one by one (each failure is then that shard's own).

Other searches without a filter are searched shard by shard under all their read locks, and answered once: the
queries decoded and checked once, the top k merged, and the ids packed for the merged slots only. Each shard's own
answer (shard.server ``search_parts``) decodes the queries and packs the ids of all its k results of every query,
and S of them made S answers for one merged one: at 10M on 8 shards about 0.4 ms of id packing a shard a batch of
100, and as much again of the rest of a shard's call.

Uses the shard's index (shard.cpu_index ``search_stacked``), its servicer's answer (shard.server) and the base
package.
"""

from __future__ import annotations

import contextlib

import numpy as np

from lookalike.config import check_answer_size, check_search_params
from lookalike.errors import LookalikeError
from lookalike.ids import bucket_of_labels
from lookalike.topk import merge_topk
from lookalike.wire import check_k, vectors_from_proto
from shard.cpu_index import search_shared, search_stacked
from shard.server import Answer, ShardServicer, pick_slots


def search_lists_shared(parts: list[tuple[str, ShardServicer]], request) -> Answer | None:
    """The merged top k of ``parts`` (shard id, servicer) for a ShardSearchRequest, when their indexes' entries
    are all those of one group of shared lists (shard.list_groups): one search of the lists; None otherwise."""
    coarse = _coarse_of(request)
    if coarse is False or not parts:
        return None
    try:  # a look at the first, before the queries are decoded: most searches of other indexes end here
        if getattr(parts[0][1].collection_of(request.collection).index, "_member", None) is None:
            return None
    except LookalikeError:
        return None
    return _as_one(parts, request, lambda indexes, xq: search_shared(indexes, xq, request.k, request.params.nprobe,
                                                                      coarse))


def search_as_one(parts: list[tuple[str, ShardServicer]], request) -> Answer | None:
    """The merged top k of ``parts`` (shard id, servicer) for a ShardSearchRequest, their IVF-PQ lists searched as
    one index; None when they cannot be (see the module docstring)."""
    coarse = _coarse_of(request)
    if not coarse:
        return None
    return _as_one(parts, request, lambda indexes, xq: search_stacked(indexes, xq, request.k, *coarse))


def _as_one(parts: list[tuple[str, ShardServicer]], request, search) -> Answer | None:
    """The answer of ``search`` (indexes, queries -> (D, L) of them all, or None) over ``parts``."""
    if len(parts) < 2 or request.HasField("filter"):
        return None
    with contextlib.ExitStack() as held:
        try:
            scs, owned, xq = _checked(held, parts, request)
            found = search([sc.index for sc in scs], xq)
        except (LookalikeError, _Declined):  # each shard's own search says what is wrong, as its own failure
            return None
        if found is None:
            return None
        D, L = found
        coll = scs[0].coll
        owner = np.full(coll.buckets, -1, dtype=np.int64)
        for j in range(len(scs)):
            owner[owned[j]] = j
        of = np.where(L >= 0, owner[bucket_of_labels(np.maximum(L, 0))], -1)
        return _answer(scs, D, L, of, request.include_payloads, coll.larger_is_better)


def search_one_by_one(parts: list[tuple[str, ShardServicer]], request) -> Answer | None:
    """The merged top k of ``parts`` for a ShardSearchRequest without a filter, each shard's index searched in turn
    (as its own Search would: the same ``VectorIndex.search``) and the answer made once: the queries decoded and
    checked once, not once a shard, and the ids packed for the merged slots only, not for every shard's k of every
    query. None when a shard cannot be searched so (the caller then searches them one by one, each failure that
    shard's own)."""
    coarse = _coarse_of(request)
    if len(parts) < 2 or request.HasField("filter") or coarse is False:
        return None
    with contextlib.ExitStack() as held:
        try:
            scs, _owned, xq = _checked(held, parts, request)
            Ds, Ls, checked = [], [], {}
            for sc in scs:
                lists = None
                if coarse is not None:  # checked once a trained version: its shards share its lists and nlist
                    v = sc.index.trained_version
                    if v not in checked:
                        checked[v] = sc.index.check_coarse(coarse[0], len(xq), *coarse[1:])
                    lists = checked[v]
                D, L = sc.index.search(xq, request.k, request.params.nprobe, request.params.ef_search, lists)
                Ds.append(D)
                Ls.append(L)
        except (LookalikeError, _Declined):
            return None
        lib = scs[0].coll.larger_is_better
        D, L, src = merge_parts(np.stack(Ds), np.stack(Ls), lib)
        of = np.where(src >= 0, src // L.size, -1).reshape(L.shape)
        return _answer(scs, D, L, of, request.include_payloads, lib)


def merge_parts(D: np.ndarray, L: np.ndarray, larger_is_better: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One top k of S shards' (D, L), shapes (S, nq, k), merged as the router merges (lookalike.topk): (D, labels)
    shape (nq, k), and each merged slot's place in the flattened (S, nq, k) inputs (-1: none), flat."""
    D, I = merge_topk(D, L, larger_is_better)
    src = I.ravel()
    return D, np.where(src >= 0, L.reshape(-1)[np.maximum(src, 0)], -1).reshape(I.shape), src


class _Declined(Exception):
    """Shards that one answer cannot serve (a bucket on two of them): the caller asks each on its own."""


def _coarse_of(request):
    """(trained version, nprobe, lists, distances) of the router's lists in ``request``; None without them; False
    when their bytes are not whole int64s and float32s (each shard's own search says so)."""
    if not request.HasField("coarse"):
        return None
    c = request.coarse
    if len(c.lists) % 8 or len(c.distances) % 4:
        return False
    return c.version, c.nprobe, np.frombuffer(c.lists, dtype="<i8"), np.frombuffer(c.distances, dtype="<f4")


def _checked(held: contextlib.ExitStack, parts: list[tuple[str, ShardServicer]], request):
    """(collections, owned buckets (shards x buckets), queries) of ``request`` over ``parts``: each collection's
    read lock taken on ``held``, each live and at the request's epoch, the request's k, parameters and queries
    checked.

    Raises:
        LookalikeError: what a shard's own search would fail with.
        _Declined: a bucket is on two of them (a move between them: its items would come twice).
    """
    scs = []
    # in shard order, whatever the request's: a waiting writer holds back new readers (shard.locks.RWLock), so two
    # searches taking two shards' locks in opposite orders, each behind a writer of the other's, would wait forever
    for _sid, sv in sorted(parts, key=lambda part: part[0]):
        sc = sv.collection_of(request.collection)
        held.enter_context(sc._rw.read())
        sc._check_live()
        sc._check_epoch(request.epoch)
        scs.append(sc)
    owned = np.stack([sc._owned for sc in scs])
    if (owned.sum(axis=0) > 1).any():
        raise _Declined
    check_k(request.k)
    check_search_params(request.params.nprobe, request.params.ef_search)
    xq = vectors_from_proto(request.queries, scs[0].coll, "queries")
    check_answer_size(len(xq), request.k, request.include_payloads)
    return scs, owned, xq


def _answer(scs, D: np.ndarray, L: np.ndarray, of: np.ndarray, include_payloads: bool, lib: bool) -> Answer:
    """The answer of labels ``L`` whose shards are ``of`` (index into ``scs``, -1: none): each shard packs the ids
    of its own slots only (shard.reads), and each slot takes its shard's (the caller holds the locks). Each shard
    packed all nq x k slots, the others' empty, before: at 8 shards eight packs of a batch's slots for one."""
    flat_of, flat_L = of.ravel(), L.ravel()
    parts, src, taken = [], np.full(L.size, -1, dtype=np.int64), 0
    for j, sc in enumerate(scs):
        slots = np.flatnonzero(flat_of == j)
        if not len(slots):
            continue
        mine = flat_L[slots].reshape(1, -1)
        _, _, (id_bytes, id_lengths), pl = sc.reads._answer(D[:1], mine, include_payloads, True)
        parts.append(Answer(D, mine, id_bytes, id_lengths, pl, "", lib))
        src[slots] = taken + np.arange(len(slots))
        taken += len(slots)
    if not parts:
        return Answer(D, L, b"", np.zeros(L.size, dtype=np.uint16), [None] * L.size if include_payloads else None,
                      "", lib)
    id_bytes, id_lengths, payloads = pick_slots(parts, src)
    return Answer(D, L, id_bytes, id_lengths, payloads, "", lib)
