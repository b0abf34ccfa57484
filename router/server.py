"""The public Lookalike gRPC service: a thin servicer over :class:`router.core.Router`."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import json

from lookalike import tracing
from lookalike.config import METRICS, RPC, CollectionConfig
from lookalike.errors import FailedPrecondition, InvalidArgument, Unavailable
from lookalike.health import HealthChecker
from lookalike.ids import check_ids
from lookalike.metrics import SEARCH_QUERIES, AioServerMetrics
from lookalike.payloads import canonical, schema_from_proto, schema_to_proto
from lookalike.net import abort_on_error, abort_on_error_async, create_aio_server
from lookalike.wire import LIMITS, check_k, check_payloads, vectors_from_proto, vectors_to_proto
from protos import common_pb2, lookalike_pb2, lookalike_pb2_grpc
from router.batcher import MAX_INFLIGHT, MAX_WAIT_S, SearchBatcher
from router.core import Router
from router.health import control_plane_probe
from router.search import check_min_coverage

SERVICE_NAME = lookalike_pb2.DESCRIPTOR.services_by_name["Lookalike"].full_name
_MAX_QUERY_IMAGES = LIMITS.max_query_images

_METRIC_TO_PROTO = {"l2": common_pb2.L2, "ip": common_pb2.IP, "cosine": common_pb2.COSINE,
                    "hamming": common_pb2.HAMMING}
_METRIC_FROM_PROTO = {v: k for k, v in _METRIC_TO_PROTO.items()}


def spec_to_config(spec: common_pb2.CollectionSpec) -> CollectionConfig:
    """A CollectionSpec message as a CollectionConfig (defaults for zero fields; not yet validated)."""
    if spec.metric not in _METRIC_FROM_PROTO and spec.metric != common_pb2.METRIC_UNSPECIFIED:
        raise InvalidArgument(f"metric must be one of {', '.join(m.upper() for m in METRICS)}")
    defaults = CollectionConfig(name="", dim=1)
    return CollectionConfig(
        name=spec.name, dim=spec.dim, metric=_METRIC_FROM_PROTO.get(spec.metric, ""), index=spec.index,
        buckets=spec.buckets or defaults.buckets, replication=spec.replication or defaults.replication,
        nprobe=spec.nprobe or defaults.nprobe, ef_search=spec.ef_search or defaults.ef_search, encoder=spec.encoder,
        gpu_float16=spec.gpu_float16, filterable=schema_from_proto(spec.filterable))


def config_to_spec(cfg: CollectionConfig) -> common_pb2.CollectionSpec:
    return common_pb2.CollectionSpec(name=cfg.name, dim=cfg.dim, metric=_METRIC_TO_PROTO[cfg.metric], index=cfg.index,
                                     buckets=cfg.buckets, replication=cfg.replication, nprobe=cfg.nprobe,
                                     ef_search=cfg.ef_search, encoder=cfg.encoder, gpu_float16=cfg.gpu_float16,
                                     filterable=schema_to_proto(cfg.filterable))


def _search_response(res) -> lookalike_pb2.SearchResponse:
    results = []
    for q, ids in enumerate(res.ids):
        nb = lookalike_pb2.Neighbors(ids=ids, distances=res.D[q, :len(ids)].tolist())
        if res.payloads is not None:
            nb.payloads.extend(res.payloads[q])
        results.append(nb)
    return lookalike_pb2.SearchResponse(results=results, coverage=res.coverage, epoch=res.epoch, plans=res.plans)


def typed_payloads(payloads, ids: list[str], coll: CollectionConfig) -> list:
    """A request's payloads in their stored form (lookalike.payloads.canonical, with the collection's declared
    fields); raises InvalidArgument naming the item and field of a value of the wrong type."""
    check_payloads(payloads, len(ids))
    schema = coll.schema
    return [canonical(p, schema, uid) for p, uid in zip(payloads, ids)] if len(payloads) else payloads


def _timeout(context) -> float | None:
    """Seconds left of the caller's deadline; None when the caller set none (gRPC then reports ~2**63)."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None or remaining > 1e8 else max(0.0, remaining)


