"""The Python client: numpy in, numpy out; protobuf stays inside.

    from lookalike.client import Client
    with Client("localhost:50051") as client:
        client.create_collection("products", dim=128, metric="l2", index="Flat")
        client.upsert("products", ["a", "b"], xb, payloads=[{"uri": "s3://a.jpg"}, {"uri": "s3://b.jpg"}])
        res = client.search("products", xq, k=10)   # res.ids[q], res.D[q], res.coverage

Payloads are dicts of str, int, float, bool, datetime, or lists of str or int (lookalike.payloads); a search's
``filter`` is a dict, the text form or a ``Filter`` message (lookalike.filters.to_filter):

        client.create_collection("products", dim=128, filterable="category:string,price:float")
        client.search("products", xq, k=10, filter={"category": "shoes", "price": {"lt": 100}})
        client.search("products", xq, k=10, filter="category=shoes and price<100")

Errors arrive as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from lookalike.config import max_search_rows
from lookalike.filters import to_filter
from lookalike.net import create_channel
from lookalike.payloads import payload_to_dict, payload_to_proto, schema_to_proto
from lookalike.wire import vectors_from_proto_raw, vectors_to_proto
from protos import common_pb2, lookalike_pb2, lookalike_pb2_grpc

_METRICS = {"l2": common_pb2.L2, "ip": common_pb2.IP, "cosine": common_pb2.COSINE, "hamming": common_pb2.HAMMING}


@dataclasses.dataclass
class Hits:
    """Search results.

    Attributes:
        ids: nq lists of ids, best first (shorter than k when the collection holds fewer items).
        D: shape (nq, k) float32 distances (NaN where no result). L2/hamming: smaller is better; ip/cosine: larger.
        payloads: nq lists of dicts, when asked for.
        coverage: fraction of buckets that answered.
        plans: filtered searches: how each shard ran the filter (debug; see docs/API.md).
    """

    ids: list[list[str]]
    D: np.ndarray
    payloads: list[list[dict]] | None
    coverage: float
    plans: list[str] = dataclasses.field(default_factory=list)


def _hits(resp: lookalike_pb2.SearchResponse, k: int, include_payloads: bool) -> Hits:
    D = np.full((len(resp.results), k), np.nan, dtype=np.float32)
    for q, nb in enumerate(resp.results):
        D[q, :len(nb.distances)] = nb.distances
    payloads = [[payload_to_dict(p) for p in nb.payloads] for nb in resp.results] if include_payloads else None
    return Hits([list(nb.ids) for nb in resp.results], D, payloads, resp.coverage, list(resp.plans))


def _payload(d: dict | None) -> common_pb2.Payload:
    return payload_to_proto(d)


class Client:
    """A connection to a lookalike router.

    Args:
        target: "host:port" of the router (one connection: gRPC's pick_first), or a target that names every
            router, e.g. ``dns:///lookalike-router-headless.lookalike.svc:50051`` (a Kubernetes headless Service):
            calls are then spread over all of them (round_robin), and routers that come and go are followed.
        timeout: default deadline per call, seconds.
        tls: lookalike.security.TLSConfig: ``ca`` verifies the router, ``cert``/``key`` are this client's for
            mutual TLS; None: plaintext.
        token: the bearer token sent with every call (a router with a tokens file needs one; see
            lookalike.security.read_token).
        load_balancing: "auto" (round_robin for ``dns:``, ``ipv4:`` and ``ipv6:`` targets, else one connection),
            "round_robin" or "pick_first" (lookalike.balancing.balancing_options).
    """

    def __init__(self, target: str = "localhost:50051", timeout: float = 60.0, tls=None, token: str | None = None,
                 load_balancing: str = "auto"):
        self.target = target
        self.timeout = timeout
        self._channel = create_channel(target, tls, token, load_balancing)
        self.stub = lookalike_pb2_grpc.LookalikeStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    # --- collections ----------------------------------------------------------------------------------------
    def create_collection(self, name: str, dim: int = 0, metric: str = "", index: str = "Flat", buckets: int = 0,
                          replication: int = 0, nprobe: int = 0, ef_search: int = 0,
                          encoder: str = "", gpu_float16: bool = False,
                          filterable: str = "") -> lookalike_pb2.CollectionInfo:
        """Creates a collection. metric "" means l2, or the encoder's; with an encoder, dim 0 means the encoder's.
        ``filterable``: the payload fields to index for filters, "name:type,..." (types: lookalike.payloads.TYPES)."""
        if metric and metric not in _METRICS:
            raise ValueError(f"metric must be one of {', '.join(_METRICS)}, got {metric!r}")
        spec = common_pb2.CollectionSpec(
            name=name, dim=dim, metric=_METRICS[metric] if metric else common_pb2.METRIC_UNSPECIFIED, index=index,
            buckets=buckets, replication=replication, nprobe=nprobe, ef_search=ef_search, encoder=encoder,
            gpu_float16=gpu_float16, filterable=schema_to_proto(filterable))
        return self.stub.CreateCollection(lookalike_pb2.CreateCollectionRequest(spec=spec), timeout=self.timeout)

    def list_collections(self) -> list[lookalike_pb2.CollectionInfo]:
        """Every collection: its spec, item count and shard-map epoch."""
        return list(self.stub.ListCollections(lookalike_pb2.ListCollectionsRequest(), timeout=self.timeout).collections)

    def describe_collection(self, name: str) -> lookalike_pb2.CollectionInfo:
        return self.stub.DescribeCollection(lookalike_pb2.DescribeCollectionRequest(collection=name), timeout=self.timeout)

    def drop_collection(self, name: str) -> None:
        self.stub.DropCollection(lookalike_pb2.DropCollectionRequest(collection=name), timeout=self.timeout)

    # --- items ----------------------------------------------------------------------------------------------
    @staticmethod
    def _upsert_request(collection, ids, vectors, payloads) -> lookalike_pb2.UpsertRequest:
        req = lookalike_pb2.UpsertRequest(collection=collection, ids=[str(i) for i in ids])
        req.vectors.CopyFrom(vectors_to_proto(np.asarray(vectors)))
        if payloads is not None:
            req.payloads.extend(_payload(p) for p in payloads)
        return req

    def upsert(self, collection: str, ids: Iterable, vectors: np.ndarray, payloads: list[dict] | None = None) -> int:
        """Inserts or replaces items; returns the count acknowledged. vectors: (n, d) float32 or (n, d/8) uint8."""
        req = self._upsert_request(collection, list(ids), vectors, payloads)
        return self.stub.Upsert(req, timeout=self.timeout).count

    def upsert_stream(self, collection: str, batches: Iterable[tuple], timeout: float | None = None) -> int:
        """Bulk load over one stream: ``batches`` yields (ids, vectors) or (ids, vectors, payloads)."""

        def requests() -> Iterator[lookalike_pb2.UpsertRequest]:
            for batch in batches:
                ids, vectors, payloads = (*batch, None)[:3]
                yield self._upsert_request(collection, list(ids), vectors, payloads)

        return self.stub.UpsertStream(requests(), timeout=timeout).count

    def delete(self, collection: str, ids: Iterable) -> tuple[int, int]:
        """Removes items; returns (removed, missing)."""
        resp = self.stub.Delete(lookalike_pb2.DeleteRequest(collection=collection, ids=[str(i) for i in ids]),
                                timeout=self.timeout)
        return resp.count, resp.missing

    def get(self, collection: str, ids: Iterable, include_vectors: bool = True):
        """(found ids, vectors shape (n, d) or None, payload dicts)."""
        resp = self.stub.Get(lookalike_pb2.GetRequest(collection=collection, ids=[str(i) for i in ids],
                                                      include_vectors=include_vectors), timeout=self.timeout)
        vectors = vectors_from_proto_raw(resp.vectors) if include_vectors and resp.ids else None
        return list(resp.ids), vectors, [payload_to_dict(p) for p in resp.payloads]

    def export(self, collection: str, buckets: Iterable[int] = (), page: int = 1000,
               timeout: float | None = None) -> Iterator[tuple[list[str], np.ndarray, list[dict]]]:
        """Every item of some buckets (all: empty), bucket after bucket, for a backup: yields (ids, vectors shape
        (n, d) float32 or (n, d/8) uint8, payload dicts) pages of at most ``page`` items. Needs the admin scope."""
        req = lookalike_pb2.ExportRequest(collection=collection, buckets=list(buckets), page=page)
        for resp in self.stub.Export(req, timeout=timeout):
            yield list(resp.ids), vectors_from_proto_raw(resp.vectors), [dict(p.fields) for p in resp.payloads]

    # --- search ---------------------------------------------------------------------------------------------
    def search(self, collection: str, xq: np.ndarray, k: int = 10, nprobe: int = 0, ef_search: int = 0,
               min_coverage: float | None = None, include_payloads: bool = False,
               timeout: float | None = None, filter=None) -> Hits:
        """k-NN search for a batch of queries, shape (nq, d) float32 (or (nq, d/8) uint8 codes).

        A batch whose answer could pass the message limit (``lookalike.config.max_search_rows``: e.g. more than
        2,476 queries at k=100, or 402 at k=10 with payloads) is sent as several requests, one after the other;
        ``coverage`` is then the lowest of theirs. ``filter``: only items matching it (a dict, the text form or a
        Filter message: lookalike.filters.to_filter); the k best of them are returned."""
        xq = np.asarray(xq)
        filt = to_filter(filter)
        step = max(1, max_search_rows(k, include_payloads))
        parts = [self._search(collection, xq[s:s + step], k, nprobe, ef_search, min_coverage, include_payloads,
                              timeout, filt) for s in range(0, max(len(xq), 1), step)]
        if len(parts) == 1:
            return parts[0]
        return Hits([row for h in parts for row in h.ids], np.concatenate([h.D for h in parts]),
                    [row for h in parts for row in h.payloads] if include_payloads else None,
                    min(h.coverage for h in parts), [p for h in parts for p in h.plans])

    def _search(self, collection, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout,
                filt=None) -> Hits:
        req = lookalike_pb2.SearchRequest(collection=collection, k=k, include_payloads=include_payloads, filter=filt)
        req.queries.CopyFrom(vectors_to_proto(xq))
        req.params.nprobe = nprobe
        req.params.ef_search = ef_search
        if min_coverage is not None:
            req.min_coverage = min_coverage
        return _hits(self.stub.Search(req, timeout=timeout or self.timeout), k, include_payloads)

    # --- images ---------------------------------------------------------------------------------------------
    def upsert_images(self, collection: str, images: Iterable[tuple], skip_bad: bool = True,
                      timeout: float | None = None) -> tuple[int, list[tuple[str, str]]]:
        """Stores images through the collection's encoder. ``images`` yields (id, bytes) or (id, bytes, payload).

        Returns:
            (images stored, [(id, reason) for each image that was not]).
        """
        req = lookalike_pb2.UpsertImagesRequest(collection=collection, skip_bad=skip_bad)
        for item in images:
            uid, data, payload = (*item, None)[:3]
            req.images.add(id=str(uid), data=data, payload=_payload(payload))
        resp = self.stub.UpsertImages(req, timeout=timeout or self.timeout)
        return resp.count, [(f.id, f.reason) for f in resp.failures]

    def search_by_image(self, collection: str, images: list[bytes], k: int = 10, nprobe: int = 0,
                        ef_search: int = 0, min_coverage: float | None = None, include_payloads: bool = False,
                        timeout: float | None = None, filter=None) -> Hits:
        """k-NN search with query images (encoded files), through the collection's encoder (``filter`` as in
        :meth:`search`)."""
        req = lookalike_pb2.SearchByImageRequest(collection=collection, images=images, k=k,
                                                 include_payloads=include_payloads, filter=to_filter(filter))
        req.params.nprobe = nprobe
        req.params.ef_search = ef_search
        if min_coverage is not None:
            req.min_coverage = min_coverage
        return _hits(self.stub.SearchByImage(req, timeout=timeout or self.timeout), k, include_payloads)

    def status(self) -> lookalike_pb2.ClusterStatusResponse:
        return self.stub.ClusterStatus(lookalike_pb2.ClusterStatusRequest(), timeout=self.timeout)

    def train(self, name: str) -> lookalike_pb2.CollectionInfo:
        """Trains the collection's index again as a new version (see TrainIndex in protos/lookalike.proto)."""
        return self.stub.TrainIndex(lookalike_pb2.TrainIndexRequest(collection=name), timeout=self.timeout)

    def rebalance(self, name: str = "", add_shards: int = 0) -> lookalike_pb2.RebalanceResponse:
        """Adds shards (optionally) and queues the bucket moves that even the load; they run in the background."""
        return self.stub.Rebalance(lookalike_pb2.RebalanceRequest(collection=name, add_shards=add_shards),
                                   timeout=max(self.timeout or 0, 600))

    # --- catalog jobs ---------------------------------------------------------------------------------------
    def sample(self, collection: str, size: int, seed: int = 0, include_vectors: bool = True, filter=None):
        """A random sample of up to ``size`` (<= 10000) items (matching ``filter``, as in :meth:`search`):
        (ids, vectors or None, payload dicts)."""
        resp = self.stub.Sample(lookalike_pb2.SampleRequest(collection=collection, size=size, seed=seed,
                                                            include_vectors=include_vectors, filter=to_filter(filter)),
                                timeout=max(self.timeout or 0, 300))
        vectors = vectors_from_proto_raw(resp.vectors) if include_vectors and resp.ids else None
        return list(resp.ids), vectors, [payload_to_dict(p) for p in resp.payloads]

    def start_dedup(self, collection: str, threshold: float, k: int = 10, nprobe: int = 0, ef_search: int = 0,
                    batch: int = 0, job_id: str = "", filter=None) -> lookalike_pb2.Job:
        """Starts (or resumes, or returns) a near-duplicate job; see :meth:`wait_job` and :meth:`dedup_groups`.
        ``filter`` (as in :meth:`search`): only matching items, grouped among themselves (dedup within a category)."""
        spec = lookalike_pb2.DedupSpec(collection=collection, threshold=threshold, k=k, batch=batch,
                                       filter=to_filter(filter))
        spec.params.nprobe = nprobe
        spec.params.ef_search = ef_search
        return self.stub.StartJob(lookalike_pb2.StartJobRequest(job_id=job_id, dedup=spec), timeout=self.timeout)

    def start_cluster(self, collection: str, k: int, sample: int = 0, field: str = "", niter: int = 0,
                      seed: int = 0, job_id: str = "") -> lookalike_pb2.Job:
        """Starts (or resumes, or returns) a k-means job that stores each item's cluster in its payload."""
        spec = lookalike_pb2.ClusterSpec(collection=collection, k=k, sample=sample, field=field, niter=niter,
                                         seed=seed)
        return self.stub.StartJob(lookalike_pb2.StartJobRequest(job_id=job_id, cluster=spec), timeout=self.timeout)

    def get_job(self, job_id: str) -> lookalike_pb2.Job:
        return self.stub.GetJob(lookalike_pb2.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def list_jobs(self) -> list[lookalike_pb2.Job]:
        return list(self.stub.ListJobs(lookalike_pb2.ListJobsRequest(), timeout=self.timeout).jobs)

    def cancel_job(self, job_id: str) -> lookalike_pb2.Job:
        return self.stub.CancelJob(lookalike_pb2.GetJobRequest(job_id=job_id), timeout=max(self.timeout or 0, 60))

    def wait_job(self, job_id: str, poll_s: float = 0.5, on_progress=None,
                 timeout: float | None = None) -> lookalike_pb2.Job:
        """Polls a job until it ends; ``on_progress(job)`` is called after each poll. Returns the last Job.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.state != lookalike_pb2.Job.RUNNING:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s")
            time.sleep(poll_s)

    def dedup_groups(self, job_id: str, offset: int = 0, limit: int = 0) -> Iterator[lookalike_pb2.DedupGroup]:
        """The groups of a finished dedup job, largest first (streamed)."""
        return self.stub.DedupGroups(lookalike_pb2.DedupGroupsRequest(job_id=job_id, offset=offset, limit=limit),
                                     timeout=max(self.timeout or 0, 600))
