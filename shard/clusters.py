"""The shard's part of a catalog clustering job (:func:`assign_clusters`): each item's nearest centroid, stored in
a payload field (jobs.kmeans runs the k-means and the job).

Works on a :class:`shard.collection.ShardCollection`'s state under its locks; uses jobs, the storage modules and
the base package.
"""

from __future__ import annotations

import faiss
import numpy as np

from jobs import cluster_space, set_payload_field
from lookalike.errors import InvalidArgument
from lookalike.ids import buckets_and_labels
from lookalike.nearest import nearest
from shard.bucket_reader import read_buckets
from shard.records import UPSERT


def assign_clusters(sc, centroids: np.ndarray, field: str, buckets, count_buckets=(), epoch: int = 0,
                    group: int = 32) -> tuple[np.ndarray, int]:
    """Stores the nearest centroid (its number, as a string) of each item of ``buckets`` in payload field
    ``field``.

    The vectors come from storage (the originals: an IVF-PQ index only holds approximations), a group of
    buckets at a time under the write order, so a write that lands meanwhile is either before (and labelled)
    or after (and keeps its own payload). Only payloads change in memory; the log records the items as
    upserts of the same vectors, so a replay or a bucket move carries the labels.

    Args:
        sc: the :class:`shard.collection.ShardCollection` whose items are labelled.

    Returns:
        (items per centroid among ``count_buckets``, items labelled).
    """
    quantizer = faiss.IndexFlatL2(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    counted = np.zeros(sc.coll.buckets, dtype=bool)
    counted[[int(b) for b in count_buckets]] = True
    sizes = np.zeros(len(centroids), dtype=np.int64)
    labelled = 0
    held = sorted({int(b) for b in buckets})
    if held and (held[0] < 0 or held[-1] >= sc.coll.buckets):
        raise InvalidArgument(f"bucket numbers of {sc.coll.name!r} run from 0 to {sc.coll.buckets - 1}")
    for start in range(0, len(held), group):
        with sc._write_order:
            sc._check_live()
            sc._check_epoch(epoch, write=True)
            chunk = held[start:start + group]
            sc._check_owned(np.asarray(chunk, dtype=np.int64))
            for batch in read_buckets(sc.store.path, sc.coll.buckets, chunk):
                ids, x = batch.ids, batch.vectors
                # the nearest centroid whatever the batch (lookalike.nearest)
                _, assign = nearest(quantizer, np.ascontiguousarray(cluster_space(x, sc.coll.metric)), 1)
                assign = assign[:, 0]
                payloads = [set_payload_field(p, field, str(a)) for p, a in zip(batch.payloads, assign.tolist())]
                buckets, home = buckets_and_labels(ids, sc.coll.buckets)
                sc.store.append(UPSERT, ids, x, payloads)
                labels = sc.table.find(home, ids)
                ok = labels >= 0  # all of them: memory and storage hold the same items under the write order
                with sc._rw.write():
                    # the vectors are those already indexed: only the payloads change
                    pay = [p for p, o in zip(payloads, ok.tolist()) if o]
                    sc.table.set_payloads(sc.table.positions(labels[ok]), pay)
                    sc.payloads.put(labels[ok], pay)
                sc._note_joining(ids, buckets)
                sizes += np.bincount(assign[counted[buckets]], minlength=len(centroids))
                labelled += len(ids)
    return sizes, labelled
