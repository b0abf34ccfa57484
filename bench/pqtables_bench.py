"""IVF-PQ's precomputed distance tables: should a shard keep them, or compute each probed list's table per search?
In-process, no cluster.

    python -m bench.pqtables_bench [--n 2000000] [--specs "IVF4096,PQ32;IVF1024,PQ16;..."]
                                   [--shards 1,2,4,8] [--nprobe 12] [--out bench/out/pqtables.json]

FAISS's IndexIVFPQ keeps, for L2 over residuals, a table of nlist x M x 2^nbits floats (``use_precomputed_table``
1, its default under 2 GB): 128 MiB at IVF4096,PQ32. Every shard holding the collection's trained index holds the
same table. Without it (``use_precomputed_table`` -1) a search computes each probed list's table from the query's
residual (d x 2^nbits flops instead of reading M x 2^nbits floats).

For each spec: one index trained on ``--train-per-list`` points per list; n vectors (bench.timing.make_data) split
over S shards as the cluster splits them (vector ``str(i)``'s bucket modulo S, bench.preassign_bench), each shard
a clone of the trained empty index; the coarse assignment made once (as the router does) and
``search_preassigned`` on each shard one after another, FAISS on one thread: CPU time per query (total work, not
parallelism) at batch ``--batch``, least of ``--repeats`` runs, the two settings taking turns. Also checks that
both settings return the same ids (up to ties at float rounding).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import numpy as np

from bench.preassign_bench import add_assigned, clone_empty, log, shard_of
from bench.timing import make_data, write_results
from shard.specs import without_polysemous_training


def _set_tables(shards: list, mode: int) -> None:
    import faiss

    for s in shards:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(s))
        ivf.use_precomputed_table = mode
        ivf.precompute_table()


def _search(shards: list, xq, Iq, Dq, k: int):
    """search_preassigned on every shard, merged: (D, I) shape (nq, k)."""
    import faiss

    parts = [s.search_preassigned(xq, k, Iq, Dq) for s in shards]
    return parts[0] if len(parts) == 1 else faiss.merge_knn_results(np.stack([p[0] for p in parts]),
                                                                     np.stack([p[1] for p in parts]))


def _cpu_per_query(shards: list, xq, Iq, Dq, k: int, batch: int) -> float:
    t = time.process_time()
    for s in range(0, len(xq), batch):
        _search(shards, xq[s:s + batch], Iq[s:s + batch], Dq[s:s + batch], k)
    return (time.process_time() - t) / len(xq)


def run(args) -> dict:
    import faiss

    threads = faiss.omp_get_max_threads()
    xb, xq = make_data(args.n, args.dim, args.queries, args.seed)
    out = {"args": vars(args), "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "faiss": faiss.__version__, "machine": platform.machine(), "rows": []}
    sh = shard_of(args.n, args.buckets, max(args.shards))
    for spec in args.specs.split(";"):
        faiss.omp_set_num_threads(threads)
        trained = without_polysemous_training(faiss.index_factory(args.dim, spec))  # as the shards train it
        ivf = faiss.extract_index_ivf(trained)
        ntrain = min(args.n, args.train_per_list * ivf.nlist)
        trained.train(xb[np.sort(np.random.default_rng(args.seed).choice(args.n, ntrain, replace=False))])
        _, assign = ivf.quantizer.search(xb, 1)
        Dq, Iq = ivf.quantizer.search(xq, args.nprobe)
        pq = faiss.downcast_index(ivf).pq
        table_mib = ivf.nlist * pq.M * pq.ksub * 4 / 2**20
        log(f"{spec}: trained on {ntrain}; tables {table_mib:.0f} MiB")
        for S in args.shards:
            faiss.omp_set_num_threads(threads)
            shards = [clone_empty(trained) for _ in range(S)]
            for s in range(S):
                shards[s].nprobe = args.nprobe
                sel = np.flatnonzero(sh % S == s)
                add_assigned(shards[s], xb[sel], sel, assign[sel, 0])
            faiss.omp_set_num_threads(1)
            modes = {"tables": 1, "no tables": -1}
            best, ids = dict.fromkeys(modes, float("inf")), {}
            for _ in range(args.repeats):
                for name, mode in modes.items():  # taking turns
                    _set_tables(shards, mode)
                    best[name] = min(best[name], _cpu_per_query(shards, xq, Iq, Dq, args.k, args.batch))
                    ids[name] = _search(shards, xq, Iq, Dq, args.k)[1]
            same = float(np.mean([set(a) == set(b) for a, b in zip(ids["tables"].tolist(),
                                                                   ids["no tables"].tolist())]))
            row = {"spec": spec, "table_mib": table_mib, "shards": S, "list_per_shard": args.n / ivf.nlist / S,
                   "tables_us": best["tables"] * 1e6, "no_tables_us": best["no tables"] * 1e6,
                   "ratio": best["no tables"] / best["tables"], "same_ids": same}
            out["rows"].append(row)
            log(f"  S={S}: tables {row['tables_us']:.0f} us/query, none {row['no_tables_us']:.0f} "
                f"({row['ratio']:.2f}x), same ids {same:.3f}")
            del shards
    return out


def markdown(out: dict) -> str:
    lines = ["| spec | tables MiB | shards | codes a list a shard | CPU us/query, tables | without | without / with "
             "| same ids |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        lines.append(f"| {r['spec']} | {r['table_mib']:.0f} | {r['shards']} | {r['list_per_shard']:.0f} | "
                     f"{r['tables_us']:.0f} | {r['no_tables_us']:.0f} | {r['ratio']:.2f} | {r['same_ids']:.3f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pqtables_bench", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--specs", default="IVF4096,PQ32;IVF4096,PQ16;IVF1024,PQ32;IVF1024,PQ16;IVF256,PQ32;IVF64,PQ16",
                   help="factory strings separated by ';'")
    p.add_argument("--shards", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--nprobe", type=int, default=12)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-per-list", type=int, default=39)
    p.add_argument("--buckets", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/pqtables.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    write_results(out, args.out)
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
