"""IVF lists shared by the shards of one process: one set of lists for a collection's trained index, not one a
shard.

The shards of a collection hold one trained index (shard.trained), so a list ``l`` of one is the same list as ``l``
of another, split over them. Searched as S indexes, a batch costs FAISS more than one index does: each part sets
up a scanner and keeps a heap for every probed list, and IVF-PQ builds each probed list's distance table once a
part. Measured in-process at 5M x 128, batch 100 (docs/BENCHMARKS.md, "The machine's time at 8 shards"):
IVF4096,Flat at nprobe 8, 8 parts 1.16x one index's CPU; IVF4096,PQ32 at nprobe 12, 1.99x (1.27x through FAISS's
``HStackInvertedLists``, which copies each probed list out of the parts). And each part's list buffers cost the
allocator about a page each (jemalloc; "Where IVF-Flat's RAM goes in a process of 8 shards"): 10-11 bytes a vector
at 10M on 8 shards.

So the shards of one process (shard.host) put the lists of a trained version into one
``faiss.ArrayInvertedLists``, a :class:`ListGroup`. Each shard's index (shard.cpu_index.VectorIndex) keeps its own
FAISS ``IndexIVF`` (its count, quantizer and codes' parameters), whose lists are the group's. Its entries are told
apart by a tag in the ids' high bits: ``slot << TAG_SHIFT | label`` (labels use the low 56 bits: a bucket of at most
16 bits above lookalike.ids' 40). A shard searching alone passes FAISS an ``IDSelectorRange`` of its tag (the
others' entries cost only their id's test); removal by label removes its own entries only; two replicas of one
slice in one process, or a bucket moving between two of its shards, keep two entries of one label, one under each
tag. A search of all a group's shards at once (shard.stacked) is one FAISS search over the lists with no selector:
the work of one index. A group is used for that only when the shards named are exactly its members (a member
being filled or dropped makes it fall back to the shards one by one, each with its selector).

Measured (docs/BENCHMARKS.md, "One set of IVF lists for the shards of a process"): at 2M, IVF4096,Flat, 8 shards
in one process, the process's CPU a batch of 100 0.70x what it was; at 10M in turns with FAISS, IVF-PQ32 0.77x
FAISS against 0.62x, IVF-Flat 0.76x against 0.75x (at 10M a shard's part of a list is long, and the per-part costs
small). A pack (:meth:`ListGroup.pack`) copies the lists into buffers of their size a few at a time, the group's
searches and writes going on between them, and hands back the pages past each list's entries
(:func:`release_list_slack`): the allocator's size classes left 50 bytes a vector resident in IVF-Flat's code
buffers at 10M.

The group's read-write lock guards its lists: every read or write of them holds it, taken inside a shard's own
locks, never the other way round, and never held while another lock is taken. A shard's write holds it for the
append (its vectors are encoded before) or the removal: writes of the other shards of the group, and their
searches, wait that long.

A member's entries leave the group when its index is let go (:meth:`Membership.release`), or, for one dropped
without it (a dropped collection, a reload), when it is finalized: its slot is then marked dead and a thread of
its own removes its entries (a finalizer may run in a thread holding the group's lock). A checkpoint of a member
copies its entries out of the group (:meth:`Membership.private_index`): one at a time in a process
(:data:`CHECKPOINT_TURN`, held while it is written), so that the copies hold at most one shard's part at once.

Uses faiss, numpy, the base package (the labels' bits), shard.locks and shard.index_reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import weakref

import faiss
import numpy as np

from lookalike.config import LIMITS
from lookalike.ids import LABEL_SHIFT
from lookalike.nearest import ivf_encode
from shard.index_reads import reconstruct_ivf
from shard.locks import RWLock, let_waiters_in
from shard.osutil import release_slack

TAG_SHIFT = 56
LABEL_BITS = (1 << TAG_SHIFT) - 1
assert (LIMITS.max_buckets << LABEL_SHIFT) - 1 <= LABEL_BITS, "labels must leave the tag's bits free"
MAX_MEMBERS = 127  # slots 1..127: the tag keeps the ids positive
CHECKPOINT_TURN = threading.Lock()  # a checkpoint of a member, copied out and written, one at a time (taken first)


def eligible(ivf) -> bool:
    """An IVF index whose lists can join a group: FAISS's array lists (not fast-scan blocks), owned by it."""
    return ivf is not None and bool(ivf.own_invlists) and isinstance(
        faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)


