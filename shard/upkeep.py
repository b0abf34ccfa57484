"""What a collection on a shard does after its writes (:class:`Upkeep`): keeps the index's GPU mirror fresh,
starts index checkpoints when due, hands the memory the writes freed back to the OS once they stop, and packs
grown IVF lists to their size.

Works on a :class:`shard.collection.ShardCollection`'s state under its locks; uses shard.osutil (release_memory)
and the base package.
"""

from __future__ import annotations

import logging
import threading
import time

import psutil

from lookalike.errors import ResourceExhausted
from shard.list_groups import lists_changed_at, shared_lists
from shard.osutil import release_memory

log = logging.getLogger(__name__)

_TRIM_EVERY_BYTES = 32 << 20
_TRIM_IDLE_S = 1.0  # seconds without writes after which a shard hands back what its last writes freed
_REPACK_MIN = 10_000  # vectors below which compressed IVF lists are not worth packing (see Upkeep.repack_if_due)
# Growth since the last pack that makes lists worth packing again: every list that grows after a pack is copied
# into a buffer twice its size, so even a little growth costs much (10M x 128 IVF4096,Flat on 4 shards: the last 18%
# of a load, left unpacked under a threshold of 20%, cost 220 bytes a vector of resident memory).
_REPACK_GROWTH = 0.05
# Less growth than that is packed too, once this long after the last pack (and at least 30 times as long as that
# pack took): the end of a load that came after the last pack (10M x 128 on 4 shards: 2.4% of it, 110 bytes a vector
# more than on 8 shards) or a trickle of writes, without copying the lists at every pause.
_REPACK_EVERY_S = 60.0
_REPACK_IDLE_S = 5.0  # seconds without writes before lists are packed (see Upkeep._trim_when_idle)


