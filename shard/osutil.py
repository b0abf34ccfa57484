"""Operating-system helpers of a shard's storage and memory: a directory's fsync (what makes a rename or a new
file durable) and handing freed heap back to the OS.

Uses the standard library only.
"""

from __future__ import annotations

import ctypes


def release_memory() -> None:
    """Hands freed heap pages back to the OS. glibc keeps them after large transient work (loading, compaction,
    dropping a collection), which would otherwise show as resident memory the shard does not use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