def _export_args(request, coll: CollectionConfig) -> tuple[list[int], int]:
    """(buckets, page) of an ExportRequest, checked."""
    page = request.page or 1000
    if not 1 <= page <= LIMITS.max_batch:
        raise InvalidArgument(f"page must be between 1 and {LIMITS.max_batch}, got {request.page}")
    buckets = list(request.buckets) or list(range(coll.buckets))
    if len(set(buckets)) != len(buckets) or max(buckets) >= coll.buckets:
        raise InvalidArgument(f"buckets of {coll.name!r} are numbers from 0 to {coll.buckets - 1}, each at most once")
    return buckets, page


def job_to_proto(st) -> lookalike_pb2.Job:
    """A :class:`jobs.JobStatus` as the API's Job."""
    return lookalike_pb2.Job(id=st.id, kind=st.kind, collection=st.collection,
                             state=lookalike_pb2.Job.State.Value(st.state), done=st.done, total=st.total,
                             message=st.message, started_unix=st.started, elapsed_s=st.elapsed,
                             summary_json=json.dumps(st.summary))


def job_spec(request: lookalike_pb2.StartJobRequest) -> tuple[str, dict]:
    """(kind, spec dict) of a StartJob request."""
    which = request.WhichOneof("spec")
    if which == "dedup":
        d = request.dedup
        spec = {"collection": d.collection, "threshold": d.threshold, "k": d.k, "nprobe": d.params.nprobe,
                "ef_search": d.params.ef_search, "batch": d.batch}
        if d.HasField("filter"):  # kept in the job's JSON spec as base64 (jobs.dedup.filter_of)
            spec["filter"] = base64.b64encode(d.filter.SerializeToString(deterministic=True)).decode()
        return "dedup", spec
    if which == "cluster":
        c = request.cluster
        return "cluster", {"collection": c.collection, "k": c.k, "sample": c.sample, "field": c.field,
                           "niter": c.niter, "seed": c.seed}
    raise InvalidArgument("StartJob needs a spec: dedup or cluster")


_GROUPS_PER_READ = 2000

# Seconds each shard has to answer the Stats of ListCollections and ClusterStatus (a caller's earlier deadline wins).
_STATS_TIMEOUT_S = 2.0


def collection_of(request, required: bool = True) -> str:
    """The collection a request names: its ``collection`` field, or the deprecated ``name`` of the requests that
    used to call it that (DescribeCollection, DropCollection, Rebalance); "" when neither is set and not required.

    Raises:
        InvalidArgument: both are set and differ, or neither is and one is required.
    """
    new, old = request.collection, request.name
    if new and old and new != old:
        raise InvalidArgument(f"the request names two collections: collection {new!r} and the deprecated name "
                              f"{old!r}; set collection only")
    if required and not (new or old):
        raise InvalidArgument("the request names no collection")
    return new or old


def _stats_timeout(context) -> float:
    remaining = _timeout(context)
    return _STATS_TIMEOUT_S if remaining is None else min(_STATS_TIMEOUT_S, remaining)


_TRAINING_STATES = {"not_needed": lookalike_pb2.IndexTraining.NOT_NEEDED,
                    "untrained": lookalike_pb2.IndexTraining.UNTRAINED,
                    "training": lookalike_pb2.IndexTraining.TRAINING, "trained": lookalike_pb2.IndexTraining.TRAINED}


def training_to_proto(st: dict) -> lookalike_pb2.IndexTraining:
    """The controller's training status (Controller.training_status) as the API's IndexTraining."""
    return lookalike_pb2.IndexTraining(
        state=_TRAINING_STATES[st["state"]], version=st["version"], vectors=st["vectors"],
        vectors_needed=st["vectors_needed"], trained_on=st["trained_on"], shards=st["shards"],
        shards_ready=st["shards_ready"], message=st["message"], next_version=st.get("next_version", 0))

