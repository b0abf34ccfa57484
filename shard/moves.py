"""Bucket moves on the shard side (:class:`BucketMoves`): a collection takes buckets on (join), loads what their
previous owner stored while writes keep arriving (copy_in), ends that (finish_join), fences writes routed with an
older shard map (fence) and gives buckets away (drop_buckets). control.controller runs the whole protocol.

Works on a :class:`shard.collection.ShardCollection`'s state under its locks; uses the storage modules and the base
package.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time

from lookalike.errors import FailedPrecondition, ResourceExhausted
from lookalike.ids import buckets_and_labels
from shard.bucket_reader import read_buckets
from shard.records import UPSERT
from shard.snapshots import snapshot_path as _snapshot_path

COPY_NICE = 10      # OS priority of the copy thread: searches come first
_COPY_BATCH = 4096  # items per apply while copying a bucket in (each holds the write lock briefly)


class BucketMoves:
    """The bucket moves of one collection.

    Args:
        sc: the :class:`shard.collection.ShardCollection` whose buckets move.
    """

    def __init__(self, sc):
        self.sc = sc

    def join(self, buckets) -> None:
        """Takes buckets on, empty: from now on their writes are accepted here (and logged, after a RESET that
        forgets anything this shard stored for them before). Their previous owner's data comes with copy_in."""
        sc = self.sc
        buckets = sorted(int(b) for b in buckets)
        with sc._write_order:
            sc._check_live()
            sc.store.reset(buckets)
            with sc._rw.write():
                sc._remove_buckets(buckets)
                sc._owned[buckets] = True
                for b in buckets:
                    sc.joining[b] = set()
            sc.upkeep.refresh_gpu()

    def fence(self, epoch: int) -> None:
        """Refuses writes routed with a map older than ``epoch`` (searches go on). Once this returns, every write
        accepted with an older map is in the log (the fence waits for writes in progress)."""
        sc = self.sc
        with sc._write_order:
            sc.min_write_epoch = max(sc.min_write_epoch, int(epoch))

    def copy_in(self, buckets, source: str | pathlib.Path, nice: int = COPY_NICE, rate_bytes_s: float = 0) -> int:
        """Loads joining buckets from their previous owner's store (its directory for this collection), skipping
        ids written here since the join (they are newer). Returns the items copied.

        The copy runs in a thread of its own at OS priority ``nice`` (Linux schedules threads separately), in
        small batches: it takes the CPU that searches leave idle, and holds the write lock only briefly.
        ``rate_bytes_s`` (> 0) caps the vector bytes copied per second.

        Raises:
            FailedPrecondition: a bucket is not joining here (this shard restarted, or the move was rolled back).
        """
        sc = self.sc
        result: dict = {}

        def run():
            try:
                if nice:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
                result["copied"] = self._copy_in(buckets, source, rate_bytes_s)
            except BaseException as err:  # re-raised in the caller's thread
                result["error"] = err

        t = threading.Thread(target=run, name=f"copy-{sc.coll.name}", daemon=True)
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["copied"]

    def _copy_in(self, buckets, source, rate_bytes_s: float = 0) -> int:
        sc = self.sc
        wanted = sorted(int(b) for b in buckets)
        copied = copied_bytes = 0
        t0 = time.monotonic()
        for batch in read_buckets(source, sc.coll.buckets, wanted, batch_items=_COPY_BATCH):
            with sc._write_order:
                sc._check_live()
                if any(b not in sc.joining for b in wanted):
                    raise FailedPrecondition(f"buckets {wanted} of {sc.coll.name!r} are not being joined here")
                touched = set().union(*(sc.joining[b] for b in wanted))
                keep = [i for i, uid in enumerate(batch.ids) if uid not in touched]
                if not keep:
                    continue
                ids = [batch.ids[i] for i in keep]
                x, payloads = batch.vectors[keep], [batch.payloads[i] for i in keep]
                sc._check_room(sc._bytes_for(x, ids, payloads), sc.index.gpu_bytes_for(len(x)))
                sc.store.append(UPSERT, ids, x, payloads)
                _, home = buckets_and_labels(ids, sc.coll.buckets)
                sc._apply_upsert(ids, home, x, payloads)
                # No malloc_trim while copying: it holds the allocator's locks, stalling the threads that search.
                sc.upkeep.after_write(x.nbytes, trim=False)
            copied += len(ids)
            copied_bytes += x.nbytes
            if rate_bytes_s > 0:
                time.sleep(max(0.0, t0 + copied_bytes / rate_bytes_s - time.monotonic()))
        return copied

    def finish_join(self, buckets) -> None:
        """The copy is complete: the buckets are like any other owned bucket from now on."""
        sc = self.sc
        with sc._write_order:
            missing = [int(b) for b in buckets if int(b) not in sc.joining]
            if missing:
                raise FailedPrecondition(f"buckets {missing} of {sc.coll.name!r} are not being joined here")
            for b in buckets:
                del sc.joining[int(b)]

    def drop_buckets(self, buckets, epoch: int) -> int:
        """Gives buckets away: logs a RESET, forgets their items and refuses requests routed with a map older
        than ``epoch``. Returns the items dropped. Buckets not owned here are ignored."""
        sc = self.sc
        buckets = sorted(int(b) for b in buckets)
        with sc._write_order:
            sc._check_live()
            sc.store.reset(buckets)
            labels = sc._labels_of(buckets)  # no write can change them: we hold the write order
            # Build the index and id table without them while searches go on, when there is room for the copy
            # (and its GPU mirror, on a GPU shard); the write lock then only swaps them in.
            main = table = mirror = None
            if len(labels):
                try:
                    sc._check_room(sc.index.nbytes)
                    main = sc.index.without(labels)
                except ResourceExhausted:
                    main = None
                if main is not None and sc.index.on_gpu:
                    try:
                        sc._check_room(0, sc.index.gpu_bytes_of(main))
                        mirror = sc.index.build_gpu(main)
                    except ResourceExhausted:
                        mirror = None  # rebuilt after the swap, once the old mirror is gone
                table = sc.table.without(labels)
            if sc.adopting is not None and len(labels):
                sc.adopting.remove(labels)
            with sc._rw.write():
                sc.min_epoch = max(sc.min_epoch, int(epoch))
                if main is not None:
                    main = sc.index.install(main, labels, mirror)  # the old ones are freed below, after the lock
                elif len(labels):
                    sc.index.remove(labels)
                if table is not None:
                    table, sc.table = sc.table, table
                sc.payloads.remove(labels)
                n = len(labels)
                sc._owned[buckets] = False
                for b in buckets:
                    sc.joining.pop(b, None)
            del main, table, mirror
            sc.upkeep.refresh_gpu()
        if n or any(_snapshot_path(sc.store.path, b).exists() for b in buckets):
            sc.store.compact_soon()  # folds the RESET in: their snapshots are deleted, not kept forever
        return n
