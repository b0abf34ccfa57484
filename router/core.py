"""The router's logic, independent of gRPC serving and of Ray: routing, fan-out, merge, coverage.

It depends on two interfaces: a control plane (collections and the shard map; the Ray controller in
production, an in-process Controller in tests) and a shard-client factory (gRPC or in-process).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Protocol

import numpy as np

from lookalike.config import CollectionConfig, check_answer_size, check_search_params
from lookalike.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, LookalikeError, NotFound,
                              ResourceExhausted, StaleShardMap, Unavailable)
from lookalike.ids import buckets_of
from lookalike.shardmap import ShardInfo, ShardMap
from lookalike.wire import vectors_from_proto_raw, vectors_to_proto
from protos import shard_pb2
from router.coarse import QUANTIZE_ON_LOOP, CoarseQuantizers
from router.merge import merge_topk
from router.shard_client import GrpcShardClient, ShardClient

log = logging.getLogger(__name__)

# Errors that say the request itself is wrong: retrying or asking another shard cannot help.
_CALLER_ERRORS = (InvalidArgument, NotFound, ResourceExhausted)


class ControlPlane(Protocol):
    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig: ...

    def drop_collection(self, name: str) -> None: ...

    def list_collections(self) -> list[CollectionConfig]: ...

    def shard_map(self, name: str) -> ShardMap: ...

    # Every collection's map at one epoch, in one call (status and listings).
    def shard_maps(self) -> dict[str, ShardMap]: ...

    def epoch(self) -> int: ...

    def shards(self) -> list[ShardInfo]: ...

    def rebalance(self, name: str | None, add_shards: int) -> int: ...

    def moves(self) -> list: ...

    def move_counts(self) -> tuple[int, int]: ...

    # Where the collection's training stands (control.controller.Controller.training_status).
    def training_status(self, name: str) -> dict: ...

    # training_status of every collection, in one call.
    def training_statuses(self) -> dict[str, dict]: ...

    # Asks for a new trained version of the collection's index; returns its number.
    def train(self, name: str) -> int: ...


# Rounds of a search: the first asks a cover of all buckets; later ones ask other owners of the buckets still
# missing (failover), or the same shards with a fresh map when a shard said the map was stale (a bucket move).
_SEARCH_ROUNDS = 6


@dataclasses.dataclass
class Census:
    """One look at the whole cluster: what the controller says (shards, every collection's map) and what the
    shards say (their Stats), with each collection's item count worked out from both.

    Attributes:
        shards: (info, ShardStatsResponse or None when it did not answer) for every shard the controller knows.
        maps: collection name -> its shard map; all at one epoch.
        counts: collection name -> items stored, each bucket counted once (see :meth:`Router.count`).
    """

    shards: list[tuple[ShardInfo, object | None]]
    maps: dict[str, ShardMap]
    counts: dict[str, int]


@dataclasses.dataclass
class SearchResult:
    """Neighbours of a batch of queries.

    Attributes:
        D: shape (nq, k) float32 distances in the collection's metric (see ``larger_is_better``); rows with fewer
            than k results are padded with the worst float.
        ids: nq lists of up to k ids, best first.
        payloads: nq lists of serialized Payload (None where empty), when asked for.
        coverage: fraction of buckets that answered (1.0: complete).
        epoch: shard-map epoch used.
    """

    D: np.ndarray
    ids: list[list[str]]
    payloads: list[list] | None
    coverage: float
    epoch: int


class Router:
    """Routes writes to every holder of a bucket and fans searches out to one owner of every bucket.

    Args:
        control: the control plane.
        connect: address -> ShardClient (default: gRPC).
        refresh_interval: seconds between checks of the control plane's epoch.
        write_retry_s: how long a write waits for its owners when the caller set no deadline: a restarting shard,
            or one training its index (writes to a collection wait while its IVF/PQ index trains: about two
            minutes for IVF1024 on 102,400 vectors of 512 dimensions on one core).
    """

    def __init__(self, control: ControlPlane, connect: Callable[[str], ShardClient] = GrpcShardClient,
                 refresh_interval: float = 0.5, write_retry_s: float = 300.0, encoders=None):
        from router.encoding import LocalEncoderPool

        self.control = control
        self._connect = connect
        self.encoders = encoders if encoders is not None else LocalEncoderPool()
        self._maps: dict[str, ShardMap] = {}
        self._clients: dict[str, ShardClient] = {}
        self._lock = threading.Lock()
        self._epoch = -1
        self._turn = itertools.count()
        self._write_retry_s = write_retry_s
        self._coarse = CoarseQuantizers(self._fetch_quantizer)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_epoch, args=(refresh_interval,), daemon=True,
                                        name="router-epoch")
        self._poller.start()

    # --- shard map cache ------------------------------------------------------------------------------------
    def _poll_epoch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                epoch = self.control.epoch()
            except Exception as err:  # the controller restarting: keep the cached map meanwhile
                log.warning("cannot read the shard-map epoch: %s", err)
                continue
            if epoch != self._epoch:
                self._refresh_maps()
                self._epoch = epoch

    def _refresh_maps(self) -> None:
        """Fetches a fresh map of every cached collection, here in the poller's thread: calls keep using the
        cached maps meanwhile and never wait for the controller (a map that went stale under a call is caught by
        the shards, which refuse it, and the call then refreshes it itself)."""
        for name in list(self._maps):
            try:
                smap = self.control.shard_map(name)
            except NotFound:
                self.invalidate(name)
                continue
            except Exception as err:  # the controller restarting: drop it, calls fetch it when they need it
                log.warning("cannot refresh the shard map of %s: %s", name, err)
                self.invalidate(name)
                continue
            smap.write_mask, smap.owned_fraction, smap.cover()  # computed here, not by the first call using the map
            with self._lock:
                self._maps[name] = smap

    def invalidate(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._maps.clear()
            else:
                self._maps.pop(name, None)

    def shard_map(self, name: str, refresh: bool = False) -> ShardMap:
        """The cached shard map of a collection. Raises NotFound for an unknown collection."""
        smap = None if refresh else self._maps.get(name)
        if smap is None:
            smap = self.control.shard_map(name)
            with self._lock:
                self._maps[name] = smap
        return smap

    def _fetch_quantizer(self, name: str) -> tuple[int, np.ndarray] | None:
        """(version, coarse centroids) of the collection's trained IVF index from one of its shards that runs the
        current version; None if none does yet (see router.coarse)."""
        smap = self.shard_map(name)
        req = shard_pb2.ShardQuantizerRequest(collection=name)
        for sid in smap.shard_ids:
            if not smap.shards[sid].address:
                continue
            try:
                resp = self._client(smap, sid).call("Quantizer", req, 30.0).result()
            except LookalikeError:
                continue
            if resp.version == smap.collection.trained_version and resp.centroids.rows:
                return resp.version, vectors_from_proto_raw(resp.centroids)
        return None

    def _client(self, smap: ShardMap, shard_id: str) -> ShardClient:
        info = smap.shards[shard_id]
        if not info.address:
            raise Unavailable(f"shard {shard_id} is (re)starting and has no address yet")
        return self._client_at(info.address)

    def _client_at(self, address: str) -> ShardClient:
        """One cached client per shard address."""
        client = self._clients.get(address)
        if client is None:
            with self._lock:
                client = self._clients.get(address) or self._connect(address)
                self._clients[address] = client
        return client

    # --- collections ----------------------------------------------------------------------------------------
    def create_collection(self, cfg: CollectionConfig) -> CollectionConfig:
        out = self.control.create_collection(cfg)
        self.invalidate(cfg.name)
        return out

    def drop_collection(self, name: str) -> None:
        self.control.drop_collection(name)
        self.invalidate(name)

    def list_collections(self) -> list[CollectionConfig]:
        return self.control.list_collections()

    def training_status(self, name: str) -> dict:
        """Where the collection's index training stands (state, version, vectors needed, a sentence)."""
        return self.control.training_status(name)

    def train(self, name: str) -> int:
        """Asks for a new trained version of the collection's index; returns its number."""
        return self.control.train(name)

    def count(self, name: str, timeout: float | None = 5.0) -> int:
        """Items stored in a collection: per bucket, what its owners report (each bucket counted once), under the
        control plane's current map (a cached one may predate a move: its owners have dropped the bucket). Shards
        that do not answer count nothing, after one more try (one may have moved)."""
        return int(self.bucket_counts(name, timeout).sum())

    def bucket_counts(self, name: str, timeout: float | None = 5.0) -> np.ndarray:
        """Items per bucket of a collection, shape (buckets,) int64 (see :meth:`count`)."""
        for _attempt in range(2):
            smap = self.shard_map(name, refresh=True)
            stats = {}
            for sid, fut in self._fan_out(smap, smap.shard_ids, "Stats", shard_pb2.ShardStatsRequest(), timeout):
                try:
                    stats[sid] = fut.result()
                except LookalikeError:
                    continue
            if len(stats) == len(smap.shard_ids):
                break
        return _per_bucket(smap, stats)

    def census(self, timeout: float | None = 5.0) -> Census:
        """Every shard's Stats and every collection's item count, from one fan-out: one Stats call per shard, all
        at once, whatever the number of collections (``timeout`` seconds each), and two calls to the controller
        (shards, maps). Counted as :meth:`count` counts: when a shard holding buckets did not answer, once more
        with fresh maps (it may have restarted at a new address)."""
        for _attempt in range(2):
            infos = self.control.shards()
            maps = self.control.shard_maps()
            shards = self.shard_stats(timeout, infos)
            answered = {info.shard_id: st for info, st in shards if st is not None}
            if all(sid in answered for smap in maps.values() for sid in smap.shard_ids):
                break
        counts = {name: int(_per_bucket(smap, answered).sum()) for name, smap in maps.items()}
        return Census(shards, maps, counts)

    # --- writes ---------------------------------------------------------------------------------------------
    def _deadline(self, timeout: float | None, default: float) -> float:
        return time.monotonic() + (timeout if timeout is not None else default)

    def _fan_out(self, smap: ShardMap, shard_ids, method: str, requests, timeout: float | None):
        """Starts one call per shard concurrently; yields (shard_id, future). ``requests`` is one request for
        all, or a dict shard_id -> request."""
        calls = []
        for sid in shard_ids:
            req = requests[sid] if isinstance(requests, dict) else requests
            try:
                calls.append((sid, self._client(smap, sid).call(method, req, timeout)))
            except LookalikeError as err:
                calls.append((sid, _Failed(err)))
        return calls

    def _write(self, name: str, ids: list[str], build: Callable[[np.ndarray, int], object], method: str,
               timeout: float | None) -> list:
        """Sends a write to every owner of each id's bucket, retrying stale maps and restarting shards until the
        deadline. Returns the responses of the replica-0 owners."""
        deadline = self._deadline(timeout, self._write_retry_s)
        refresh = False
        delay = 0.05
        while True:
            smap = self.shard_map(name, refresh=refresh)
            buckets = buckets_of(ids, smap.collection.buckets)
            holders = smap.write_mask[buckets]              # (n, shards): owners, joining and leaving
            requests = {smap.shard_ids[j]: build(np.flatnonzero(holders[:, j]), smap.epoch)
                        for j in np.flatnonzero(holders.any(axis=0)).tolist()}
            primary = {smap.owners[b][0] for b in np.unique(buckets).tolist()}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"write to collection {name!r} did not complete before the deadline")
            calls = self._fan_out(smap, list(requests), method, requests, remaining)
            responses, retry_err = [], None
            for sid, fut in calls:
                try:
                    resp = fut.result()
                    if sid in primary:
                        responses.append(resp)
                except (StaleShardMap, Unavailable, DeadlineExceeded) as err:
                    retry_err = err
            if retry_err is None:
                return responses
            # Some owner did not take it: the map may be stale (a move, a restarted shard's new address).
            # Writes are idempotent, so the whole batch is sent again.
            if time.monotonic() + delay >= deadline:
                raise Unavailable(f"write to collection {name!r} could not reach every owner: {retry_err}")
            log.info("retrying write to %s after: %s", name, retry_err)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            refresh = True

    def upsert(self, name: str, ids: list[str], x: np.ndarray, payloads=None, timeout: float | None = None) -> int:
        """Writes items to every owner; returns once all are durable.

        Args:
            x: shape (n, d) float32, or (n, d/8) uint8 codes, validated.
            payloads: None, or n ``Payload`` messages (validated for size).
        """
        pl = payloads if payloads is not None and len(payloads) else None

        def build(idx: np.ndarray, epoch: int):
            req = shard_pb2.ShardUpsertRequest(collection=name, ids=[ids[i] for i in idx], epoch=epoch)
            req.vectors.CopyFrom(vectors_to_proto(x[idx]))
            if pl is not None:
                req.payloads.extend(pl[i] for i in idx)
            return req

        self._write(name, ids, build, "Upsert", timeout)
        return len(ids)

    def delete(self, name: str, ids: list[str], timeout: float | None = None) -> tuple[int, int]:
        """Removes items from every owner; returns (removed, missing).

        The counts come from the shards that are replica 0 of some of the ids; with replication > 1 such a shard
        also counts the ids it holds as another replica, so the counts are exact only for replication 1.
        """

        def build(idx: np.ndarray, epoch: int):
            return shard_pb2.ShardDeleteRequest(collection=name, ids=[ids[i] for i in idx], epoch=epoch)

        responses = self._write(name, ids, build, "Delete", timeout)
        return sum(r.count for r in responses), sum(r.missing for r in responses)

    def encode(self, name: str, images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Images through the collection's encoder: (vectors of those that decode, reason or None per image).

        Raises:
            FailedPrecondition: the collection has no encoder.
        """
        coll = self.shard_map(name).collection
        if not coll.encoder:
            raise FailedPrecondition(
                f"collection {name!r} has no encoder: send vectors, or create a collection with an encoder "
                "(for example --encoder phash)")
        try:
            return self.encoders.encode_many(coll.encoder, images)
        except ValueError as err:  # the encoder cannot be loaded here (missing extra or model file)
            raise FailedPrecondition(f"encoder {coll.encoder!r} of collection {name!r} is not usable: {err}") from None

    # --- reads ----------------------------------------------------------------------------------------------
    def get(self, name: str, ids: list[str], include_vectors: bool = False, timeout: float | None = None):
        """(found ids in request order, vectors (n, d) or None, serialized payloads). Each id is asked of one
        owner of its bucket, another owner if that one fails, and again with a fresh map if the map was stale."""
        deadline = None if timeout is None else time.monotonic() + timeout
        smap = self.shard_map(name)
        found: dict[str, tuple] = {}
        pending = list(range(len(ids)))
        tried: set[str] = set()
        last_err: LookalikeError | None = None
        for _ in range(_SEARCH_ROUNDS):
            buckets = buckets_of([ids[i] for i in pending], smap.collection.buckets)
            by_shard: dict[str, list[int]] = {}
            for i, b in zip(pending, buckets.tolist()):
                sid = next((s for s in smap.owners[b] if s not in tried), None)
                if sid is None:  # every owner of its bucket failed
                    raise Unavailable(f"get on {name!r}: no owner of bucket {b} answered: {last_err}")
                by_shard.setdefault(sid, []).append(i)
            requests = {sid: shard_pb2.ShardGetRequest(collection=name, ids=[ids[i] for i in idx],
                                                       include_vectors=include_vectors, epoch=smap.epoch)
                        for sid, idx in by_shard.items()}
            left = None if deadline is None else deadline - time.monotonic()
            pending, stale, failed = [], False, []
            for sid, fut in self._fan_out(smap, list(requests), "Get", requests, left):
                try:
                    resp = fut.result()
                except _CALLER_ERRORS:
                    raise
                except LookalikeError as err:
                    last_err = err
                    pending.extend(by_shard[sid])
                    if isinstance(err, StaleShardMap):
                        stale = True
                    else:
                        failed.append(sid)
                    continue
                vecs = vectors_from_proto_raw(resp.vectors) if include_vectors and resp.ids else None
                for i, uid in enumerate(resp.ids):
                    found[uid] = (vecs[i] if vecs is not None else None, resp.payloads[i])
            if not pending:
                break
            if stale or failed:
                if stale:
                    time.sleep(0.02)
                fresh = self.shard_map(name, refresh=True)
                for sid in failed:  # a shard that restarted at a new address is asked again there
                    info = fresh.shards.get(sid)
                    if info is None or not info.address or info.address == smap.shards[sid].address:
                        tried.add(sid)
                smap = fresh
        if pending:
            if isinstance(last_err, StaleShardMap):  # the map kept changing under us: a moment of unavailability
                raise Unavailable(f"get on {name!r}: the shard map kept changing ({last_err}); retry")
            raise last_err
        out_ids = [u for u in dict.fromkeys(ids) if u in found]
        vectors = np.stack([found[u][0] for u in out_ids]) if include_vectors and out_ids else None
        return out_ids, vectors, [found[u][1] for u in out_ids]

    def search(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
               min_coverage: float = 1.0, include_payloads: bool = False, timeout: float | None = None):
        """k-NN over all buckets: each shard answers for the buckets it holds; one merge.

        Args:
            xq: shape (nq, d) float32 (or (nq, d/8) uint8 codes), already validated.
            min_coverage: fraction of buckets that must answer, in (0, 1].

        Returns:
            SearchResult; its ``payloads`` hold protobuf Payload messages when asked for.

        Raises:
            Unavailable: fewer buckets answered than min_coverage.
        """
        steps = self._search_steps(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout)
        got = None
        while True:
            try:
                op = steps.send(got)
            except StopIteration as stop:
                return stop.value
            got = self._search_step(op)

    async def search_async(self, name: str, xq: np.ndarray, k: int, nprobe: int = 0, ef_search: int = 0,
                           min_coverage: float = 1.0, include_payloads: bool = False, timeout: float | None = None,
                           executor=None):
        """:meth:`search` as a coroutine, for the router's asyncio server: the shard calls are made on the running
        loop (``ShardClient.acall``), so a search waits on no thread. What can block (fetching a shard map from
        the control plane, merging a big answer) runs on ``executor`` (None: the loop's default)."""
        steps = self._search_steps(name, xq, k, nprobe, ef_search, min_coverage, include_payloads, timeout)
        got = None
        while True:
            try:
                op = steps.send(got)
            except StopIteration as stop:
                return stop.value
            got = await self._search_step_async(op, executor)

    def _search_step(self, op):
        """Does one thing a search asks for (see :meth:`_search_steps`), blocking this thread."""
        if op[0] == "map":
            return self.shard_map(op[1], refresh=op[2])
        if op[0] == "call":
            _, smap, targets, req, left = op
            return [(sid, _outcome(fut)) for sid, fut in self._fan_out(smap, targets, "Search", req, left)]
        if op[0] == "sleep":
            return time.sleep(op[1])
        return op[1]()  # "compute"

    async def _search_step_async(self, op, executor):
        """The same on the running loop; what can block goes to ``executor``."""
        loop = asyncio.get_running_loop()
        if op[0] == "map":  # a call to the control plane
            return await loop.run_in_executor(executor, self.shard_map, op[1], op[2])
        if op[0] == "call":
            _, smap, targets, req, left = op
            return await self._fan_out_async(smap, targets, "Search", req, left)
        if op[0] == "sleep":
            return await asyncio.sleep(op[1])
        if not op[2]:  # "compute", small: cheaper here than a thread hop
            return op[1]()
        return await loop.run_in_executor(executor, op[1])

    async def _fan_out_async(self, smap: ShardMap, shard_ids, method: str, request, timeout: float | None):
        """:meth:`_fan_out` on the running loop; returns [(shard_id, response or LookalikeError)]."""
        async def one(sid):
            try:
                return await self._client(smap, sid).acall(method, request, timeout)
            except LookalikeError as err:
                return err
        outcomes = await asyncio.gather(*(one(sid) for sid in shard_ids))
        return list(zip(shard_ids, outcomes))

    def _search_steps(self, name: str, xq: np.ndarray, k: int, nprobe: int, ef_search: int, min_coverage: float,
                      include_payloads: bool, timeout: float | None):
        """The search's logic as a generator, shared by :meth:`search` (threads) and :meth:`search_async`
        (asyncio): it yields what it needs done and is sent the outcome:

        - ``("map", name, refresh)``: the collection's shard map from the control plane (:meth:`shard_map`;
          a cached map is read here, without a step);
        - ``("call", smap, shard_ids, request, timeout)``: a Search to each shard, concurrently; the outcome is
          [(shard_id, response or LookalikeError)];
        - ``("sleep", seconds)``;
        - ``("compute", fn, heavy)``: ``fn()`` (choosing the IVF lists, the merge), whose value is sent back; a
          heavy one runs on a thread in the asyncio driver.

        It returns the SearchResult.
        """
        check_search_params(nprobe, ef_search)
        check_answer_size(len(xq), k, include_payloads)  # refused before every shard runs the whole search
        deadline = None if timeout is None else time.monotonic() + timeout
        smap = self._maps.get(name)
        if smap is None:  # not cached: the driver fetches it from the control plane
            smap = yield ("map", name, False)
        req = shard_pb2.ShardSearchRequest(collection=name, k=k, include_payloads=include_payloads)
        req.queries.CopyFrom(vectors_to_proto(xq))
        req.params.nprobe = nprobe
        req.params.ef_search = ef_search
        cfg = smap.collection
        quantizer = self._coarse.ready(cfg)
        if quantizer is not None:  # the IVF lists each query probes, chosen here once for all shards
            req.coarse.CopyFrom((yield ("compute", lambda: CoarseQuantizers.assign(quantizer, cfg, xq, nprobe),
                                        len(xq) * quantizer.index.ntotal * cfg.dim > QUANTIZE_ON_LOOP)))
        nq = len(xq)
        n_buckets = smap.collection.buckets
        covered = np.zeros(n_buckets, dtype=bool)
        answered: set[str] = set()
        responses, failures = [], {}
        rotation = next(self._turn)
        for attempt in range(_SEARCH_ROUNDS):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            # Every shard answers for all it holds, so a cover of the missing buckets is enough. A shard that
            # answered already may be asked again: under a fresh map it may own buckets it was still copying in.
            first = not answered
            targets = smap.cover(None if first else ~covered, set(failures), rotation)
            if not targets:
                break
            req.epoch = smap.epoch
            answered_now = []
            for sid, resp in (yield ("call", smap, targets, req, left)):
                if isinstance(resp, _CALLER_ERRORS):
                    raise resp
                if isinstance(resp, LookalikeError):
                    failures[sid] = resp
                    continue
                failures.pop(sid, None)
                answered.add(sid)
                answered_now.append(sid)
                responses.append(resp)
            if first and not failures:  # the usual case: the whole cover answered, every owned bucket is covered
                covered = smap.owned
                break
            for sid in answered_now:
                covered |= smap.served_by(sid)
            if covered.all():
                break
            # Buckets are missing. A fresh map may move them (a move, or a shard that restarted at a new
            # address); a shard that said the map was stale is asked again under the fresh one.
            stale = any(isinstance(e, StaleShardMap) for e in failures.values())
            if stale and attempt:
                yield ("sleep", min(0.01 * 2 ** attempt, 0.2))
            fresh = yield ("map", name, True)
            for sid in list(failures):
                info = fresh.shards.get(sid)
                if isinstance(failures[sid], StaleShardMap) or (
                        info is not None and info.address and info.address != smap.shards[sid].address):
                    failures.pop(sid)
            smap = fresh
        coverage = smap.owned_fraction if covered is smap.owned else float(covered.sum()) / n_buckets
        failed = "; ".join(f"{sid}: {err}" for sid, err in failures.items())
        if failures:
            self.invalidate(name)
            _search_warnings.warning(
                (name, tuple(sorted((sid, type(err).__name__) for sid, err in failures.items()))),
                "search on %s: %d shard(s) failed: %s", name, len(failures), failed)
        if coverage < min_coverage or not responses:
            raise Unavailable(
                f"only {int(covered.sum())} of {n_buckets} buckets of {name!r} answered (coverage {coverage:.3f} "
                f"< min_coverage {min_coverage:g}); failed: {failed or 'none'}")
        larger_is_better = smap.collection.larger_is_better

        def finish():
            D, out_ids, out_pl = _merge_responses(responses, nq, k, larger_is_better, include_payloads)
            return SearchResult(D, out_ids, out_pl, coverage, smap.epoch)
        return (yield ("compute", finish, nq * k * len(responses) > _MERGE_ON_LOOP))

    # --- catalog jobs -----------------------------------------------------------------------------------------
    def _per_owner(self, name: str, buckets, method: str, build: Callable[[str, list[int], int], object],
                   timeout: float | None) -> list[tuple[str, list[int], object]]:
        """Sends ``build(shard_id, buckets, epoch)`` to one owner of each bucket, trying another owner or a fresh
        map when one fails. Returns (shard_id, its buckets, response) per call that worked."""
        deadline = self._deadline(timeout, self._write_retry_s)
        pending = sorted({int(b) for b in buckets})
        smap = self.shard_map(name)
        n = smap.collection.buckets
        if any(b < 0 or b >= n for b in pending):
            raise InvalidArgument(f"bucket numbers of {name!r} run from 0 to {n - 1}")
        out, tried, last_err, delay = [], set(), None, 0.05
        while pending:
            by_shard: dict[str, list[int]] = {}
            for b in pending:
                sid = next((s for s in smap.owners[b] if s not in tried), None)
                if sid is None:
                    raise Unavailable(f"{method} on {name!r}: no owner of bucket {b} answered: {last_err}")
                by_shard.setdefault(sid, []).append(b)
            requests = {sid: build(sid, bs, smap.epoch) for sid, bs in by_shard.items()}
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"{method} on {name!r} did not complete before the deadline")
            failed: set[int] = set()
            for sid, fut in self._fan_out(smap, list(requests), method, requests, left):
                try:
                    out.append((sid, by_shard[sid], fut.result()))
                except _CALLER_ERRORS:
                    raise
                except LookalikeError as err:
                    last_err = err
                    failed.update(by_shard[sid])
                    if not isinstance(err, StaleShardMap):
                        tried.add(sid)
            pending = sorted(failed)
            if pending:
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
                smap = self.shard_map(name, refresh=True)
        return out

    def scan(self, name: str, buckets, include_vectors: bool = False, include_payloads: bool = False,
             timeout: float | None = None):
        """The items of some buckets, each read from one owner: (ids, vectors (n, d) or None, payloads or None)."""
        coll = self.shard_map(name).collection

        def build(sid, bs, epoch):
            return shard_pb2.ShardScanRequest(collection=name, buckets=bs, include_vectors=include_vectors,
                                              include_payloads=include_payloads, epoch=epoch)

        ids, vectors, payloads = [], [], []
        for _sid, _bs, resp in self._per_owner(name, buckets, "Scan", build, timeout):
            ids.extend(resp.ids)
            if include_vectors and resp.ids:
                vectors.append(vectors_from_proto_raw(resp.vectors))
            if include_payloads:
                payloads.extend(resp.payloads)
        if include_vectors:
            dtype, cols = (np.uint8, coll.dim // 8) if coll.metric == "hamming" else (np.float32, coll.dim)
            vecs = np.concatenate(vectors) if vectors else np.empty((0, cols), dtype=dtype)
        return ids, (vecs if include_vectors else None), (payloads if include_payloads else None)

    def sample(self, name: str, size: int, seed: int = 0, include_vectors: bool = False,
               timeout: float | None = None):
        """About ``size`` items from whole buckets drawn in a seeded random order (an id's bucket is a hash of it,
        so this is a uniform sample of items); as :meth:`scan`, cut to ``size``."""
        counts = self.bucket_counts(name, timeout)
        order = np.random.default_rng(seed).permutation(len(counts))
        upto = int(np.searchsorted(np.cumsum(counts[order]), size)) + 1
        ids, x, payloads = self.scan(name, order[:upto].tolist(), include_vectors, True, timeout)
        keep = min(size, len(ids))
        return ids[:keep], (x[:keep] if x is not None else None), payloads[:keep]

    def assign_clusters(self, name: str, centroids: np.ndarray, field: str, buckets,
                        timeout: float | None = None) -> np.ndarray:
        """Every holder of each bucket in ``buckets`` labels that bucket's items with their nearest centroid
        (payload ``field``); a shard that fails is asked again, with a fresh map, until the deadline. Returns items
        per centroid (each bucket counted once, by its first owner)."""
        deadline = self._deadline(timeout, self._write_retry_s)
        todo = {int(b) for b in buckets}
        sizes = np.zeros(len(centroids), dtype=np.int64)
        delay, last_err = 0.05, None
        cent = vectors_to_proto(np.ascontiguousarray(centroids, dtype=np.float32))
        done: set[tuple[str, int]] = set()   # (shard, bucket) labelled
        counted: set[int] = set()
        while todo:
            smap = self.shard_map(name, refresh=last_err is not None)
            holders = smap.write_mask                          # owners, joining and leaving
            requests, sent = {}, {}
            for j, sid in enumerate(smap.shard_ids):
                bs = sorted(b for b in todo if holders[b, j] and (sid, b) not in done)
                if bs:
                    req = shard_pb2.ShardAssignRequest(
                        collection=name, field=field, buckets=bs, epoch=smap.epoch,
                        count_buckets=[b for b in bs if b not in counted and smap.owners[b][:1] == (sid,)])
                    req.centroids.CopyFrom(cent)
                    requests[sid], sent[sid] = req, req
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"labelling {name!r}: {len(todo)} bucket(s) not done before the deadline: {last_err}")
            for sid, fut in self._fan_out(smap, list(requests), "AssignClusters", requests, left):
                try:
                    sizes += np.asarray(fut.result().sizes, dtype=np.int64)
                except _CALLER_ERRORS:
                    raise
                except LookalikeError as err:
                    last_err = err
                    continue
                done.update((sid, b) for b in sent[sid].buckets)
                counted.update(sent[sid].count_buckets)
            # a bucket is done once every holder (under the latest map) labelled it
            todo = {b for b in todo if any((s, b) not in done for s in smap._holders(b))}
            if todo:
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
        return sizes

    def shard_stats(self, timeout: float | None = 2.0,
                    infos: list[ShardInfo] | None = None) -> list[tuple[ShardInfo, object | None]]:
        """(info, ShardStatsResponse or None if unreachable) for every shard the controller knows (or of
        ``infos``), asked all at once."""
        if infos is None:
            infos = self.control.shards()
        calls = []
        for info in infos:
            try:
                fut = (self._client_at(info.address).call("Stats", shard_pb2.ShardStatsRequest(), timeout)
                       if info.address else None)
            except LookalikeError:
                fut = None
            calls.append((info, fut))
        out = []
        for info, fut in calls:
            resp = _outcome(fut) if fut is not None else None
            out.append((info, None if isinstance(resp, LookalikeError) else resp))
        return out

    def close(self) -> None:
        self._stop.set()
        for c in list(self._clients.values()):
            c.close()


class _Failed:
    """A call that could not start (no address): behaves like a future that raises."""

    def __init__(self, err: Exception):
        self._err = err

    def result(self, timeout=None):
        raise self._err


def _per_bucket(smap: ShardMap, stats: dict) -> np.ndarray:
    """Items per bucket of ``smap``'s collection, shape (buckets,) int64, from the shards' Stats (shard id ->
    ShardStatsResponse): per bucket the largest count any of its owners reports (joining and leaving holders are
    not counted, so a bucket being moved counts once); 0 for buckets no owner reported."""
    name = smap.collection.name
    per_bucket = np.zeros(smap.collection.buckets, dtype=np.int64)
    for sid, resp in stats.items():
        for c in resp.collections:
            if c.name == name and len(c.bucket_counts) == 4 * len(per_bucket):
                counts = np.frombuffer(c.bucket_counts, dtype="<u4").astype(np.int64)
                per_bucket = np.maximum(per_bucket, np.where(smap.served_by(sid), counts, 0))
    return per_bucket


def _outcome(fut):
    """A shard call's response, or the LookalikeError it raised."""
    try:
        return fut.result()
    except LookalikeError as err:
        return err


# Result slots (queries x k x answering shards) up to which search_async merges on the event loop rather than on a
# thread. Measured here: 0.04 ms at 40 slots (batch 1), 0.5 ms at 4,000 (batch 100), 2.3 ms at 20,000. The merge is
# mostly Python holding the GIL, so a thread saves the loop little for these sizes; it lets the loop interleave
# other callers during the bigger merges.
_MERGE_ON_LOOP = 20_000


def _merge_responses(responses, nq: int, k: int, larger_is_better: bool, include_payloads: bool):
    """One top-k from the shards' answers: (D (nq, k), nq lists of ids, nq lists of payloads or None)."""
    Ds = [np.frombuffer(r.distances, dtype="<f4").reshape(nq, k) for r in responses]
    Ls = [np.frombuffer(r.labels, dtype="<i8").reshape(nq, k) for r in responses]
    ids, payloads = [], []
    for r in responses:
        ids.extend(r.ids)
        if include_payloads:
            payloads.extend(r.payloads)
    D, I = merge_topk(np.stack(Ds), np.stack(Ls), larger_is_better)
    ids_arr = np.array(ids, dtype=object)
    out_ids, out_pl = [], [] if include_payloads else None
    for q in range(nq):
        row = I[q][I[q] >= 0]
        out_ids.append(ids_arr[row].tolist())
        if include_payloads:
            out_pl.append([payloads[i] for i in row.tolist()])
    return D, out_ids, out_pl


class RateLimitedLog:
    """Logs at most one line per key every ``interval_s`` seconds; the next line that gets out says how many
    like it were left out since. For warnings that every request can repeat (a shard down fails each search)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 1024):
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: dict[object, list] = {}  # key -> [time of the last line logged, lines left out since]

    def warning(self, key, msg: str, *args) -> bool:
        """Logs ``msg % args`` unless a line of ``key`` went out less than interval_s ago. Returns whether it
        logged."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.interval_s:
                seen[1] += 1
                return False
            left_out = 0 if seen is None else seen[1]
            if seen is None and len(self._seen) >= self.max_keys:  # forget keys that went quiet
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
            self._seen[key] = [now, 0]
        if left_out:
            msg += " (and %d more like it since the last such line, not logged)"
            args = args + (left_out,)
        self.logger.warning(msg, *args)
        return True


_search_warnings = RateLimitedLog(log)


def check_min_coverage(value: float | None) -> float:
    if value is None:
        return 1.0
    if not 0.0 < value <= 1.0:
        raise InvalidArgument(f"min_coverage must be in (0, 1], got {value}")
    return float(value)


