"""What a pack of a process's shared IVF lists leaves resident past their entries (shard.list_groups).

    python -m bench.slack_bench                       # IVF-Flat-shaped lists: 1024 lists of 1.25 MiB on average
    python -m bench.slack_bench --code-size 32        # IVF-PQ32-shaped: 78 KiB
    python -m bench.slack_bench --keep-slack          # the pack without handing the pages back (the code before)
    python -m bench.slack_bench --chunk-mib 100000    # the whole pack under one hold of the lock

One ``ListGroup`` (no shard, no Ray) in a process allocating as a process of several shards does (jemalloc, its
settings: shard.osutil.host_process_env; the benchmark starts itself again under them). Its lists are filled 10,000
entries at a time, spread over the lists by lognormal weights (their sizes vary as a trained index's do), then
packed. Prints the resident memory growth per entry after the fill and after the pack, against the entries' own
bytes (code and 8-byte id), with jemalloc's allocated and resident bytes. While the pack runs, a thread takes the
group's read lock as a search does, again and again: the longest it waited is how long a search of the group's
shards waits for the pack.

The lists' shape is a 10M x 128 IVF4096 collection's in one process (2,441 entries a list): only the entries per
list and their size set the allocator's rounding, so ``--lists`` 1024 and ``--n`` 2.5M stand for it at a quarter of
its memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import faiss
import numpy as np
import psutil

import shard.list_groups as lg
from shard.osutil import allocator_stats, host_process_env


def _fill(group, n: int, nlist: int, code_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.5, nlist)
    weights /= weights.sum()
    codes = rng.integers(0, 255, (10_000, code_size), dtype=np.uint8)
    for start in range(0, n, 10_000):
        lists_of = np.sort(rng.choice(nlist, min(10_000, n - start), p=weights))
        bounds = np.searchsorted(lists_of, np.arange(nlist + 1))
        for no in np.flatnonzero(np.diff(bounds)):
            a, b = int(bounds[no]), int(bounds[no + 1])
            ids = np.arange(start + a, start + b, dtype=np.int64) | (1 << lg.TAG_SHIFT)
            part = np.ascontiguousarray(codes[a:b])
            group.lists.add_entries(int(no), b - a, faiss.swig_ptr(ids), faiss.swig_ptr(part))
        group._touch(len(lists_of))  # as a member's write counts its entries (the pack packs only after changes)


class _reader(threading.Thread):
    """Takes the group's read lock, as a search does, until ``done``; ``longest``: its longest wait (s)."""

    def __init__(self, group):
        super().__init__(daemon=True)
        self.group, self.done, self.longest, self.count = group, False, 0.0, 0
        self.start()

    def run(self) -> None:
        while not self.done:
            t = time.perf_counter()
            with self.group.lock.read():
                self.longest = max(self.longest, time.perf_counter() - t)
                self.count += 1
            time.sleep(0.0005)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2_500_000)
    ap.add_argument("--lists", type=int, default=1024)
    ap.add_argument("--code-size", type=int, default=512, help="bytes a code (IVF-Flat x 128: 512; PQ32: 32)")
    ap.add_argument("--keep-slack", action="store_true", help="the pack without handing back the pages")
    ap.add_argument("--chunk-mib", type=float, default=lg.PACK_CHUNK_BYTES / 2**20,
                    help="entries copied under one hold of the lock (MiB)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    env = host_process_env()
    if env.get("LD_PRELOAD") and os.environ.get("LD_PRELOAD") != env["LD_PRELOAD"]:
        os.execve(sys.executable, [sys.executable, "-m", "bench.slack_bench", *sys.argv[1:]], {**os.environ, **env})
    if args.keep_slack:
        lg.release_list_slack = lambda lists, nos=None: 0
    lg.PACK_CHUNK_BYTES = int(args.chunk_mib * 2**20)
    rss0 = psutil.Process().memory_info().rss
    group = lg.ListGroup(("bench", 1, ""), args.lists, args.code_size)
    entry = args.code_size + 8

    def report(state: str) -> None:
        stats = allocator_stats()
        rss = psutil.Process().memory_info().rss - rss0
        print(f"{state:>6}: resident growth {rss / args.n:6.1f} bytes an entry ({entry} of code and id: "
              f"{rss / args.n - entry:+.1f}); jemalloc allocated {stats.get('allocated', 0) / args.n:.1f}, "
              f"resident {stats.get('resident', 0) / args.n:.1f}", flush=True)

    t = time.perf_counter()
    _fill(group, args.n, args.lists, args.code_size, args.seed)
    print(f"filled {args.n} entries into {args.lists} lists in {time.perf_counter() - t:.1f}s "
          f"({args.n / args.lists:.0f} a list, {args.n / args.lists * args.code_size / 2**20:.2f} MiB of codes); "
          f"allocator: {os.environ.get('LD_PRELOAD') or 'the C library'}; "
          f"slack {'kept' if args.keep_slack else 'handed back'}", flush=True)
    report("filled")
    t = time.perf_counter()
    waits = _reader(group)
    group.pack()
    waits.done = True
    waits.join()
    print(f"packed in {time.perf_counter() - t:.2f}s, {lg.PACK_CHUNK_BYTES / 2**20:g} MiB a hold of the lock; a reader "
          f"took it {waits.count} times meanwhile, the longest wait {1e3 * waits.longest:.1f} ms", flush=True)
    time.sleep(3)  # jemalloc's background thread purges the freed buffers' pages (dirty_decay_ms 1000)
    report("packed")


if __name__ == "__main__":
    main()
