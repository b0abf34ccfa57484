"""`lookalike collection`: create, list, describe and drop collections.

May use: the base package, tools.cli.common and tools.cli.flags (and protobuf's JSON form of messages).
"""

from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict

from lookalike.errors import InvalidArgument
from lookalike.payloads import parse_schema
from tools.cli.common import UserError, metric_name, open_client
from tools.cli.flags import non_negative_int, positive_int, with_target


def cmd_collection(args) -> int:
    if args.action == "create" and not args.dim and not args.encoder:
        raise UserError(f"--dim is required for a collection without --encoder: the components of each vector (bits "
                        f"for --metric hamming), e.g. `lookalike collection create {args.name} --dim 128`; or give "
                        "--encoder (its dimension is the encoder's)")
    if args.action == "create":
        try:
            parse_schema(args.filterable)
        except InvalidArgument as err:
            raise UserError(f"--filterable: {err}") from None
    with open_client(args) as c:
        if args.action == "create":
            info = c.create_collection(args.name, args.dim, args.metric, args.index, args.buckets, args.replication,
                                       nprobe=args.nprobe, ef_search=args.ef_search, encoder=args.encoder,
                                       gpu_float16=args.gpu_float16, filterable=args.filterable)
            print(json.dumps(MessageToDict(info.spec)))
        elif args.action == "list":
            for info in c.list_collections():
                s = info.spec
                print(f"{s.name}\titems={info.count}\tdim={s.dim}\tmetric={metric_name(s.metric)}\tindex={s.index}\t"
                      f"buckets={s.buckets}")
        elif args.action == "describe":
            info = c.describe_collection(args.name)
            print(json.dumps({**MessageToDict(info.spec), "count": info.count, "epoch": info.epoch,
                              "training": MessageToDict(info.training)}))
        elif args.action == "drop":
            c.drop_collection(args.name)
            print(f"dropped {args.name}")
    return 0


def add_collection(sub) -> None:
    """The `collection` subcommand and its actions."""
    c = sub.add_parser("collection", help="create, list, describe, drop collections")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    cc = with_target(csub.add_parser("create", help="a new collection: dimension, metric, index, buckets, copies"))
    cc.add_argument("name", help="the collection's name")
    cc.add_argument("--dim", type=positive_int, default=0,
                    help="components per vector (bits for hamming); required without --encoder, whose dimension it "
                         "is otherwise")
    cc.add_argument("--metric", choices=["l2", "ip", "cosine", "hamming"], default="",
                    help="distance (default l2, or the encoder's)")
    cc.add_argument("--encoder", default="", metavar="NAME",
                    help="encoder that turns images into this collection's vectors: %(encoders)s (default: none, "
                         "vectors only; docs/ENCODERS.md)")
    cc.add_argument("--index", default="Flat", help="FAISS factory string, e.g. Flat, IVF1024,Flat, IVF4096,PQ16, "
                    "HNSW32 (default %(default)s)")
    cc.add_argument("--buckets", type=positive_int, default=0, help="buckets the ids hash into, fixed for the collection's "
                    "life (default 0: the server's, 1024)")
    cc.add_argument("--replication", "--replicas", dest="replication", type=positive_int, default=0,
                    help="copies of each bucket, each on another shard (default 0: 1); --replicas is the same flag")
    cc.add_argument("--nprobe", type=non_negative_int, default=0,
                    help="IVF indexes: inverted lists a search probes unless it asks for another number (default "
                         "0: the server's, 16)")
    cc.add_argument("--ef-search", type=non_negative_int, default=0,
                    help="HNSW indexes: search breadth unless a search asks for another (default 0: the server's, 64)")
    cc.add_argument("--filterable", default="", metavar="NAME:TYPE,...",
                    help="payload fields the shards index for search --filter, e.g. category:string,price:float,"
                         "seller:string; types string, int, float, bool, timestamp, string_list, int_list (default: "
                         "none)")
    cc.add_argument("--gpu-float16", action="store_true",
                    help="on GPU shards: float16 vectors (Flat) or lookup tables (IVF-PQ)")
    with_target(csub.add_parser("list", help="one line per collection"))
    with_target(csub.add_parser("describe", help="a collection's spec, count, epoch and training, as JSON")
                ).add_argument("name", help="the collection's name")
    with_target(csub.add_parser("drop", help="delete a collection and all its items")).add_argument(
        "name", help="the collection's name")
    c.set_defaults(func=cmd_collection)
