"""The internal Shard gRPC service: a thin servicer over :class:`shard.shard.Shard`.

Uses the shard, jobs (checks of a clustering job's centroids), protos and the base package.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jobs import check_centroids
from lookalike import tracing
from lookalike.config import RPC, check_answer_size, check_search_params
from lookalike.errors import InvalidArgument, Unavailable
from lookalike.filters import check_filter
from lookalike.health import HealthChecker
from lookalike.ids import check_ids
from lookalike.metrics import ServerMetrics
from lookalike.net import abort_on_error, create_server
from lookalike.wire import (check_k, payload_from_bytes, payloads_from_proto, vectors_from_proto, vectors_from_proto_raw,
                            vectors_to_proto)
from protos import shard_pb2, shard_pb2_grpc
from shard.admission import WriteGate, check_call
from shard.health import shard_probe
from shard.shard import Shard

SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name


@dataclasses.dataclass
class Answer:
    """A search's top k on a shard (or merged over several): D (nq, k) float32, L (nq, k) int64 labels (-1: none),
    the slots' ids packed (UTF-8 bytes back to back, uint16 byte lengths: IdTable.packed_at), payloads (a flat
    list, None where empty) or None, the plan of a filtered search, and the metric's direction."""

    D: np.ndarray
    L: np.ndarray
    id_bytes: bytes
    id_lengths: np.ndarray
    payloads: list | None
    plan: str
    larger_is_better: bool


def pick_slots(answers: list[Answer], src: np.ndarray) -> tuple[bytes, np.ndarray, list | None]:
    """The packed ids (bytes, uint16 lengths) and payloads of the slots ``src`` of several answers: indexes into
    their slots end to end (-1: none), one output slot each."""
    lengths = np.concatenate([np.asarray(a.id_lengths) for a in answers]).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    valid = src >= 0
    out_len = np.zeros(len(src), dtype=np.int64)
    out_len[valid] = lengths[src[valid]]
    take = out_len[valid]
    blob = np.frombuffer(b"".join(a.id_bytes for a in answers), dtype=np.uint8)
    # the bytes of each kept slot's id, one slot after the other: each slot's start, then 0, 1, ... within it
    at = np.repeat(starts[src[valid]] - (np.cumsum(take) - take), take) + np.arange(int(take.sum()))
    payloads = None
    if answers[0].payloads is not None:
        every = [p for a in answers for p in a.payloads]
        payloads = [every[i] if i >= 0 else None for i in src.tolist()]
    return blob[at].tobytes(), out_len.astype(np.uint16), payloads


def answer_proto(a: Answer, k: int) -> shard_pb2.ShardSearchResponse:
    """The ShardSearchResponse of an answer."""
    resp = shard_pb2.ShardSearchResponse(
        distances=np.ascontiguousarray(a.D, dtype="<f4").tobytes(),
        labels=np.ascontiguousarray(a.L, dtype="<i8").tobytes(), id_bytes=a.id_bytes,
        id_lengths=a.id_lengths.astype("<u2", copy=False).tobytes(), nq=len(a.D), k=k, plan=a.plan)
    if a.payloads is not None:
        resp.payloads.extend(payload_from_bytes(p) for p in a.payloads)
    return resp


