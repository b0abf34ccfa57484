"""Operating-system helpers of a shard's storage and memory: a directory's fsync (what makes a rename or a new
file durable) and handing freed heap back to the OS.

Uses the standard library only.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

# The environment of a shard's process (control/ray_placer.py gives it to every shard actor; the memory benchmarks
# and tests measure shards under it):
# - PYTHONMALLOC=malloc: Python's objects come from the C allocator rather than Python's own 1 MiB arenas. A load's
#   transient objects (request ids, log records, compaction's rows) fill arenas that a few long-lived objects born
#   meanwhile then keep resident: 16-29 bytes a vector at 300k-500k vectors a shard (docs/BENCHMARKS.md,
#   "Python's arenas and the checkpoint's freed heap"). The C allocator hands freed pages back at each trim
#   (release_memory).
# - MALLOC_ARENA_MAX=2: each gRPC thread would otherwise keep its own heap of freed request buffers.
# - MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB: large buffers are mapped and unmapped rather than kept in the heap.
SHARD_PROCESS_ENV = {"PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

# jemalloc's settings in a process of several shards (host_process_env): freed pages go back to the OS after a
# second (a background thread purges them), none are kept half-freed, and the address space they held is unmapped
# rather than kept (retain:false). Kept, a 10M load left 34 GB of it, and jemalloc's metadata, which covers the
# address space it has used and is never freed, at 129 MB; unmapped, 83 MB, and the process's RSS growth 563 bytes
# a vector against 571, the load and the searches no slower (docs/BENCHMARKS.md, "The allocator's size classes in
# the lists' buffers"; one run each).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,retain:false"


def bundled_jemalloc() -> str | None:
    """The jemalloc library Ray ships (``ray/core/libjemalloc.so``), or None without one. Ray is not imported."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "core", "libjemalloc.so")
    return path if os.path.isfile(path) else None


def host_process_env(preload: str = "") -> dict[str, str]:
    """What a process of several shards (shard.host) adds to :data:`SHARD_PROCESS_ENV`: jemalloc in place of
    glibc's allocator, where Ray ships one. ``preload``: the LD_PRELOAD the process would otherwise have.

    Its shards' IVF-PQ lists are searched as one index (shard.stacked), and FAISS's view of them allocates a buffer
    for each probed list, of its length (hundreds of KB at 10M x 128, IVF4096), 1,200 of them a batch of 100 at
    nprobe 12. In glibc's heap after a load, with the holes that the lists' growth and packing leave behind, each of
    those allocations walked the free lists: ``_int_malloc`` took 15-17% of the process's CPU (perf). Measured at 3M
    x 128, IVF4096,PQ32, 8 shards in one process, batch 100, right after the load (bench/host_bench.py;
    docs/BENCHMARKS.md, "What the shared process lost at 10M"): 60-65 ms of the process's CPU a batch with glibc,
    35-38 with jemalloc; at 10M 1.46x the QPS, at 25 bytes a vector more RAM.
    ``LOOKALIKE_SHARD_ALLOCATOR=glibc`` in the controller's environment keeps glibc's;
    ``LOOKALIKE_SHARD_MALLOC_CONF`` replaces :data:`JEMALLOC_CONF` (jemalloc's own syntax, e.g. that plus
    ",tcache:false": no thread caches, 15-30 bytes a vector less after a 2M load; docs/BENCHMARKS.md, "What a load
    leaves in a process of 8 shards")."""
    lib = bundled_jemalloc()
    if lib is None or os.environ.get("LOOKALIKE_SHARD_ALLOCATOR", "jemalloc") == "glibc":
        return {}
    conf = os.environ.get("LOOKALIKE_SHARD_MALLOC_CONF") or JEMALLOC_CONF
    return {"LD_PRELOAD": " ".join(p for p in (lib, preload) if p), "MALLOC_CONF": conf}


def _jemalloc_mallctl():
    """jemalloc's ``mallctl`` when this process allocates with jemalloc (preloaded: its symbols are global), else
    None. The allocator is chosen at the process's start, so this is looked up once."""
    try:
        return ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None


