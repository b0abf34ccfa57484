"""Operating-system helpers of a shard's storage and memory: a directory's fsync (what makes a rename or a new
file durable) and handing freed heap back to the OS.

Uses the standard library only.
"""

from __future__ import annotations

import ctypes

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


def release_memory() -> None:
    """Hands freed heap pages back to the OS. glibc keeps them after large transient work (loading, compaction,
    dropping a collection), which would otherwise show as resident memory the shard does not use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