class ShardServicer(shard_pb2_grpc.ShardServicer):
    """Validates and translates; the work is done by the Shard."""

    def __init__(self, shard: Shard, writes: WriteGate | None = None):
        self.shard = shard
        self.writes = writes or WriteGate(4, 8, f"shard {shard.shard_id}")  # see shard/admission.py
        self.health_checker = None  # lookalike.health.HealthChecker, set by create_shard_server

    def collection_of(self, name: str):
        if not self.shard.serving:
            raise Unavailable(f"shard {self.shard.shard_id} is still loading its data")
        return self.shard.collection(name)

    @abort_on_error
    def Upsert(self, request, context):
        sc = self.collection_of(request.collection)
        ids = check_ids(request.ids)
        x = vectors_from_proto(request.vectors, sc.coll)
        if len(x) != len(ids):
            raise InvalidArgument(f"{len(ids)} ids but {len(x)} vectors: send one vector per id")
        payloads = payloads_from_proto(request.payloads, len(ids), sc.coll.schema, ids)
        check_call(context, "the upsert")
        with self.writes.admit(context):
            return shard_pb2.ShardWriteResponse(count=sc.upsert(ids, x, payloads, request.epoch))

    @abort_on_error
    def Delete(self, request, context):
        sc = self.collection_of(request.collection)
        ids = check_ids(request.ids)
        check_call(context, "the delete")
        with self.writes.admit(context):
            removed, missing = sc.delete(ids, request.epoch)
        return shard_pb2.ShardWriteResponse(count=removed, missing=missing)

    @abort_on_error
    def Get(self, request, context):
        sc = self.collection_of(request.collection)
        ids, vectors, payloads = sc.get(check_ids(request.ids, unique=False), request.include_vectors, request.epoch)
        resp = shard_pb2.ShardGetResponse(ids=ids, payloads=[payload_from_bytes(p) for p in payloads])
        if vectors is not None and len(ids):
            resp.vectors.CopyFrom(vectors_to_proto(vectors))
        return resp

    @abort_on_error
    def Search(self, request, context):
        return answer_proto(self.search_parts(request, context), request.k)

    def search_parts(self, request, context) -> Answer:
        """This shard's top k for a ShardSearchRequest (checked here), as arrays: what Search answers, and what a
        shard host (shard.host) merges with its other shards' answers.

        Raises:
            LookalikeError: the status of this shard's answer.
        """
        sc = self.collection_of(request.collection)
        check_k(request.k)
        check_search_params(request.params.nprobe, request.params.ef_search)
        xq = vectors_from_proto(request.queries, sc.coll, "queries")
        check_answer_size(len(xq), request.k, request.include_payloads)  # before searching
        tracing.annotate(collection=request.collection, nq=len(xq), k=request.k, shard=self.shard.shard_id)
        coarse = None
        if request.HasField("coarse"):
            c = request.coarse
            coarse = (c.version, c.nprobe, np.frombuffer(c.lists, dtype="<i8") if len(c.lists) % 8 == 0 else None,
                      np.frombuffer(c.distances, dtype="<f4") if len(c.distances) % 4 == 0 else None)
            if coarse[2] is None or coarse[3] is None:
                raise InvalidArgument("coarse assignment: lists must be int64s and distances float32s")
        filt = request.filter if request.HasField("filter") else None
        if filt is not None:
            check_filter(filt, sc.coll.schema, sc.coll.name)
        check_call(context, "the search")  # it may have waited for a thread: is its caller still there?
        plan = ""
        if filt is not None:  # the shard picks its own plan (shard.filtered): the router's coarse lists are ignored
            D, L, ids, payloads, plan = sc.reads.search_filtered(xq, request.k, filt, request.params.nprobe,
                                                           request.params.ef_search, request.include_payloads,
                                                           request.epoch, packed=True)
        else:
            D, L, ids, payloads = sc.search(xq, request.k, request.params.nprobe, request.params.ef_search,
                                            request.include_payloads, request.epoch, coarse, packed=True)
        check_call(context, "the search's answer")  # nobody to send it to
        return Answer(D, L, ids[0], ids[1], payloads, plan, sc.coll.larger_is_better)

    @abort_on_error
    def Quantizer(self, request, context):
        got = self.collection_of(request.collection).reads.coarse_quantizer()
        if got is None:
            return shard_pb2.ShardQuantizerResponse()
        version, centroids = got
        return shard_pb2.ShardQuantizerResponse(version=version, centroids=vectors_to_proto(centroids))

    @abort_on_error
    def Scan(self, request, context):
        sc = self.collection_of(request.collection)
        filt = request.filter if request.HasField("filter") else None
        if filt is not None:
            check_filter(filt, sc.coll.schema, sc.coll.name)
        more = False
        if request.limit:  # a page of one bucket, in id order, with its vectors and payloads
            if len(request.buckets) != 1:
                raise InvalidArgument(f"a page (limit {request.limit}) is of one bucket, not {len(request.buckets)}")
            if filt is not None:
                raise InvalidArgument("a page of a bucket (limit) takes no filter: scan without a limit to filter")
            ids, vectors, payloads, more = sc.reads.scan_page(request.buckets[0], request.after_id, request.limit,
                                                              request.epoch)
        else:
            ids, vectors, payloads = sc.scan(request.buckets, request.include_vectors, request.include_payloads,
                                             request.epoch, filt)
        resp = shard_pb2.ShardScanResponse(ids=ids, more=more)
        if vectors is not None and len(ids):
            resp.vectors.CopyFrom(vectors_to_proto(vectors))
        if payloads is not None:
            resp.payloads.extend(payload_from_bytes(p) for p in payloads)
        return resp

    @abort_on_error
    def AssignClusters(self, request, context):
        sc = self.collection_of(request.collection)
        centroids = check_centroids(vectors_from_proto_raw(request.centroids), sc.coll)
        if not request.field:
            raise InvalidArgument("name the payload field that takes the cluster number")
        check_call(context, "the labelling")
        with self.writes.admit(context):
            sizes, labelled = sc.assign_clusters(centroids, request.field, request.buckets, request.count_buckets,
                                                 request.epoch)
        return shard_pb2.ShardAssignResponse(sizes=sizes.tolist(), labelled=labelled)

    @abort_on_error
    def Stats(self, request, context):
        st = self.shard.stats()
        return shard_pb2.ShardStatsResponse(
            shard_id=st["shard_id"], memory_bytes=st["memory_bytes"], serving=st["serving"],
            capacity_bytes=st["capacity_bytes"], metrics_address=st.get("metrics_address", ""),
            collections=[shard_pb2.CollectionStats(**c) for c in st["collections"]])


def create_shard_server(shard: Shard, address: str = "[::]:0", max_workers: int = 16, tls=None,
                        max_concurrent_rpcs: int | None = RPC.max_concurrent_rpcs, health_check: dict | None = None):
    """Starts a gRPC server for a shard. Returns (server, port, servicer, health); health is NOT_SERVING until
    the shard serves (after loading) and while its storage fails (shard/health.py: ``servicer.health_checker``,
    to stop with the server). ``tls``: lookalike.security.TLSConfig (the cluster's mutual TLS: only peers with a
    certificate its CA signed get in); None: plaintext. Writes take at most 3/4 of the ``max_workers`` threads
    (shard/admission.py); calls beyond ``max_concurrent_rpcs`` get RESOURCE_EXHAUSTED (None: no bound)."""
    servicer = ShardServicer(shard, WriteGate(max(1, max_workers // 4), max(1, max_workers // 2),
                                              f"shard {shard.shard_id}"))
    server, port, health = create_server(
        address, lambda s: shard_pb2_grpc.add_ShardServicer_to_server(servicer, s), [SERVICE_NAME], max_workers,
        tls=tls, interceptors=[ServerMetrics(shard.shard_id)], max_concurrent_rpcs=max_concurrent_rpcs)
    servicer.health_checker = HealthChecker(shard_probe(shard, SERVICE_NAME), [health], [SERVICE_NAME],
                                            f"shard {shard.shard_id}", **(health_check or {})).start()
    return server, port, servicer, health
