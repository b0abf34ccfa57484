"""The trained index of a collection, on a shard: training it once for every shard, reading the one a collection
loads with (:class:`TrainedIndexes`), and moving a collection's items into a new one (:func:`adopt_trained`). The
files are shard.trained's.

Uses shard.cpu_index, shard.locks, the storage modules, shard.trained and the base package; works on a
:class:`shard.collection.ShardCollection`'s state under its locks.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time
from typing import Callable

import numpy as np

from lookalike.config import CollectionConfig
from lookalike.errors import FailedPrecondition
from lookalike.ids import buckets_and_labels
from lookalike.indexspec import training_points
from shard.bucket_reader import read_buckets
from shard.cpu_index import VectorIndex
from shard.locks import let_waiters_in
from shard.osutil import release_memory
from shard.trained import TemplateDamaged, read_template, remove_templates, write_template

log = logging.getLogger(__name__)

_ENCODE_BATCH = 65536  # vectors per read of storage while moving a shard's items into a trained index
_ADD_BATCH = 4096  # vectors added under one hold of the write order meanwhile (writes wait that long at most)
_READ_BUCKETS = 16  # buckets read from storage at once meanwhile (shard.bucket_reader holds their items)


class TrainedIndexes:
    """A shard's side of its collections' trained indexes.

    Args:
        shard_id: the shard's name, for its log lines.
        storage_root: the storage URI (a local directory path), where the trained indexes live.
        gpu: the shard's GPU backend (``lookalike.gpu``), which trains the coarse k-means; None: the CPU does.
        store_path: where a shard stores a collection: (shard id, collection name) -> its directory.
    """

    def __init__(self, shard_id: str, storage_root: pathlib.Path, gpu,
                 store_path: Callable[[str, str], pathlib.Path]):
        self.shard_id = shard_id
        self.storage_root = storage_root
        self.gpu = gpu
        self.store_path = store_path
        self.problems: dict[str, str] = {}  # collection -> why its trained index could not be used

    def for_load(self, coll: CollectionConfig):
        """The collection's trained index to start from, or None. A trained index that cannot be read is
        reported (stats' damaged list); the collection then loads its index checkpoint of that version if it has
        one (it holds the trained index too), else serves exactly from its untrained buffer until the controller
        hands it a good version (:meth:`shard.shard.Shard.use_trained`, after ``lookalike train``)."""
        if not coll.trained_version or not training_points(coll.index)[0]:
            self.problems.pop(coll.name, None)
            return None
        try:
            template = read_template(self.storage_root, coll, coll.trained_version)
        except TemplateDamaged as err:
            self.problems[coll.name] = f"{err}: searching exactly until it is trained again"
            log.error("%s: %s", self.shard_id, self.problems[coll.name])
            return None
        self.problems.pop(coll.name, None)
        return template

    def read(self, coll: CollectionConfig):
        """Trained index ``coll.trained_version``, to move the collection's items into. Raises FailedPrecondition
        if it cannot be read."""
        try:
            template = read_template(self.storage_root, coll, coll.trained_version)
        except TemplateDamaged as err:
            self.problems[coll.name] = f"{err}: searching exactly until it is trained again"
            raise FailedPrecondition(str(err)) from None
        self.problems.pop(coll.name, None)
        return template

    def forget(self, name: str) -> None:
        """The collection was dropped: its trained indexes go, and what was wrong with them."""
        self.problems.pop(name, None)
        remove_templates(self.storage_root, name)

    def train(self, coll: CollectionConfig, version: int, sources: list[tuple[str, list[int]]], sample: int) -> dict:
        """Trains the collection's index once for every shard: reads about ``sample`` vectors of the buckets in
        ``sources`` ((shard id, buckets) whose store holds them, in the order to read them: the controller draws
        buckets at random, and an id's bucket is a hash of it, so this is a uniform sample of the items) from
        storage, trains the spec's quantizer and codebooks on them (the coarse k-means on this shard's GPU, when it
        has one), and writes the empty trained index as ``version`` (:func:`shard.trained.write_template`).
        Returns its note (version, vectors trained on, seconds, ...).

        Raises:
            FailedPrecondition: the buckets hold fewer vectors than the spec needs; or FAISS refused the data.
        """
        t0 = time.monotonic()
        needed = training_points(coll.index)[0]
        parts, got = [], 0
        for sid, buckets in sources:
            if got >= sample:
                break
            for batch in read_buckets(self.store_path(sid, coll.name), coll.buckets, buckets, _ENCODE_BATCH):
                parts.append(batch.vectors[: sample - got])
                got += len(parts[-1])
                if got >= sample:
                    break
        if got < needed:
            raise FailedPrecondition(f"training {coll.name!r} ({coll.index}) needs {needed} vectors; the buckets "
                                     f"read hold {got}")
        x = np.concatenate(parts)
        index = VectorIndex(dataclasses.replace(coll, trained_version=0), gpu=None)
        try:
            template = index.train_template(x, self.gpu)
        except Exception as err:  # noqa: BLE001: FAISS refusing the training data fails the training only
            raise FailedPrecondition(f"training {coll.name!r} ({coll.index}) on {len(x)} vectors failed: "
                                     f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")
        seconds = time.monotonic() - t0
        note = write_template(self.storage_root, coll, version, template, len(x), seconds)
        remove_templates(self.storage_root, coll.name, keep=(coll.trained_version, version))  # current and new
        log.info("%s: trained %s (%s) v%d on %d vectors in %.1fs", self.shard_id, coll.name, coll.index, version,
                 len(x), seconds)
        return note


def adopt_trained(sc, coll: CollectionConfig, template) -> bool:
    """Moves a collection's items on this shard (``sc``, a :class:`shard.collection.ShardCollection`) into its
    trained index ``template`` (version ``coll.trained_version``, read by :func:`shard.trained.read_template`).
    Returns False if the index already has that version.

    The new index is filled from storage (the originals, not the old index's lossy codes) while writes and
    searches go on: every write applies to it as well as to the old index (``sc.adopting``, :class:`Following`),
    and each part read from storage is added under the write order, _ADD_BATCH vectors at a time, skipping what a
    write has touched since the fill began (and what was deleted or given away). Writes wait for one part, not
    the whole move: at 10M x 128, IVF4096,Flat on 8 shards, the move of 630k vectors held a shard's writes for
    163-185 s. Searches go on against the old index until the swap, which takes the write lock only for an
    instant, so there is no gap in searches.

    Raises:
        FailedPrecondition: another move of the collection into a trained index is under way here; or storage
            gave fewer items than the shard holds (damaged parts, which the reader skips): the old index stays,
            and nothing is lost without a word.
    """
    with sc._write_order:
        sc._check_live()
        if sc.index.trained_version == coll.trained_version:
            return False
        if sc.adopting is not None:
            raise FailedPrecondition(f"collection {coll.name!r} is already moving into a trained index here")
        new = VectorIndex(coll, sc.index._gpu, template)
        following = sc.adopting = Following(new)
        buckets = sorted(sc.buckets)
    t0, old = time.monotonic(), None
    try:
        for part in range(0, len(buckets), _READ_BUCKETS):  # a reader holds its buckets' items at once
            for batch in read_buckets(sc.store.path, sc.coll.buckets, buckets[part:part + _READ_BUCKETS],
                                      _ENCODE_BATCH):
                _, home = buckets_and_labels(batch.ids, sc.coll.buckets)
                for s in range(0, len(batch.ids), _ADD_BATCH):
                    with sc._write_order:
                        sc._check_live()
                        following.fill(sc.table.find(home[s:s + _ADD_BATCH], batch.ids[s:s + _ADD_BATCH]),
                                       batch.vectors[s:s + _ADD_BATCH])
                    let_waiters_in()  # the writes that waited
        with sc._write_order:
            sc._check_live()
            if new.ntotal != len(sc.table):  # a part of storage the reader could not read (it logs which)
                raise FailedPrecondition(
                    f"moving collection {coll.name!r} into trained index v{coll.trained_version}: its storage gave "
                    f"{new.ntotal} of the {len(sc.table)} items this shard holds; it stays on "
                    f"v{sc.index.trained_version} (the shard's log names the damaged files)")
            mirror = new.build_gpu()
            if mirror is not None:
                new.install_gpu(mirror)
            # into its process's shards' shared IVF lists (shard.list_groups) before the swap: the copy does not
            # hold up this shard's searches (the index is not searched yet), and no write comes meanwhile
            new.share_lists(sc.list_groups)
            with sc._rw.write():
                old, sc.index = sc.index, new
                sc.coll = coll
                # No log record marks the new version: the newest checkpoint, the old version's, no longer matches
                # memory, and one must be written though nothing was logged since (or every start replays it all).
                sc._checkpoint_at = None
            sc.adopting = None
            sc.checkpointer.soon()  # the next start loads the new version's index, not the old one's
            sc.upkeep.index_replaced()
            log.info("%s: %d vectors moved into trained index v%d in %.1fs", coll.name, new.ntotal,
                     coll.trained_version, time.monotonic() - t0)
    except BaseException:
        with sc._write_order:
            if sc.adopting is following:
                sc.adopting = None
        if old is None:  # not swapped in: let go of it (its entries leave the shared lists it may have joined)
            new.release()
        raise
    old.release()
    del old
    release_memory()
    return True


class Following:
    """A trained index being filled from storage while writes go on (:func:`adopt_trained`): the collection
    applies each write to it as to its own index, under the write order (``ShardCollection.adopting``), and the
    labels a write touched are not taken from storage: storage may hold an older vector of them. (Storage is
    read a set of buckets at a time, each item once.)"""

    def __init__(self, index: VectorIndex):
        self.index = index
        self._touched = [np.empty(0, dtype=np.int64)]  # labels written since the fill began

    def upsert(self, labels: np.ndarray, existing: np.ndarray, x: np.ndarray) -> None:
        if existing.any():
            self.index.remove(labels[existing])  # a no-op for labels not filled yet
        self.index.add(labels, x)
        self._touched.append(np.asarray(labels, dtype=np.int64))

    def remove(self, labels: np.ndarray) -> None:
        self.index.remove(labels)
        self._touched.append(np.asarray(labels, dtype=np.int64))

    def fill(self, labels: np.ndarray, x: np.ndarray) -> int:
        """Adds the items read from storage whose ``labels`` (-1: deleted or given away since) no write has
        touched since the fill began. Returns how many."""
        if len(self._touched) > 1:
            self._touched = [np.unique(np.concatenate(self._touched))]
        keep = labels >= 0
        if len(self._touched[0]):
            keep &= ~np.isin(labels, self._touched[0])
        if keep.any():
            self.index.add(labels[keep], x[keep])
        return int(keep.sum())


def adopt_later(sc, coll: CollectionConfig, trained: TrainedIndexes) -> None:
    """Moves a collection just loaded from a checkpoint of an older trained version (shard.checkpointing) into
    ``coll.trained_version``, in the background (:func:`adopt_trained`: it answers from the older one meanwhile);
    nothing when it loaded that version. A failure is logged; the controller asks again (control.training)."""
    if sc.coll.trained_version == coll.trained_version:
        return

    def run():
        try:
            adopt_trained(sc, coll, trained.read(coll))
        except Exception as err:  # noqa: BLE001: background work; the controller's next check asks again
            log.warning("%s: moving into trained index v%d after the load failed: %s", coll.name,
                        coll.trained_version, err)

    threading.Thread(target=run, name=f"adopt-{coll.name}", daemon=True).start()