def _shard_status(info, st, order: dict[str, int]) -> lookalike_pb2.ShardStatus:
    """A shard's ShardStatus from its map entry and its Stats answer (None: it did not answer); its collections
    in the census' order."""
    s = lookalike_pb2.ShardStatus(shard_id=info.shard_id, address=info.address, node=info.node,
                                  serving=bool(st is not None and st.serving), problem=info.problem)
    if st is None:
        return s
    s.memory_bytes = st.memory_bytes
    s.capacity_bytes = st.capacity_bytes
    s.metrics_address = st.metrics_address
    s.vectors = sum(c.vectors for c in st.collections)
    s.index_bytes = sum(c.index_bytes for c in st.collections)
    held = sorted((c for c in st.collections if c.buckets or c.vectors),
                  key=lambda c: (order.get(c.name, len(order)), c.name))
    s.collections.extend(lookalike_pb2.ShardCollection(
        collection=c.name, buckets=c.buckets, joining=c.joining, vectors=c.vectors,
        index_bytes=c.index_bytes) for c in held)
    if len(held) == 1:  # the deprecated shard-wide fields: a bucket count means nothing across collections
        s.buckets, s.joining = held[0].buckets, held[0].joining
    s.damaged.extend(f"{c.name}: {d}" for c in st.collections for d in c.damaged)
    return s


