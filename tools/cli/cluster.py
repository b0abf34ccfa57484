"""The cluster as a whole: `lookalike status` (shards, buckets, moves), `rebalance` (add shards, move buckets, follow
the moves) and `size` (shards, nodes and memory for a catalog, and a kustomize overlay).

May use: tools.sizing, tools.storage_sizing, tools.cli.common and tools.cli.flags (and protobuf's JSON form of messages).
"""

from __future__ import annotations

import json
import sys
import time

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from tools import sizing, storage_sizing
from tools.cli.common import UserError, metric_name, one_line, open_client
from tools.cli.flags import byte_size, non_negative_int, number, positive_float, positive_int, with_target


def cmd_status(args) -> int:
    with open_client(args) as c:
        st = c.status()
    if args.json:
        print(json.dumps(MessageToDict(st, always_print_fields_with_no_presence=True)))
        return 0
    print(f"epoch {st.epoch}, {len(st.shards)} shard(s), {len(st.collections)} collection(s)")
    print(f"{'shard':<10} {'serving':<8} {'address':<22} {'vectors':>10} {'index MiB':>10} {'RSS MiB':>8} "
          f"{'cap MiB':>8}")
    for s in st.shards:
        cap = f"{s.capacity_bytes / 2**20:.0f}" if s.capacity_bytes else "-"
        print(f"{s.shard_id:<10} {str(s.serving):<8} {s.address:<22} {s.vectors:>10} "
              f"{s.index_bytes / 2**20:>10.1f} {s.memory_bytes / 2**20:>8.1f} {cap:>8}")
        for c in s.collections:  # bucket counts are per collection: each collection has buckets of its own
            joining = f", {c.joining} joining" if c.joining else ""
            print(f"  {c.collection}: {c.buckets} bucket(s){joining}, {c.vectors} vectors")
        for d in s.damaged:  # storage files kept aside (docs/ARCHITECTURE.md, Storage)
            print(f"  DAMAGED {d}")
        if s.problem:  # e.g. Ray cannot place it: the moves onto it wait
            print(f"  {s.shard_id} {s.problem}")
    for info in st.collections:
        print(f"collection {info.spec.name}: {info.count} items, dim {info.spec.dim}, "
              f"{metric_name(info.spec.metric)}, {info.spec.index}, {info.spec.buckets} buckets, "
              f"replication {info.spec.replication or 1}")
        if info.training.state not in (0, info.training.NOT_NEEDED):  # IVF/PQ/SQ: where its training stands
            print(f"  index: {info.training.message}")
    if st.moves or st.moves_done or st.moves_failed:
        print(_move_summary(st))
        groups: dict[tuple, list[int]] = {}
        for m in st.moves:
            groups.setdefault((m.collection, m.source, m.target, m.phase), []).append(m.bucket)
        for (coll, src, dst, phase), buckets in groups.items():
            print(f"  {coll}: {len(buckets)} bucket(s) {src} -> {dst} [{phase}]")
    return 0


def _move_summary(st) -> str:
    """ClusterStatus's move counts, labelled as what they are: moves_done and moves_failed count moves (each of one
    or more buckets) since the controller started, not since this rebalance; st.moves lists buckets."""
    return (f"bucket moves: {len(st.moves)} bucket(s) still to move; since the controller started, "
            f"{st.moves_done} move(s) done and {st.moves_failed} failed and retried (a move carries one or more "
            "buckets)")


