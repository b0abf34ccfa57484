"""What FAISS's polysemous training costs a collection's training, and what turning it off changes in its answers.

    python -m bench.train_bench                                   # IVF1024,PQ32 and IVF4096,PQ32 at 128 dims: ~5 min
    python -m bench.train_bench --specs "IVF256,PQ16" --dim 64    # the spec of tests/test_sizing.py

FAISS's factory asks for polysemous training on every "PQ<m>" code not marked "np"; lookalike's shards turn it off
(shard.specs.without_polysemous_training). For each spec this trains it twice on the sample a collection trains on
(lookalike.indexspec.training_points; bench.timing.make_data's clustered vectors), with and without, and times
both; then it fills both with the same vectors and compares their top 10 at nprobe 16 (the share of queries
answered with the same ids in the same order). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.scale_common import log
from bench.timing import make_data, write_results
from lookalike.indexspec import training_points
from shard.specs import without_polysemous_training


def _trained(spec: str, dim: int, x: np.ndarray, polysemous: bool):
    """(index of ``spec`` trained on ``x``, seconds the training took)."""
    import faiss

    index = faiss.index_factory(dim, spec)
    if not polysemous:
        without_polysemous_training(index)  # what the shards do
    t = time.perf_counter()
    index.train(x)
    return index, time.perf_counter() - t


def run(args) -> dict:
    import faiss

    out: dict = {"dim": args.dim, "threads": faiss.omp_get_max_threads(), "rows": []}
    for spec in args.specs.split(";"):
        n = args.n or training_points(spec)[1]
        x, xq = make_data(n + args.fill, args.dim, args.queries, args.seed)
        sample, fill = x[:n], x[n:]
        row: dict = {"spec": spec, "points": n}
        answers = []
        for polysemous in (True, False):
            index, seconds = _trained(spec, args.dim, sample, polysemous)
            row["seconds_with" if polysemous else "seconds_without"] = seconds
            log(f"{spec}: trained on {n} x {args.dim} {'with' if polysemous else 'without'} polysemous training "
                f"in {seconds:.1f} s")
            index.add(fill)
            faiss.extract_index_ivf(index).nprobe = 16
            answers.append(index.search(xq, 10)[1])
        row["ratio"] = row["seconds_with"] / row["seconds_without"]
        row["same_answers"] = float(np.mean((answers[0] == answers[1]).all(axis=1)))
        out["rows"].append(row)
    return out


def report(out: dict) -> str:
    lines = [f"dim {out['dim']}, FAISS on {out['threads']} threads; same answers: the share of queries with the same "
             "top 10 ids in the same order (nprobe 16)", "",
             "| spec | training points | with polysemous s | without s | with / without | same answers |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        lines.append(f"| {r['spec']} | {r['points']} | {r['seconds_with']:.1f} | {r['seconds_without']:.1f} | "
                     f"{r['ratio']:.1f}x | {r['same_answers']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", default="IVF1024,PQ32;IVF4096,PQ32", help="';'-separated IVF-PQ specs")
    p.add_argument("--dim", type=int, default=128, help="dimension (default 128)")
    p.add_argument("--n", type=int, default=0, help="training points (default: the sample a collection trains on)")
    p.add_argument("--fill", type=int, default=100_000, help="vectors added to compare the answers (default 100000)")
    p.add_argument("--queries", type=int, default=200, help="queries compared (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/train_bench.json", help="JSON results")
    args = p.parse_args(argv)
    out = run(args)
    print(report(out))
    write_results(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