class RouterServicer(lookalike_pb2_grpc.LookalikeServicer):
    """The public service. ``Search`` is a coroutine on the server's event loop, batched with concurrent searches
    (router/batcher.py) unless ``batcher`` is None; the other methods are plain and run on the server's threads."""

    def __init__(self, router: Router, batcher: SearchBatcher | None = None, executor=None, jobs=None):
        self.router = router
        self.batcher = batcher
        self._executor = executor
        self.jobs = jobs

    def _jobs(self):
        if self.jobs is None:
            raise FailedPrecondition("this server runs no catalog jobs (it was started without job storage)")
        return self.jobs

    def _coll(self, name: str) -> CollectionConfig:
        if not name:
            raise InvalidArgument("the request names no collection")
        return self.router.shard_map(name).collection

    @abort_on_error
    def CreateCollection(self, request, context):
        cfg = self.router.create_collection(spec_to_config(request.spec))
        return lookalike_pb2.CollectionInfo(spec=config_to_spec(cfg), epoch=self.router.shard_map(cfg.name).epoch)

    @staticmethod
    def _infos(census, training: dict | None = None) -> list[lookalike_pb2.CollectionInfo]:
        """Each collection of a census as a CollectionInfo, with its count and epoch (and training, if given)."""
        out = []
        for name, smap in census.maps.items():
            info = lookalike_pb2.CollectionInfo(spec=config_to_spec(smap.collection), count=census.counts[name],
                                                epoch=smap.epoch)
            if training is not None and name in training:
                info.training.CopyFrom(training_to_proto(training[name]))
            out.append(info)
        return out

    @abort_on_error
    def ListCollections(self, request, context):
        return lookalike_pb2.ListCollectionsResponse(
            collections=self._infos(self.router.census(_stats_timeout(context))))

    @abort_on_error
    def DescribeCollection(self, request, context):
        name = collection_of(request)
        smap = self.router.shard_map(name)
        return lookalike_pb2.CollectionInfo(spec=config_to_spec(smap.collection), epoch=smap.epoch,
                                            count=self.router.count(name, _timeout(context)),
                                            training=training_to_proto(self.router.training_status(name)))

    @abort_on_error
    def TrainIndex(self, request, context):
        name = request.collection
        if not name:
            raise InvalidArgument("the request names no collection")
        self.router.train(name)
        smap = self.router.shard_map(name)
        return lookalike_pb2.CollectionInfo(spec=config_to_spec(smap.collection), epoch=smap.epoch,
                                            training=training_to_proto(self.router.training_status(name)))

    @abort_on_error
    def DropCollection(self, request, context):
        name = collection_of(request)
        self.router.drop_collection(name)
        return lookalike_pb2.DropCollectionResponse()

    def _upsert(self, request, context) -> int:
        coll = self._coll(request.collection)
        ids = check_ids(request.ids)
        x = vectors_from_proto(request.vectors, coll)
        if len(x) != len(ids):
            raise InvalidArgument(f"the request has {len(ids)} ids but {len(x)} vectors: send one vector per id")
        return self.router.upsert(request.collection, ids, x, typed_payloads(request.payloads, ids, coll),
                                  timeout=_timeout(context))

    @abort_on_error
    def Upsert(self, request, context):
        return lookalike_pb2.WriteResponse(count=self._upsert(request, context))

    @abort_on_error
    def UpsertStream(self, request_iterator, context):
        total = 0
        for request in request_iterator:
            total += self._upsert(request, context)
        return lookalike_pb2.WriteResponse(count=total)

    @abort_on_error
    def Delete(self, request, context):
        self._coll(request.collection)
        removed, missing = self.router.delete(request.collection, check_ids(request.ids), timeout=_timeout(context))
        return lookalike_pb2.WriteResponse(count=removed, missing=missing)

    @abort_on_error
    def Get(self, request, context):
        self._coll(request.collection)
        ids, vectors, payloads = self.router.get(request.collection, check_ids(request.ids, unique=False),
                                                 request.include_vectors, timeout=_timeout(context))
        resp = lookalike_pb2.GetResponse(ids=ids, payloads=payloads)
        if vectors is not None:
            resp.vectors.CopyFrom(vectors_to_proto(vectors))
        return resp

    async def _coll_async(self, name: str, context) -> CollectionConfig:
        """:meth:`_coll` on the event loop: a map not cached comes from the control plane, on a thread of the
        loop's default executor (as router.search does), not of the searches' executor."""
        smap = self.router.shards.cached(name) if name else None
        if smap is not None:
            return smap.collection
        fut = asyncio.get_running_loop().run_in_executor(None, self._coll, name)
        try:
            left = _timeout(context)
            return await asyncio.wait_for(fut, RPC.default_deadline_s if left is None else left)
        except TimeoutError:
            raise Unavailable(f"the control plane did not give the shard map of {name!r} before the call's "
                              "deadline") from None

    @abort_on_error_async
    async def Search(self, request, context):
        coll = await self._coll_async(request.collection, context)
        check_k(request.k)
        xq = vectors_from_proto(request.queries, coll, "queries")
        tracing.annotate(collection=request.collection, nq=len(xq), k=request.k)
        SEARCH_QUERIES.observe(len(xq))
        args = (request.collection, xq, request.k, request.params.nprobe, request.params.ef_search,
                check_min_coverage(request.min_coverage if request.HasField("min_coverage") else None),
                request.include_payloads, _timeout(context))
        if request.HasField("filter"):  # not batched: a batch shares one filter (router.batcher)
            res = await self.router.search_async(*args, executor=self._executor, filt=request.filter)
        elif self.batcher is not None:
            res = await self.batcher.search(*args)
        else:
            res = await self.router.search_async(*args, executor=self._executor)
        tracing.annotate(coverage=res.coverage)
        return _search_response(res)

    @abort_on_error
    def UpsertImages(self, request, context):
        self._coll(request.collection)
        ids = check_ids([im.id for im in request.images])
        vectors, reasons = self.router.encode(request.collection, [im.data for im in request.images])
        failures = [lookalike_pb2.ImageFailure(id=uid, reason=r) for uid, r in zip(ids, reasons) if r is not None]
        if failures and not request.skip_bad:
            raise InvalidArgument(f"image {failures[0].id!r}: {failures[0].reason}")
        good = [i for i, r in enumerate(reasons) if r is None]
        count = 0
        if good:
            payloads = typed_payloads([request.images[i].payload for i in good], [ids[i] for i in good],
                                      self._coll(request.collection))
            count = self.router.upsert(request.collection, [ids[i] for i in good], vectors, payloads,
                                       timeout=_timeout(context))
        return lookalike_pb2.UpsertImagesResponse(count=count, failures=failures)

    @abort_on_error
    def SearchByImage(self, request, context):
        self._coll(request.collection)
        check_k(request.k)
        if not 1 <= len(request.images) <= _MAX_QUERY_IMAGES:
            raise InvalidArgument(f"send 1 to {_MAX_QUERY_IMAGES} query images, got {len(request.images)}")
        xq, reasons = self.router.encode(request.collection, list(request.images))
        bad = next((i for i, r in enumerate(reasons) if r is not None), None)
        if bad is not None:
            raise InvalidArgument(f"query image {bad}: {reasons[bad]}")
        return _search_response(self.router.search(
            request.collection, xq, request.k, request.params.nprobe, request.params.ef_search,
            check_min_coverage(request.min_coverage if request.HasField("min_coverage") else None),
            request.include_payloads, timeout=_timeout(context),
            filt=request.filter if request.HasField("filter") else None))

    @abort_on_error
    def ClusterStatus(self, request, context):
        census = self.router.census(_stats_timeout(context))
        order = {name: i for i, name in enumerate(census.maps)}
        shards = [_shard_status(info, st, order) for info, st in census.shards]
        control = self.router.control
        done, failed = control.move_counts()
        moves = [lookalike_pb2.BucketMove(collection=m.collection, bucket=b, source=m.source, target=m.target,
                                          phase=m.phase)
                 for m in control.moves() for b in m.buckets]
        return lookalike_pb2.ClusterStatusResponse(
            epoch=control.epoch(), shards=shards, moves=moves, moves_done=done, moves_failed=failed,
            collections=self._infos(census, control.training_statuses()))

    @abort_on_error
    def Rebalance(self, request, context):
        moves = self.router.control.rebalance(collection_of(request, required=False) or None, request.add_shards)
        self.router.invalidate()
        control = self.router.control
        return lookalike_pb2.RebalanceResponse(moves=moves, shards=len(control.shards()), epoch=control.epoch())


    @abort_on_error
    def Sample(self, request, context):
        self._coll(request.collection)
        if not 1 <= request.size <= LIMITS.max_batch:
            raise InvalidArgument(f"sample size must be between 1 and {LIMITS.max_batch}, got {request.size}")
        ids, vectors, payloads = self.router.sample(request.collection, request.size, request.seed,
                                                    request.include_vectors, timeout=_timeout(context),
                                                    filt=request.filter if request.HasField("filter") else None)
        resp = lookalike_pb2.GetResponse(ids=ids, payloads=payloads)
        if vectors is not None and len(ids):
            resp.vectors.CopyFrom(vectors_to_proto(vectors))
        return resp

    @abort_on_error
    def StartJob(self, request, context):
        kind, spec = job_spec(request)
        if not spec["collection"]:
            raise InvalidArgument("the job names no collection")
        return job_to_proto(self._jobs().start(kind, spec, request.job_id))

    @abort_on_error
    def GetJob(self, request, context):
        return job_to_proto(self._jobs().get(request.job_id))

    @abort_on_error
    def ListJobs(self, request, context):
        return lookalike_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in self._jobs().list()])

    @abort_on_error
    def CancelJob(self, request, context):
        return job_to_proto(self._jobs().cancel(request.job_id))

    @abort_on_error_async
    async def DedupGroups(self, request, context):
        loop = asyncio.get_running_loop()
        per = min(request.limit, _GROUPS_PER_READ) if request.limit else _GROUPS_PER_READ
        offset, sent = request.offset, 0
        while True:
            page = await loop.run_in_executor(self._executor, self._jobs().groups, request.job_id, offset, per)
            for g in page:
                if request.limit and sent >= request.limit:
                    return
                yield lookalike_pb2.DedupGroup(group=g["group"], ids=g["ids"], distances=g["distances"])
                sent += 1
            offset += len(page)
            if len(page) < per:
                return

    @abort_on_error_async
    async def Export(self, request, context):
        loop = asyncio.get_running_loop()
        coll = await loop.run_in_executor(None, self._coll, request.collection)
        pages = self.router.export(coll.name, *_export_args(request, coll), timeout=_timeout(context))
        done = object()
        while (got := await loop.run_in_executor(None, next, pages, done)) is not done:  # off the event loop
            ids, vectors, payloads = got
            resp = lookalike_pb2.GetResponse(ids=ids, payloads=payloads)
            if ids:
                resp.vectors.CopyFrom(vectors_to_proto(vectors))
            yield resp