def cmd_rebalance(args) -> int:
    """Queues the moves (after starting --add-shards shards), then follows them (unless --no-wait) until none is
    left and the shards serve. Exits 1 instead when a shard cannot start (Ray cannot place it: the moves onto it
    would wait for it) or after --timeout; Ctrl-C stops following. The moves go on in the cluster either way."""
    st = None
    try:
        with open_client(args) as c:
            resp = c.rebalance(args.name or "", args.add_shards)
            print(f"{resp.moves} move(s) queued over {resp.shards} shard(s) (epoch {resp.epoch})")
            if args.no_wait:
                return 0
            for st in _follow_moves(c, args.timeout, args.add_shards > 0, args.quiet):
                pass
    except KeyboardInterrupt:
        left = f"{len(st.moves)} bucket(s) still to move; " if st is not None else ""
        print(f"\nstopped following the rebalance: {left}the moves go on in the cluster (`lookalike status` shows "
              "them)", file=sys.stderr)
        return 130
    stuck = [s for s in st.shards if s.problem]
    starting = ", ".join(s.shard_id for s in st.shards if not s.serving)
    if not st.moves and not stuck and not (args.add_shards and starting):
        print(_move_summary(st))
        return 0
    for s in stuck:
        waiting = sum(m.target == s.shard_id or m.source == s.shard_id for m in st.moves)
        print(f"error: shard {s.shard_id} {s.problem}; {waiting} bucket(s) wait for it and move once it starts "
              "(free or add Ray resources: a restart of `lookalike serve` sizes its embedded Ray for the shards in "
              "storage)", file=sys.stderr)
    if not stuck:
        print(f"error: stopped waiting after {args.timeout:g}s: {len(st.moves)} bucket(s) still to move"
              f"{f' and shard(s) {starting} not serving yet' if starting else ''}; the moves go on in the cluster "
              "(`lookalike status` shows them)", file=sys.stderr)
    print(_move_summary(st), file=sys.stderr)
    return 1