def _own_empty_lists(ivf, nlist: int, code_size: int) -> None:
    """Gives ``ivf`` new empty array lists, owned by it."""
    lists = faiss.ArrayInvertedLists(nlist, code_size)
    lists.this.disown()  # FAISS frees them with the index
    ivf.replace_invlists(lists, True)


def _list_arrays(lists, no: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of list ``no``'s ids and codes (valid while it is not written)."""
    ids = faiss.rev_swig_ptr(lists.get_ids(no), n)
    codes = faiss.rev_swig_ptr(lists.get_codes(no), n * lists.code_size)
    return ids, codes


def copy_entries(src, dst, tag_in: int, tag_out: int | None, lock=None) -> int:
    """Adds to ``dst`` the entries of ``src`` (both ArrayInvertedLists) whose tag is ``tag_in`` (0: every entry;
    with ``tag_out`` None, the entries of ``src`` are all taken and tagged ``tag_in``), their ids retagged
    ``tag_out`` (0: untagged). ``lock``: a context-manager factory held list by list while ``src`` is read (a
    group's lists, written by other shards between lists). Returns the entries copied."""
    total = 0
    # dst's count of lists: a group's (``src`` under ``lock``) has places added while a pack moves its buffers
    # (_pack_lists), and read outside the lock it named lists past the last (a size of 10^16 entries read back)
    for no in range(dst.nlist):
        with lock() if lock is not None else contextlib.nullcontext():
            n = src.list_size(no)
            if not n:
                continue
            ids, codes = _list_arrays(src, no, n)
            if tag_out is None:  # all of them, tagged
                keep_ids, keep_codes = ids | tag_in, codes
            else:
                mask = (ids >> TAG_SHIFT) == (tag_in >> TAG_SHIFT)
                if not mask.any():
                    continue
                keep_ids = (ids[mask] & LABEL_BITS) | tag_out
                keep_codes = codes.reshape(n, -1)[mask]
            keep_ids = np.ascontiguousarray(keep_ids, dtype=np.int64)
            keep_codes = np.ascontiguousarray(keep_codes)
        dst.add_entries(no, len(keep_ids), faiss.swig_ptr(keep_ids), faiss.swig_ptr(keep_codes))
        total += len(keep_ids)
    return total


def release_list_slack(lists, nos=None) -> int:
    """Hands back the whole pages past each list's entries in its codes' and ids' buffers (shard.osutil
    ``release_slack``: the allocator's size-class rounding, a vector's growth): ``lists``, FAISS array lists whose
    buffers are their own (not views); ``nos``: the lists' numbers (all of them by default). Returns the bytes
    handed back."""
    freed = 0
    for no in range(lists.nlist) if nos is None else nos:
        n = lists.list_size(no)
        if n:
            freed += release_slack(int(lists.get_codes(no)), n * lists.code_size)
            freed += release_slack(int(lists.get_ids(no)), n * 8)
    return freed


def shared_lists(vindex):
    """The :class:`ListGroup` whose lists ``vindex`` (a shard.cpu_index.VectorIndex) shares, or None."""
    member = getattr(vindex, "_member", None)
    return None if member is None else member.group


def lists_changed_at(vindex) -> float:
    """When the shared lists of ``vindex`` (a shard.cpu_index.VectorIndex) last had entries appended or removed, by
    any member (``time.monotonic()``); 0.0 for an index with lists of its own. A shard's upkeep waits for the lists
    to be quiet, not only its own writes, before it packs them (shard.upkeep): after a restart the shards of a
    process join one after the other, and each join armed a pack of the whole group (at 10M x 128, IVF-Flat, 8
    shards: 7 packs of 6-13 s each, searches waiting on the group's lock meanwhile)."""
    group = shared_lists(vindex)
    return 0.0 if group is None else group.changed_at


def remove_tag(lists, tag: int) -> int:
    """Removes the entries tagged ``tag`` from ``lists`` (the caller holds the group's write lock)."""
    removed = 0
    for no in range(lists.nlist):
        n = lists.list_size(no)
        if not n:
            continue
        ids, codes = _list_arrays(lists, no, n)
        mask = (ids >> TAG_SHIFT) != (tag >> TAG_SHIFT)
        keep = int(mask.sum())
        if keep == n:
            continue
        kept_ids = np.ascontiguousarray(ids[mask])
        kept_codes = np.ascontiguousarray(codes.reshape(n, -1)[mask])
        if keep:
            lists.update_entries(no, 0, keep, faiss.swig_ptr(kept_ids), faiss.swig_ptr(kept_codes))
        lists.resize(no, keep)
        removed += n - keep
    return removed


PACK_CHUNK_BYTES = 16 << 20  # entries a pack copies under one hold of a group's lock (ListGroup.pack)


def _pack_lists(lists, chunk: list[int]) -> None:
    """Gives the lists numbered ``chunk`` of ``lists`` (FAISS array lists, not empty) buffers of exactly their
    entries, and hands back the pages past them (:func:`release_list_slack`); the caller holds the write lock.

    FAISS's Python interface hands out copies of a list's buffers, not the buffers, and cannot resize the vector of
    the ids' buffers. ``permute_invlists`` (the same code since FAISS 1.8) moves buffers without copying: it builds
    vectors of ``lists.nlist`` places, each taking the buffers its map names (an emptied place's when named twice).
    So the lists are given ``len(chunk)`` places more, each list of the chunk is copied into one (a buffer resized
    from empty gets exactly what it asks), the copies swapped with the lists, and the places dropped again with the
    old buffers in them."""
    nlist, m = lists.nlist, len(chunk)
    if not m:
        return
    # Each map is held in a name while FAISS reads it: swig_ptr keeps no reference to its array, and a temporary's
    # buffer was freed (and written over by the allocator) before permute_invlists read it ('o < nlist' failed).
    keep = np.arange(nlist, dtype=np.int64)
    lists.nlist = nlist + m
    try:
        grow = np.zeros(nlist + m, dtype=np.int64)  # the new places take an empty buffer (list 0's, once moved)
        grow[:nlist] = np.arange(nlist)
        lists.permute_invlists(faiss.swig_ptr(grow))
        for j, no in enumerate(chunk):
            lists.add_entries(nlist + j, lists.list_size(no), lists.get_ids(no), lists.get_codes(no))
        swap = np.arange(nlist + m, dtype=np.int64)
        swap[chunk], swap[nlist:] = nlist + np.arange(m), chunk
        lists.permute_invlists(faiss.swig_ptr(swap))
    finally:
        lists.nlist = nlist
        lists.permute_invlists(faiss.swig_ptr(keep))  # the old buffers go
    release_list_slack(lists, chunk)


class ListGroup:
    """The lists one trained index's shards share in one process, and who holds which tag in them."""

    def __init__(self, key: tuple, nlist: int, code_size: int, on_empty=None):
        self.key = key
        self._on_empty = on_empty  # called once it holds no member: its registry lets it go (and its lists)
        self.lists = faiss.ArrayInvertedLists(nlist, code_size)
        self.lock = RWLock()
        self._members: dict[int, weakref.ref] = {}  # slot -> its VectorIndex
        self._changed = 0  # entries appended or removed since the lists were last packed (see pack)
        self.changed_at = 0.0  # time.monotonic() of the last entry appended or removed (see lists_changed_at)
        self._dead: list[int] = []  # slots of members finalized without a release, their entries not yet removed
        self._slots = threading.Lock()

    def holders(self) -> set:
        """``id()`` of each index whose entries the lists hold; None in it for entries of one let go and not
        yet removed."""
        with self._slots:
            held = {id(m) if m is not None else None for m in (ref() for ref in self._members.values())}
            return held | ({None} if self._dead else set())

    def empty(self) -> bool:
        with self._slots:
            return not self._members and not self._dead

    def _take_slot(self, vindex) -> int:
        with self._slots:
            free = next((s for s in range(1, MAX_MEMBERS + 1) if s not in self._members), 0)
            if free:
                self._members[free] = weakref.ref(vindex)
            return free

    def _abandoned(self, slot: int) -> None:
        """A member let go without a release: its entries are removed in another thread (a finalizer may run in a
        thread holding the lock)."""
        self._dead.append(slot)  # list.append is atomic: a finalizer takes no lock
        threading.Thread(target=self._purge_now, daemon=True, name="list-group-purge").start()

    def _purge_now(self) -> None:
        with self.lock.write():
            self._purge()
        self._left()

    def _left(self) -> None:
        """After a member left: a group left empty is let go by its registry (its lists' memory with it)."""
        if self._on_empty is not None and self.empty():
            self._on_empty(self)

    def _purge(self) -> None:
        """Removes the entries of finalized members (the caller holds the write lock)."""
        while self._dead:
            slot = self._dead.pop()
            self._touch(remove_tag(self.lists, slot << TAG_SHIFT))
            with self._slots:
                self._members.pop(slot, None)

    def _touch(self, entries: int) -> None:
        """Counts ``entries`` appended or removed (the caller holds the write lock)."""
        if entries:
            self._changed += entries
            self.changed_at = time.monotonic()

    def pack(self) -> int:
        """Copies each list's codes and ids into buffers of exactly their size: after growth by doubling, the
        buffers' tails and the heap's holes hold up to about as much again (shard.upkeep's ``repack_if_due``; 1M x 128
        IVF1024,Flat in 8 members, under jemalloc: 732 MiB allocated before, 566 after, 495 of codes and ids). Nothing
        when no entry was added or removed since the last pack (each member's upkeep asks).

        The lists are packed a few at a time (:func:`_pack_lists`, about PACK_CHUNK_BYTES of entries), each few under
        the write lock, which is handed back between them (shard.locks ``let_waiters_in``): the group's searches and
        writes wait for a few lists' copy, not the whole group's (at 10M x 128, IVF-Flat, 8 shards, that was 6-13 s).
        The copy needs a few lists' bytes more, not the group's. A list written between them grows again, and counts
        as a change for the next pack. The pages past each packed list's entries are handed back
        (:func:`release_list_slack`: the allocator's size classes). Returns the lists packed (0: nothing changed since
        the last pack)."""
        with self.lock.write():
            changed, self._changed = self._changed, 0
        if not changed:
            return 0
        no = packed = 0
        while True:
            with self.lock.write():
                lists = self.lists
                if no >= lists.nlist:
                    return packed
                chunk, size = [], 0
                while no < lists.nlist and size < PACK_CHUNK_BYTES:
                    n = lists.list_size(no)
                    if n:
                        chunk.append(no)
                        size += n * (lists.code_size + 8)
                    no += 1
                _pack_lists(lists, chunk)
                packed += len(chunk)
            let_waiters_in()  # the searches and writes that waited

    def _free(self, slot: int) -> None:
        with self._slots:
            self._members.pop(slot, None)


class Membership:
    """One index's place in a :class:`ListGroup`: its tag, and the operations on its own entries."""

    def __init__(self, group: ListGroup, slot: int, shell):
        self.group = group
        self.slot = slot
        self.tag = slot << TAG_SHIFT
        self.shell = shell  # the index with empty lists: what a checkpoint of its entries is written into
        self._finalizer = None

    def tagged(self, labels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(labels, dtype=np.int64) | self.tag

    def selector(self):
        """FAISS's selector of this member's entries."""
        return faiss.IDSelectorRange(self.tag, self.tag + (1 << TAG_SHIFT))

    @staticmethod
    def untag(L: np.ndarray) -> np.ndarray:
        return np.where(L >= 0, L & LABEL_BITS, -1)

    def add(self, main, labels: np.ndarray, x: np.ndarray) -> None:
        """Adds vectors under ``labels`` (not present) to the group's lists, tagged, through ``main``: their lists
        and codes found first, outside the lock (the coarse quantization and encoding are most of an add), then
        appended under it (the same entries as ``add_with_ids``)."""
        codes = ivf_encode(main, x)  # in the lists a search finds them in, whatever the batch
        with self.group.lock.write():
            main.add_sa_codes(codes, self.tagged(labels))
            self.group._touch(len(labels))

    def remove(self, main, labels: np.ndarray) -> int:
        """Removes its entries of ``labels`` through ``main``; returns how many were removed."""
        with self.group.lock.write():
            removed = main.remove_ids(faiss.IDSelectorBatch(self.tagged(labels)))
            self.group._touch(removed)
        return removed

    def reconstruct(self, main, ivf, labels: np.ndarray, dim: int) -> np.ndarray:
        """Its stored vectors for ``labels`` (shard.index_reads.reconstruct_ivf over the group's lists)."""
        with self.group.lock.read():
            return reconstruct_ivf(main, ivf, self.tagged(labels), dim, False)

    def private_index(self, ntotal: int):
        """A new index of this member's entries alone, untagged, with lists of its own (for a checkpoint): the
        group's lists are read list by list under its read lock, so the others' writes go on between lists."""
        own = faiss.clone_index(self.shell)
        ivf = faiss.extract_index_ivf(own)
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        n = copy_entries(self.group.lists, lists, self.tag, 0, self.group.lock.read)
        assert n == ntotal, f"{n} entries in the group under this tag, for {ntotal} vectors"
        ivf.ntotal = n
        return own

    def release(self, ivf) -> None:
        """Removes this member's entries from the group and gives ``ivf`` empty lists of its own again."""
        if self._finalizer is not None:
            self._finalizer.detach()
        g = self.group
        with g.lock.write():
            g._touch(remove_tag(g.lists, self.tag))
            g._free(self.slot)
            g._purge()
        _own_empty_lists(ivf, ivf.nlist, ivf.code_size)  # not the group's: a pack may be changing them
        ivf.ntotal = 0
        g._left()


class ListGroups:
    """The list groups of one process's shards (shard.host.HostServicer holds one for its shards)."""

    def __init__(self):
        self._groups: dict[tuple, ListGroup] = {}
        self._lock = threading.Lock()

    def join(self, vindex, ivf, name: str, version: int) -> Membership | None:
        """Moves the entries of ``ivf`` (the IVF index of ``vindex``, trained version ``version`` of collection
        ``name``, with array lists of its own: :func:`eligible`) into the group of its trained index, tagged, and
        makes the group's lists its lists. The caller keeps its writes and searches out meanwhile (its write
        lock). Returns its membership; None when the group has no slot left (it keeps its own lists)."""
        own = faiss.downcast_InvertedLists(ivf.invlists)
        ivf.own_invlists = False  # the shell below gets empty lists; ``own`` is freed here, after the copy
        own.this.acquire()
        _own_empty_lists(ivf, ivf.nlist, ivf.code_size)
        shell = faiss.clone_index(vindex._main)  # trained, empty: what checkpoints are written into
        faiss.extract_index_ivf(shell).ntotal = 0
        digest = hashlib.blake2b(faiss.serialize_index(shell).tobytes(), digest_size=16).hexdigest()
        key = (name, int(version), digest)
        with self._lock:  # the slot taken under it: a group is let go only while it has no member
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = ListGroup(key, int(ivf.nlist), int(ivf.code_size), self._forget)
            slot = group._take_slot(vindex)
        if not slot:
            ivf.replace_invlists(own, True)
            own.this.disown()
            return None
        member = Membership(group, slot, shell)
        with group.lock.write():
            group._purge()
            group._touch(copy_entries(own, group.lists, member.tag, None))
            ivf.replace_invlists(group.lists, False)
        del own  # its lists freed
        member._finalizer = weakref.finalize(vindex, group._abandoned, slot)
        member._finalizer.atexit = False  # no thread started at the interpreter's exit
        return member

    def _forget(self, group: ListGroup) -> None:
        with self._lock:
            if self._groups.get(group.key) is group and group.empty():
                del self._groups[group.key]

    def groups(self) -> list[ListGroup]:
        with self._lock:
            return list(self._groups.values())