def _glibc():
    """glibc, where it is the C library (its ``malloc_trim`` and ``mallinfo2``), else None; looked up once."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_MALLCTL = _jemalloc_mallctl()
_LIBC = _glibc()


def release_memory() -> str:
    """Hands freed heap pages back to the OS. glibc keeps them after large transient work (loading, compaction,
    dropping a collection), which would otherwise show as resident memory the shard does not use; jemalloc (a
    process of several shards: host_process_env) keeps them until its decay. Returns the allocator that was asked
    ("jemalloc", "glibc", or "" for none)."""
    if _MALLCTL is not None:
        # "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's unused dirty pages go back to the OS
        _MALLCTL(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        return "jemalloc"
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:  # not glibc: nothing to do
        return ""
    trim(0)
    return "glibc"


def _usable_size():
    """The allocator's ``malloc_usable_size`` (jemalloc's where it is preloaded: the first global symbol), with
    libc's ``madvise``; None where either is missing. Looked up once."""
    try:
        this = ctypes.CDLL(None)
        usable, madvise = this.malloc_usable_size, this.madvise
    except (OSError, AttributeError):
        return None
    usable.restype, usable.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    madvise.restype, madvise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return usable, madvise


_USABLE = _usable_size()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux's


def release_slack(address: int, used: int) -> int:
    """Hands back to the OS the whole pages of a heap block past its first ``used`` bytes, up to the end of what
    the allocator gave it (``malloc_usable_size``); returns the bytes handed back. ``address``: the start of a
    block of this process's allocator (a ``std::vector``'s data, not a view into another buffer).

    An allocator gives a block of its size class, not of the size asked: jemalloc's large classes step by a quarter
    of a power of two, so a buffer of 1.25-2 MiB (an IVF-Flat list of a process's shards at 10M) is given up to 25%
    more, and a block reused from freed ones has those pages resident. Nothing reads past ``used`` (a vector's
    data past its size); a page handed back reads as zeros when next written, so a vector may still grow into it.
    Measured (bench/slack_bench.py, lists of 1.19 MiB on average packed under jemalloc): 48.2 bytes an entry
    resident past the codes and ids, 9.2 with the pages handed back; at 10M x 128, IVF4096,Flat, 8 shards in one
    process, 571 bytes a vector against 616 (docs/BENCHMARKS.md, "The allocator's size classes in the lists'
    buffers")."""
    if _USABLE is None or not address:
        return 0
    usable, madvise = _USABLE
    start = (address + used + _PAGE - 1) // _PAGE * _PAGE
    end = (address + usable(address)) // _PAGE * _PAGE
    if end <= start or madvise(start, end - start, _MADV_DONTNEED) != 0:
        return 0
    return end - start


# jemalloc's process-wide statistics (bytes; "stats.<name>" after an "epoch" refresh): what live allocations hold
# (allocated), the pages of their extents (active), what is resident, mapped, kept for reuse without pages (retained)
# and jemalloc's own bookkeeping (metadata)
_JEMALLOC_STATS = ("allocated", "active", "resident", "mapped", "retained", "metadata")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def allocator_stats() -> dict[str, int]:
    """Where the allocator's memory goes, in bytes, to tell the process's resident memory apart: what its live
    allocations hold and what it keeps free. jemalloc: ``allocated``, ``active``, ``resident``, ``mapped``,
    ``retained``, ``metadata`` (its "stats." names). glibc (``mallinfo2``): ``heap`` (its arenas' bytes from the
    OS), ``heap_in_use`` and ``heap_free`` (of those), ``mapped`` (large blocks mapped one by one); glibc's walks
    its free lists under each arena's lock (25 ms for a million free chunks here). Empty for another allocator."""
    if _MALLCTL is not None:
        epoch = ctypes.c_uint64(1)
        _MALLCTL(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(ctypes.sizeof(epoch)))  # refresh
        out = {}
        for name in _JEMALLOC_STATS:
            value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
            if _MALLCTL(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None,
                        ctypes.c_size_t(0)) == 0:
                out[name] = int(value.value)
        return out
    mallinfo2 = getattr(_LIBC, "mallinfo2", None)
    if mallinfo2 is None:  # not glibc, or one before 2.33
        return {}
    mallinfo2.restype = _MallInfo2
    mi = mallinfo2()
    return {"heap": int(mi.arena), "heap_in_use": int(mi.uordblks), "heap_free": int(mi.fordblks),
            "mapped": int(mi.hblkhd)}