def _follow_moves(c, timeout: float, shards_added: bool, quiet: bool = False):
    """Yields the cluster status about twice a second, with a progress bar, until no bucket is left to move (and,
    with ``shards_added``, every shard serves), a shard cannot start, or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    st = c.status()
    total = len(st.moves)
    with tqdm(total=total, unit="bucket", desc="moving buckets", disable=True if quiet else None) as bar:
        while True:
            yield st
            starting = [s.shard_id for s in st.shards if not s.serving]
            bar.n = max(0, total - len(st.moves))
            bar.set_postfix_str(f"{', '.join(starting)} starting" if starting else "", refresh=False)
            bar.refresh()
            if (not st.moves and not (shards_added and starting) or any(s.problem for s in st.shards)
                    or time.monotonic() >= deadline):
                return
            time.sleep(0.5)
            st = c.status()


def cmd_size(args) -> int:
    try:
        p = sizing.plan(args.vectors, args.dim, args.index, args.metric, args.replication, args.node_memory,
                        args.shards_per_node, args.headroom, args.reserve, args.id_bytes, args.payload_bytes,
                        args.gpu_memory, args.gpu_float16, allocatable=args.node_allocatable,
                        daemonset_memory=args.daemonset_memory,
                        shard_cpus=args.shard_cpus or (8.0 if args.overlay == "gpu" else 2.0), node_cpus=args.node_cpus,
                        daemonset_cpus=args.daemonset_cpus, shards_per_process=args.shards_per_process)
        vol = storage_sizing.volume(args.vectors, args.dim, args.index, args.metric, args.replication, p.shards,
                                    args.id_bytes, args.payload_bytes, args.buckets, args.disk_headroom)
    except ValueError as err:  # lookalike.errors.InvalidArgument (a spec outside the grammar) is a ValueError
        raise UserError(one_line(err)) from None
    print(sizing.report(p, args.dim, args.index))
    print("\n".join(storage_sizing.report(vol, args.vectors, args.replication)))
    if args.kustomize:
        try:
            files = sizing.write_kustomize(p, args.kustomize, args.overlay, volume=storage_sizing.k8s_storage(vol.size))
        except ValueError as err:
            raise UserError(one_line(err)) from None
        print(f"overlay: {', '.join(files)} (kubectl apply -k {args.kustomize}/storage, then kubectl apply -k "
              f"{args.kustomize})")
    return 0


def add_status(sub) -> None:
    """The `status` subcommand."""
    st = with_target(sub.add_parser("status", help="shards, buckets, vectors, memory, bucket moves"))
    st.add_argument("--json", action="store_true", help="print the whole status as JSON")
    st.set_defaults(func=cmd_status)


def add_rebalance(sub) -> None:
    """The `rebalance` subcommand."""
    rb = with_target(sub.add_parser("rebalance", help="add shards and move buckets until the load is even"))
    rb.add_argument("name", nargs="?", default="", help="the collection (default: every collection)")
    rb.add_argument("--add-shards", type=non_negative_int, default=0, help="shards to start first (default %(default)s)")
    rb.add_argument("--no-wait", action="store_true", help="return once the moves are queued")
    rb.add_argument("--timeout", type=positive_float, default=3600.0,
                    help="seconds to follow the moves before giving up with exit status 1 (default %(default)s); a "
                         "shard that cannot start ends it at once")
    rb.add_argument("--quiet", action="store_true", help="no progress bar")
    rb.set_defaults(func=cmd_rebalance)


def add_size(sub) -> None:
    """The `size` subcommand."""
    sz = sub.add_parser("size", help="memory per vector, shards, nodes and memory requests for a catalog")
    sz.add_argument("--vectors", type=non_negative_int, required=True, help="items in the catalog (required)")
    sz.add_argument("--dim", type=positive_int, required=True, help="components per vector, bits for hamming (required)")
    sz.add_argument("--index", default="Flat", help="FAISS factory string (default %(default)s)")
    sz.add_argument("--metric", choices=["l2", "ip", "cosine", "hamming"], default="l2",
                    help="distance (default %(default)s)")
    sz.add_argument("--replication", "--replicas", dest="replication", type=positive_int, default=1,
                    help="copies of each item, as `collection create --replication` (default %(default)s); "
                         "--replicas is the same flag")
    sz.add_argument("--node-memory", type=byte_size, default="64Gi",
                    help="memory of each shard node (the machine); its pod gets the node's allocatable memory less "
                         "--daemonset-memory (default %(default)s)")
    sz.add_argument("--node-allocatable", type=byte_size, default=None,
                    help="allocatable memory of each shard node (kubectl get node NODE -o "
                         "jsonpath='{.status.allocatable.memory}') (default: --node-memory less the kubelet's and "
                         "the system's reserve as GKE and AKS compute it)")
    sz.add_argument("--daemonset-memory", type=byte_size, default="1Gi",
                    help="memory the DaemonSets' pods take on each node: CNI, logs, monitoring (default %(default)s)")
    sz.add_argument("--shards-per-node", type=positive_int, default=1, help="shards on each node (default %(default)s)")
    sz.add_argument("--shards-per-process", type=positive_int, default=1,
                    help="shards sharing one process, as `serve --shards-per-process`, at most --shards-per-node: "
                         "they share its fixed memory, and it allocates with jemalloc (default %(default)s)")
    sz.add_argument("--shard-cpus", type=number(float, above=0), default=None,
                    help="CPUs of each shard, as `serve --shard-cpus` (default: the overlay's, 2 for cpu and 8 for "
                         "gpu)")
    sz.add_argument("--node-cpus", type=number(float, above=0), default=None,
                    help="CPUs of each shard node, to check that --shards-per-node x --shard-cpus fits its "
                         "allocatable CPUs less --daemonset-cpus (default: not checked)")
    sz.add_argument("--daemonset-cpus", type=number(float, low=0), default=0.5,
                    help="CPUs the DaemonSets' pods take on each node (default %(default)s)")
    sz.add_argument("--reserve", type=byte_size, default="2Gi",
                    help="memory of a worker pod kept for Ray itself (default %(default)s)")
    sz.add_argument("--headroom", type=number(float, low=0, high=0.99), default=0.3,
                    help="share of room left for growth, 0 to 0.99 (default %(default)s)")
    sz.add_argument("--id-bytes", type=non_negative_int, default=16, help="mean id length in bytes (default %(default)s)")
    sz.add_argument("--payload-bytes", type=non_negative_int, default=0,
                    help="mean serialized payload bytes (default %(default)s)")
    sz.add_argument("--gpu-memory", type=byte_size, default="0",
                    help="memory of each GPU, for GPU shards, e.g. 80Gi (default 0: CPU shards)")
    sz.add_argument("--gpu-float16", action="store_true", help="float16 vectors on the GPU (Flat)")
    sz.add_argument("--buckets", type=positive_int, default=1024,
                    help="buckets of the collection, for the room bucket moves take on the volume (default "
                         "%(default)s)")
    sz.add_argument("--disk-headroom", type=number(float, low=0, high=0.99), default=0.3,
                    help="share of the volume left free at its peak, 0 to 0.99 (default %(default)s)")
    sz.add_argument("--kustomize", metavar="DIR",
                    help="write a kustomize overlay with these sizes to DIR, and the data's claim to DIR/storage")
    sz.add_argument("--overlay", choices=["cpu", "gpu"], default="cpu",
                    help="the overlay it builds on (default %(default)s)")
    sz.set_defaults(func=cmd_size)