def create_router_server(router: Router, address: str = "[::]:0", max_workers: int = 64,
                         batch_wait_s: float = MAX_WAIT_S, batch_inflight: int = MAX_INFLIGHT, jobs=None,
                         tls=None, auth=None, max_concurrent_rpcs: int | None = RPC.max_concurrent_rpcs,
                         health_check: dict | None = None,
                         connection_age: tuple[float, float | None] = (RPC.max_connection_age_s,
                                                                RPC.max_connection_age_grace_s)):
    """Starts the public gRPC server: an asyncio server whose searches are batched (``batch_wait_s`` < 0: not
    batched; see router/batcher.py) and whose other calls run on ``max_workers`` threads.

    ``jobs``: the catalog jobs (a :class:`jobs.JobManager`, or ``control.ray_actors.RayJobs``);
    None: the job calls answer FAILED_PRECONDITION. ``tls``: lookalike.security.TLSConfig (None: plaintext);
    ``auth``: lookalike.security.AuthInterceptor (bearer tokens, scopes, request rates; None: open).

    ``max_concurrent_rpcs``: calls beyond it get RESOURCE_EXHAUSTED (None: no bound). ``health_check``: keyword
    arguments of its lookalike.health.HealthChecker (interval_s, timeout_s). ``connection_age``: (max age, grace)
    of client connections in seconds (lookalike.balancing.connection_age_options; age 0: connections live on).

    Returns (server, port, health): ``server.stop(grace)`` stops it; health is SERVING while the control plane
    answers (``server.health_checker``), and the service ``liveness`` SERVING until it stops.
    """
    # Searches (batches) run on threads of their own, so that slow admin or write calls cannot hold them up.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, 2 * batch_inflight),
                                                     thread_name_prefix="router-search")
    holder = {}

    def register(server):
        batcher = (SearchBatcher(functools.partial(router.search_async, executor=executor), executor,
                                 max_wait_s=batch_wait_s, max_inflight=batch_inflight)
                   if batch_wait_s >= 0 else None)
        holder["servicer"] = RouterServicer(router, batcher, executor, jobs)
        lookalike_pb2_grpc.add_LookalikeServicer_to_server(holder["servicer"], server)

    interceptors = [AioServerMetrics(None)] + ([auth] if auth is not None else [])  # metrics first: refusals count
    server, port, health = create_aio_server(address, register, [SERVICE_NAME], max_workers, tls=tls,
                                             interceptors=interceptors, max_concurrent_rpcs=max_concurrent_rpcs,
                                             connection_age=connection_age)
    health_check = health_check or {}
    server.servicer = holder["servicer"]
    server.executors.append(executor)
    # Readiness follows the control plane (router/health.py); stopped with the server.
    server.health_checker = HealthChecker(control_plane_probe(router.control), [health], [SERVICE_NAME], "router",
                                          **health_check).start()
    server.on_stop.append(server.health_checker.stop)
    return server, port, health
