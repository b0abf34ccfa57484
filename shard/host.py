"""A shard host: several shards in one process, behind one gRPC server (``shards_per_process`` > 1).

Searched through the router, every shard process costs each batch its own call: gRPC, decoding the queries, Python,
and the kernel switching between the processes. At 1M x 128, IVF1024, 8 shards on 2 cores, batch 100, that was
about 3 ms of CPU a shard a batch beyond FAISS's work (docs/BENCHMARKS.md, "Shards sharing one process"). Shards
that share a process answer one Search for all of them (shard.stacked): the queries are decoded once, each shard's
index is searched in this thread, their top k are merged here (lookalike.topk, as the router merges) and one answer
goes back, its ids packed for the merged slots only. The IVF shards of a process keep one set of lists for their
trained index (shard.list_groups, :attr:`HostServicer.groups`): a search of all of them is one search of those lists,
the work of one FAISS index. IVF-PQ shards with lists of their own are searched as one view of their lists: each
probed list's distance table is then built once for all of them. Where none of these can be (a filter, a move
between two of them, a shard that fails), each shard answers on its own and the answers are merged.

Everything else stays each shard's own: its storage, log, checkpoints, buckets, epoch, load, training and memory
capacity. Calls other than a Search of several shards name their shard in the metadata key ``lookalike-shard``
(:data:`SHARD_KEY`); a process holding one shard answers for it without. A shard a call names that this process
does not hold (it is still starting here, or the router's map is stale) is UNAVAILABLE, so the router asks again
with a fresh map, as for a shard that is down.

Uses the shard's servicer (shard.server) and the base package.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import faiss
import grpc
import numpy as np

from lookalike.config import RPC
from lookalike.errors import InvalidArgument, LookalikeError, Unavailable
from lookalike.health import HealthChecker, Report
from lookalike.metrics import ServerMetrics
from lookalike.net import abort_on_error, create_server
from lookalike.wire import SHARD_KEY
from protos import shard_pb2, shard_pb2_grpc
from shard.admission import WriteGate
from shard.health import storage_problem
from shard.list_groups import ListGroups
from shard.server import SERVICE_NAME, Answer, ShardServicer, answer_proto, pick_slots
from shard.stacked import merge_parts, search_as_one, search_lists_shared, search_one_by_one

log = logging.getLogger(__name__)

# Shards one Search may name: more than any process holds (each shard costs its own memory), so that a request
# cannot make a process loop over a list of any length.
MAX_SHARDS_PER_CALL = 1024


def shard_of_call(context) -> str:
    """The shard a call names in its metadata ("" when none)."""
    for key, value in context.invocation_metadata() or ():
        if key == SHARD_KEY:
            return value
    return ""


class HostServicer(shard_pb2_grpc.ShardServicer):
    """The Shard service of a process holding several shards: each call goes to its shard's
    :class:`shard.server.ShardServicer`; a Search naming several shards is answered for all of them at once."""

    def __init__(self, name: str, threads: int = 0):
        self.name = name
        # FAISS threads of every call (OpenMP's count is per calling thread); 0: OpenMP's default
        self.threads = threads
        self._searching = 0  # Search calls running now: they share the threads (see _search_threads)
        self._shards: dict[str, ShardServicer] = {}
        self._lock = threading.Lock()
        self.writes: WriteGate | None = None  # the writes of all its shards (create_host_server)
        self.groups = ListGroups()  # its shards' IVF lists, shared (shard.list_groups)

    def add(self, servicer: ShardServicer) -> None:
        with self._lock:
            self._shards = {**self._shards, servicer.shard.shard_id: servicer}

    def remove(self, shard_id: str) -> None:
        with self._lock:
            self._shards = {s: v for s, v in self._shards.items() if s != shard_id}

    def servicers(self) -> dict[str, ShardServicer]:
        return self._shards

    def _held(self, shard_id: str) -> ShardServicer:
        sv = self._shards.get(shard_id)
        if sv is None:
            raise Unavailable(f"shard {shard_id} is not held by the shard process {self.name} (it is starting, or "
                              "the shard map is stale)")
        return sv

    def _target(self, context) -> ShardServicer:
        sid = shard_of_call(context)
        if sid:
            return self._held(sid)
        shards = self._shards
        if len(shards) == 1:
            return next(iter(shards.values()))
        raise InvalidArgument(f"the shard process {self.name} holds {len(shards)} shards: name one in the call's "
                              f"metadata {SHARD_KEY!r}")

    def _forward(self, method: str, request, context):
        try:
            sv = self._target(context)
        except LookalikeError as err:
            context.abort(err.code, str(err))
        if method == "Search":
            with self._search_threads():
                return sv.Search(request, context)
        self._set_threads(self.threads)
        return getattr(sv, method)(request, context)

    def _set_threads(self, n: int) -> None:
        if self.threads:
            faiss.omp_set_num_threads(max(1, n))

    @contextlib.contextmanager
    def _search_threads(self):
        """The FAISS threads of a Search: the process's threads shared by the searches running as it starts (one
        alone takes them all; two at once take half each). Each search's OpenMP threads split its queries and
        wait for the last, so two searches of all the threads each ran twice the threads of the cores, each
        waiting on its descheduled ones. Measured at 10M x 128, IVF4096,PQ32, 8 shards in this process on 2 cores,
        2 searches of 100 in flight (the router's ``--batch-inflight 2``): the process's CPU a batch 0.90-0.94x
        that of one search at a time, against 0.98-1.02x before (docs/BENCHMARKS.md, "4 and 8 shards in one process
        at 10M"). The same answer on any count: each query is answered by one thread."""
        with self._lock:
            self._searching += 1
            running = self._searching
        try:
            self._set_threads(self.threads // running)
            yield
        finally:
            with self._lock:
                self._searching -= 1

    def Upsert(self, request, context):
        return self._forward("Upsert", request, context)

    def Delete(self, request, context):
        return self._forward("Delete", request, context)

    def Get(self, request, context):
        return self._forward("Get", request, context)

    def Quantizer(self, request, context):
        return self._forward("Quantizer", request, context)

    def Stats(self, request, context):
        return self._forward("Stats", request, context)

    def Scan(self, request, context):
        return self._forward("Scan", request, context)

    def AssignClusters(self, request, context):
        return self._forward("AssignClusters", request, context)

    def Search(self, request, context):
        if not request.shards:
            return self._forward("Search", request, context)
        return self._search_shards(request, context)

    @abort_on_error
    def _search_shards(self, request, context):
        with self._search_threads():
            return self.search_shards(request, context)

    def search_shards(self, request, context) -> shard_pb2.ShardSearchResponse:
        """A Search of the shards the request names: their merged top k, and why each that did not answer did
        not (``failures``; every shard's own error, as its own call would have had it).

        Raises:
            InvalidArgument: more than MAX_SHARDS_PER_CALL shards named.
        """
        if len(request.shards) > MAX_SHARDS_PER_CALL:
            raise InvalidArgument(f"a search names {len(request.shards)} shards; at most {MAX_SHARDS_PER_CALL}")
        sids = list(dict.fromkeys(request.shards))
        servicers = self._shards
        if all(sid in servicers for sid in sids):  # answered once (shard.stacked), when that is the same answer
            for way in (search_lists_shared, search_as_one, search_one_by_one):
                try:
                    one = way([(sid, servicers[sid]) for sid in sids], request)
                except Exception:  # a bug: searched one by one below, each shard failing alone if it fails
                    log.exception("%s: searching %s at once failed (%s)", self.name, ", ".join(sids), way.__name__)
                    one = None
                if one is not None:
                    return answer_proto(one, request.k)
        parts, failures = [], []
        for sid in sids:
            try:
                a = self._held(sid).search_parts(request, context)
            except LookalikeError as err:
                failures.append(shard_pb2.ShardFailure(shard=sid, code=err.code.value[0], message=str(err)))
                continue
            except Exception as err:  # a bug in one shard's search fails that shard's part only
                log.exception("%s: internal error in the search of %s", self.name, sid)
                failures.append(shard_pb2.ShardFailure(shard=sid, code=grpc.StatusCode.INTERNAL.value[0],
                                                       message=f"internal error: {type(err).__name__}: {err}"))
                continue
            parts.append((sid, a))
        if not parts:  # nobody answered: an empty answer, the failures say why
            resp = shard_pb2.ShardSearchResponse(nq=0, k=request.k)
        else:
            resp = answer_proto(merge_answers(parts), request.k)
        resp.failures.extend(failures)
        return resp


def merge_answers(parts: list[tuple[str, Answer]]) -> Answer:
    """One top k of several shards' answers (as the router merges: lookalike.topk), their ids packed for the
    merged slots only; plan: one line "<shard>: <plan>" per shard that ran one."""
    plan = "\n".join(f"{sid}: {a.plan}" for sid, a in parts if a.plan)
    if len(parts) == 1:
        a = parts[0][1]
        return Answer(a.D, a.L, a.id_bytes, a.id_lengths, a.payloads, plan, a.larger_is_better)
    answers = [a for _, a in parts]
    lib = answers[0].larger_is_better
    D, labels, src = merge_parts(np.stack([a.D for a in answers]), np.stack([a.L for a in answers]), lib)
    id_bytes, id_lengths, payloads = pick_slots(answers, src)
    return Answer(D, labels, id_bytes, id_lengths, payloads, plan, lib)


def host_probe(host: HostServicer):
    """The health probe of a shard process (lookalike.health): NOT_SERVING while one of its shards loads or its
    storage fails a durable write; a collection one of them does not serve, under ``lookalike.v1.Shard/<collection>``,
    with the shard named.

    The storage is written once a probe, under the first shard's directory, not once a shard: the shards of a
    process keep their directories on one volume (the data directory), and a probe of several fsyncs in turn did
    not answer within its 2 s under a load of 8 shards (docs/BENCHMARKS.md, "Shards sharing one process")."""

    def probe() -> Report:
        servicers = sorted(host.servicers().items())
        loading = [sid for sid, sv in servicers if not sv.shard.serving]
        report: Report = {"": f"shard {loading[0]} is loading its data" if loading else None}
        if servicers and not loading:
            report[""] = storage_problem(servicers[0][1].shard.root)
        for sid, sv in servicers:
            for name, problem in sv.shard.collection_problems().items():
                key = f"{SERVICE_NAME}/{name}"
                if problem and not report.get(key):
                    report[key] = f"{sid}: {problem}"
                else:
                    report.setdefault(key, None)
        return report

    return probe


def create_host_server(host: HostServicer, address: str = "[::]:0", max_workers: int = 16, tls=None,
                       max_concurrent_rpcs: int | None = RPC.max_concurrent_rpcs, health_check: dict | None = None):
    """Starts the gRPC server of a shard process holding several shards (as shard.server.create_shard_server
    does for one). Returns (server, port, health, checker); shards join with :func:`host_shard`."""
    server, port, health = create_server(
        address, lambda s: shard_pb2_grpc.add_ShardServicer_to_server(host, s), [SERVICE_NAME], max_workers,
        tls=tls, interceptors=[ServerMetrics(host.name)], max_concurrent_rpcs=max_concurrent_rpcs)
    # its writes, all shards together, take at most 3/4 of the threads (shard/admission.py)
    host.writes = WriteGate(max(1, max_workers // 4), max(1, max_workers // 2), f"shard process {host.name}")
    checker = HealthChecker(host_probe(host), [health], [SERVICE_NAME], f"shard process {host.name}",
                            **(health_check or {})).start()
    return server, port, health, checker


def host_shard(host: HostServicer, shard) -> ShardServicer:
    """Serves ``shard`` (shard.shard.Shard) from the host's server; returns its servicer. The shard's memory is
    then its part of the process's (:func:`memory_share`)."""
    sv = ShardServicer(shard, host.writes)
    shard.process_share = lambda: memory_share(host, shard.shard_id)
    shard.list_groups = host.groups  # its IVF lists shared with the process's other shards (shard.list_groups)
    for sc in list(shard._collections.values()):  # those it loaded before it joined the process's server
        sc.list_groups = host.groups
        sc.upkeep.share_lists()
    host.add(sv)
    return sv


def memory_share(host: HostServicer, shard_id: str) -> float:
    """A shard's part of its process's resident memory: its indexes' bytes over those of all the process's
    shards (an equal part while they hold none). What a process holds beyond the indexes (the id tables, the
    interpreter, buffers) grows with them, so the part follows it; the shards' parts add up to the process."""
    sizes = {sid: sv.shard.index_bytes() for sid, sv in host.servicers().items()}
    total = sum(sizes.values())
    if shard_id not in sizes:
        return 0.0
    return sizes[shard_id] / total if total else 1.0 / len(sizes)
