"""Tries index specs the way a shard would use them, each in a forked child so that a FAISS abort kills only it.

Run by tests/test_specs.py in a process of its own (forking the test process, with Ray's and gRPC's threads, is not
safe). Reads a JSON list of [spec, dim, metric] from stdin; prints a JSON list of outcomes, one per spec:
"refused" (InvalidArgument from the collection config), "ok" (validated, then trained, written, searched, removed
from and written again without error), or what went wrong ("signal N", "exit N", "error: ...").
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

REFUSED, FAILED = 3, 4


def _exercise(spec: str, dim: int, metric: str) -> None:
    from lookalike.config import CollectionConfig
    from lookalike.errors import InvalidArgument
    from shard.cpu_index import VectorIndex
    from shard.specs import check_index_spec

    try:
        cfg = CollectionConfig("t", dim, metric, spec, buckets=4).validated()
        check_index_spec(cfg.dim, cfg.metric, cfg.index)
    except InvalidArgument:
        os._exit(REFUSED)
    index = VectorIndex(cfg)
    rng = np.random.default_rng(0)
    n = min(index.train_size, 20_000) + 64 if not index.trained else 256
    cols = dim // 8 if cfg.binary else dim
    x = (rng.integers(0, 256, (n, cols), dtype=np.uint8) if cfg.binary
         else rng.normal(size=(n, cols)).astype(np.float32))
    labels = np.arange(n, dtype=np.int64)
    for s in range(0, n, 4096):
        index.add(labels[s:s + 4096], x[s:s + 4096])
    index.train_if_ready()
    index.search(x[:5], 10)
    index.remove(labels[:10])
    index.add(labels[:10], x[:10])
    index.search(x[:5], 10, nprobe=1, ef_search=1)
    index.reconstruct(labels[10:12])


def main() -> int:
    cases = json.load(sys.stdin)
    # What every child imports, imported once here before the forks (each child would import it again: about 0.3 s
    # a spec). Importing FAISS starts none of OpenMP's threads, so forking after it is safe.
    import shard.cpu_index  # noqa: F401
    import shard.specs  # noqa: F401

    out = []
    for spec, dim, metric in cases:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _exercise(spec, dim, metric)
            except Exception as err:  # noqa: BLE001: reported to the parent
                os.write(w, f"error: {type(err).__name__}: {str(err)[:300]}".encode())
                os._exit(FAILED)
            os._exit(0)
        os.close(w)
        msg = b""
        while chunk := os.read(r, 4096):
            msg += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            out.append(f"signal {os.WTERMSIG(status)}")
        elif os.WEXITSTATUS(status) == 0:
            out.append("ok")
        elif os.WEXITSTATUS(status) == REFUSED:
            out.append("refused")
        else:
            out.append(msg.decode() or f"exit {os.WEXITSTATUS(status)}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