class Upkeep:
    """The upkeep of one collection after its writes.

    Args:
        sc: the :class:`shard.collection.ShardCollection` it keeps.
    """

    def __init__(self, sc):
        self.sc = sc
        self._written_since_trim = 0
        self._last_write = 0.0
        self._trim_pending = False  # a thread waits for the writes to stop, then trims
        self.packed_at = 0  # vectors the index held when its lists were last packed (see repack_if_due)
        self._packed_t = 0.0  # time.monotonic() when they were, and how long that took
        self._pack_s = 0.0
        self._stop = threading.Event()  # set when the collection closes: the waiting thread ends at once
        self.thread: threading.Thread | None = None  # the latest thread that waits for the writes to stop

    def stop(self) -> None:
        """The collection closed or was dropped: the upkeep ends (a pending trim or pack is dropped, none starts)."""
        self._stop.set()

    def refresh_gpu(self) -> None:
        """On a GPU shard, (re)builds the index's GPU mirror when it has none (loaded, just trained) or too many
        tombstones. The caller holds ``_write_order`` (or is loading): the CPU index cannot change meanwhile, and
        searches go on, on the old mirror when the GPU has room for both, else on the CPU index."""
        sc = self.sc
        index = sc.index
        if index is None or not index.gpu_needs_build:
            return
        if index.on_gpu:
            try:
                sc._check_room(0, index.gpu_bytes_of())
            except ResourceExhausted:
                with sc._rw.write():
                    old = index.install_gpu(None)  # make room: the CPU index answers during the build
                del old
        mirror = index.build_gpu()
        if mirror is not None:
            with sc._rw.write():
                old = index.install_gpu(mirror)
            del old  # freed after the lock

    def after_write(self, nbytes: int, trim: bool = True) -> None:
        """Called under the write order after each applied write."""
        sc = self.sc
        self.refresh_gpu()
        self._written_since_trim += nbytes
        self._last_write = time.monotonic()
        sc.checkpointer.when_due(nbytes)
        if trim and self._written_since_trim > _TRIM_EVERY_BYTES:
            self._written_since_trim = 0
            release_memory()  # request buffers and old id-table arrays leave freed pages behind
        if trim and not self._trim_pending:
            # What the last writes of a burst freed (up to _TRIM_EVERY_BYTES of request buffers: a quarter of a
            # 250k x 128 shard's vectors) is handed back once the writes stop, and grown IVF lists are packed.
            self._trim_later()

    def index_replaced(self) -> None:
        """A new index took the old one's place (a new trained version, shard.training.adopt_trained): its lists
        grew by doubling as the items went in, whatever their count, so they are packed once the writes stop. The
        caller holds the write order."""
        self.packed_at = 0
        self._packed_t = 0.0
        self._last_write = time.monotonic()
        if not self._trim_pending:
            self._trim_later()

    def share_lists(self) -> None:
        """Moves the collection's index into its process's shared IVF lists (``sc.list_groups``, shard.list_groups)
        when it can join them, and arms their pack: they grew by its entries. Takes the write order and lock."""
        sc = self.sc
        with sc._write_order, sc._rw.write():
            if sc.index is not None and sc.index.share_lists(sc.list_groups):
                self.index_replaced()

    def _trim_later(self) -> None:
        """Starts the thread that waits for the writes to stop, then trims and packs (:meth:`_trim_when_idle`)."""
        if self._stop.is_set():
            return
        self._trim_pending = True
        self.thread = threading.Thread(target=self._trim_when_idle, name=f"trim-{self.sc.coll.name}", daemon=True)
        self.thread.start()

    def _trim_when_idle(self) -> None:
        """Waits until no write has come for _TRIM_IDLE_S, then releases freed memory once; IVF lists grown since
        they were last packed are packed once no write has come for _REPACK_IDLE_S (a bulk load pauses for shorter
        than that, and every pack copies the lists) and they are due (:meth:`repack_in`). Lists shared with other
        shards of the process wait for theirs too (shard.list_groups ``lists_changed_at``), and are packed without the
        write order (:meth:`_pack_shared`). Not while buckets are copied in: a move must not stall searches, and a
        trim holds the allocator's locks (copy_in never trims)."""
        sc = self.sc
        wait = _TRIM_IDLE_S
        while True:
            if self._stop.wait(max(0.05, wait)):
                return
            with sc._write_order:
                if self._stop.is_set():  # closed or dropped meanwhile (both stop the upkeep)
                    self._trim_pending = False
                    return
                # its own writes, and those of the other shards whose lists it shares (shard.list_groups)
                idle = time.monotonic() - max(self._last_write, lists_changed_at(sc.index))
                if sc.joining or idle < _TRIM_IDLE_S:
                    wait = _TRIM_IDLE_S if sc.joining else _TRIM_IDLE_S - idle
                    continue
                pack_in = self.repack_in()
                pack_later = pack_in is not None and (idle < _REPACK_IDLE_S or pack_in > 0)
                shared = None if pack_in is None or pack_later else shared_lists(sc.index)
                packed = False if pack_later or shared is not None else self.repack_if_due()
                release = bool(self._written_since_trim) or packed  # what was trimmed on the way stays trimmed
                self._written_since_trim = 0
                if not pack_later and shared is None:
                    self._trim_pending = False
                index, n = sc.index, sc.index.ntotal
            if shared is not None:
                # Lists shared with other shards are packed in place a few at a time (ListGroup.pack), without
                # the write order: this shard's writes go on between them as the others' do. The loop then looks
                # again at what came meanwhile.
                self._pack_shared(shared, index, n)
                release_memory()
                wait = _TRIM_IDLE_S
                continue
            if release:
                release_memory()
            if not pack_later:
                return
            # A pack deferred by a little growth (pack_in > 0) is looked at again within _REPACK_IDLE_S: writes that
            # come meanwhile may make it due now, and the thread sleeping until the deferred time let the end of a
            # 10M load wait unpacked for a minute or more (up to 30 x a pack's time) after its last write.
            wait = max(_REPACK_IDLE_S - idle, min(pack_in, _REPACK_IDLE_S))

    def _pack_shared(self, group, index, n: int) -> None:
        """Packs the lists ``index`` shares with the other shards of its process (``group``, shard.list_groups),
        which held ``n`` vectors of it when the pack was decided, outside the write order."""
        t0 = time.monotonic()
        try:
            packed = group.pack()  # 0: another member's upkeep packed them first
        except Exception:  # noqa: BLE001: the upkeep goes on (its thread ended here); the lists stay as they were
            log.exception("%s: packing the shared IVF lists failed; they keep their buffers, and the pack is tried "
                          "again after the next writes", self.sc.coll.name)
            return
        t1 = time.monotonic()
        with self.sc._write_order:
            if self.sc.index is index:  # not replaced meanwhile (index_replaced arms a pack of its own)
                self.packed_at, self._packed_t, self._pack_s = n, t1, t1 - t0
        if packed:
            log.info("%s: %d shared IVF lists packed to their size in %.2fs", self.sc.coll.name, packed, t1 - t0)

    def repack_in(self) -> float | None:
        """Seconds until the IVF lists are due to be packed again (0: now; see :meth:`repack_if_due`); None when
        they hold what they held when last packed (or are not lists that need it)."""
        sc = self.sc
        n = sc.index.ntotal
        if not sc.index.repackable or n < _REPACK_MIN or n == self.packed_at:
            return None
        if n >= (1 + _REPACK_GROWTH) * self.packed_at:
            return 0.0
        return max(0.0, max(_REPACK_EVERY_S, 30 * self._pack_s) - (time.monotonic() - self._packed_t))

    def repack_due(self) -> bool:
        """Whether the IVF lists changed enough since they were last packed, or long enough ago, to be packed again
        (see :meth:`repack_if_due`)."""
        return self.repack_in() == 0.0

    def repack_if_due(self) -> bool:
        """IVF lists grow by doubling as items arrive, and the buffers they outgrow stay behind in the heap between
        longer-lived allocations: 50-150 bytes a vector on a shard (bench/memory_bench.py), more than a PQ16 code
        and its id. Once the writes stop, an index that grew by _REPACK_GROWTH since it was last packed (or by anything,
        _REPACK_EVERY_S after the last pack) has its lists copied into lists of exactly their size
        (VectorIndex.repacked) and swapped in; the old ones are freed. Measured on a shard
        (bench/memory_bench.py, 300k x 128, batches of 10k): IVF1024,Flat 710 -> 597 bytes a vector resident
        (FAISS: 522), IVF1024,PQ16 packed to 38 a vector beside its fixed tables (FAISS: 26). The copy needs the
        index's bytes once more for a moment: it is skipped when that would pass the shard's capacity or the
        machine's available memory. The caller holds the write order (writes wait, searches go on against the old
        index until the swap)."""
        sc = self.sc
        index = sc.index
        n = index.ntotal
        if not self.repack_due():
            return False
        try:
            sc._check_room(index.nbytes)  # the copy, for a moment
        except ResourceExhausted:
            return False
        if psutil.virtual_memory().available < 2 * index.nbytes:
            return False
        t0 = time.monotonic()
        shared = shared_lists(index)
        if shared is not None:  # lists shared with its process's shards: packed in place (shard.list_groups)
            shared.pack()
        else:
            new = index.repacked()
            with sc._rw.write():
                old = index.install_repacked(new)
            del old
        self.packed_at = n
        self._packed_t = time.monotonic()
        self._pack_s = self._packed_t - t0
        log.info("%s: IVF lists packed to their size (%d vectors) in %.2fs", sc.coll.name, n, self._pack_s)
        return True
