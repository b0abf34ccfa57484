"""The router's view of the shards: the cached shard maps, one client per shard process (address), and calls fanned
out to many shards at once (futures for threads, or gathered on an event loop). A process may hold several shards
(shard.host): each call names its shard, and a search asks each process once for all of its shards it needs.

Used by every part of the router (router.search, router.writes, router.reads, router.status). It may use the base
package (lookalike), the shard protocol (protos) and router.shard_client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable

import numpy as np

from lookalike.errors import (FailedPrecondition, InvalidArgument, LookalikeError, NotFound, ResourceExhausted,
                              StaleShardMap, Unavailable, error_for_number)
from lookalike.shardmap import ShardMap
from lookalike.wire import vectors_from_proto_raw
from protos import shard_pb2
from router.shard_client import ShardClient

log = logging.getLogger(__name__)

# Errors that say the request itself is wrong: retrying or asking another shard cannot help.
CALLER_ERRORS = (InvalidArgument, NotFound, ResourceExhausted)


class Shards:
    """Shard maps and clients, for the router's parts.

    The maps are cached per collection; a poller thread checks the control plane's epoch every
    ``refresh_interval`` seconds and, when it changed, fetches a fresh map of every cached collection.

    Args:
        control: the control plane (router.core.ControlPlane).
        connect: address -> ShardClient.
        refresh_interval: seconds between checks of the control plane's epoch.
    """

    def __init__(self, control, connect: Callable[[str], ShardClient], refresh_interval: float):
        self.control = control
        self._connect = connect
        self._maps: dict[str, ShardMap] = {}
        self._clients: dict[str, ShardClient] = {}
        self._lock = threading.Lock()
        self._epoch = -1
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

    def cached(self, name: str) -> ShardMap | None:
        """The cached map of a collection, or None (never asks the control plane)."""
        return self._maps.get(name)

    def shard_map(self, name: str, refresh: bool = False) -> ShardMap:
        """The cached shard map of a collection. Raises NotFound for an unknown collection."""
        smap = None if refresh else self._maps.get(name)
        if smap is None:
            smap = self.control.shard_map(name)
            with self._lock:
                self._maps[name] = smap
        return smap

    # --- clients --------------------------------------------------------------------------------------------
    def client(self, smap: ShardMap, shard_id: str) -> "_ForShard":
        """The client of the shard's process, its calls naming the shard (a process may hold several)."""
        info = smap.shards[shard_id]
        if not info.address:
            raise Unavailable(f"shard {shard_id} is (re)starting and has no address yet")
        return _ForShard(self.client_at(info.address), shard_id)

    def client_at(self, address: str) -> ShardClient:
        """One cached client per shard address."""
        client = self._clients.get(address)
        if client is None:
            with self._lock:
                client = self._clients.get(address) or self._connect(address)
                self._clients[address] = client
        return client

    def fetch_quantizer(self, name: str) -> tuple[int, np.ndarray] | None:
        """(version, coarse centroids) of the collection's trained IVF index from one of its shards that runs the
        current version; None if none does yet (see router.coarse)."""
        smap = self.shard_map(name)
        req = shard_pb2.ShardQuantizerRequest(collection=name)
        for sid in smap.shard_ids:
            if not smap.shards[sid].address:
                continue
            try:
                resp = self.client(smap, sid).call("Quantizer", req, 30.0).result()
            except LookalikeError:
                continue
            if resp.version == smap.collection.trained_version and resp.centroids.rows:
                return resp.version, vectors_from_proto_raw(resp.centroids)
        return None

    # --- fan-out --------------------------------------------------------------------------------------------
    def fan_out(self, smap: ShardMap, shard_ids, method: str, requests, timeout: float | None):
        """Starts one call per shard concurrently; returns [(shard_id, future)]. ``requests`` is one request for
        all, or a dict shard_id -> request."""
        calls = []
        for sid in shard_ids:
            req = requests[sid] if isinstance(requests, dict) else requests
            try:
                calls.append((sid, self.client(smap, sid).call(method, req, timeout)))
            except LookalikeError as err:
                calls.append((sid, _Failed(err)))
        return calls

    async def fan_out_async(self, smap: ShardMap, shard_ids, method: str, request, timeout: float | None):
        """:meth:`fan_out` on the running loop; returns [(shard_id, response or LookalikeError)]."""
        async def one(sid):
            try:
                return await self.client(smap, sid).acall(method, request, timeout)
            except LookalikeError as err:
                return err
        outcomes = await asyncio.gather(*(one(sid) for sid in shard_ids))
        return list(zip(shard_ids, outcomes))

    # --- searches: one call per shard process ---------------------------------------------------------------
    def search(self, smap: ShardMap, shard_ids, request, timeout: float | None) -> list[tuple]:
        """A Search of every shard in ``shard_ids``, one call per process (shards that share one: shard.host),
        concurrently. Returns [(shard ids, response or LookalikeError, {shard id: its LookalikeError})]: a call's
        answer is the merged top k of its shards but those in the dict."""
        calls = []
        for sids in _by_process(smap, shard_ids):
            try:
                client, req = self._search_call(smap, sids, request)
                calls.append((sids, client.call("Search", req, timeout)))
            except LookalikeError as err:
                calls.append((sids, _Failed(err)))
        return [(sids, *_answered(sids, outcome(fut))) for sids, fut in calls]

    async def search_async(self, smap: ShardMap, shard_ids, request, timeout: float | None) -> list[tuple]:
        """:meth:`search` on the running loop."""
        async def one(sids):
            try:
                client, req = self._search_call(smap, sids, request)
                return await client.acall("Search", req, timeout)
            except LookalikeError as err:
                return err
        groups = _by_process(smap, shard_ids)
        outcomes = await asyncio.gather(*(one(sids) for sids in groups))
        return [(sids, *_answered(sids, out)) for sids, out in zip(groups, outcomes)]

    def _search_call(self, smap: ShardMap, sids: list[str], request):
        """(client, request) of one process's search: a lone shard's own call, or the process's naming its
        shards."""
        if len(sids) == 1:
            return self.client(smap, sids[0]), request
        return self.client_at(smap.shards[sids[0]].address), _for_shards(request, sids)

    def close(self) -> None:
        self._stop.set()
        for c in list(self._clients.values()):
            c.close()


class _ForShard:
    """A process's client whose calls name one shard."""

    __slots__ = ("_client", "shard_id")

    def __init__(self, client: ShardClient, shard_id: str):
        self._client = client
        self.shard_id = shard_id

    def call(self, method: str, request, timeout: float | None):
        return self._client.call(method, request, timeout, self.shard_id)

    async def acall(self, method: str, request, timeout: float | None):
        return await self._client.acall(method, request, timeout, self.shard_id)


def _by_process(smap: ShardMap, shard_ids) -> list[list[str]]:
    """``shard_ids`` grouped by the address of their process, in first-seen order (one with no address yet alone:
    its call fails as unavailable)."""
    groups: dict[str, list[str]] = {}
    for sid in shard_ids:
        address = smap.shards[sid].address
        groups.setdefault(address or f"\0{sid}", []).append(sid)
    return list(groups.values())


def _for_shards(request, sids: list[str]):
    """The search request naming the shards of one process."""
    req = type(request)()
    req.CopyFrom(request)
    req.shards.extend(sids)
    return req


def _answered(sids: list[str], resp) -> tuple:
    """(response or error, {shard id: error}) of one process's search: a multi-shard answer's failures as the
    errors each shard's own call would have raised (FAILED_PRECONDITION: a stale map)."""
    if isinstance(resp, LookalikeError) or not resp.failures:
        return resp, {}
    failed = {}
    for f in resp.failures:
        if f.shard in sids:
            err = error_for_number(f.code, f.message)
            failed[f.shard] = StaleShardMap(str(err)) if type(err) is FailedPrecondition else err
    return resp, failed


class _Failed:
    """A call that could not start (no address): behaves like a future that raises."""

    def __init__(self, err: Exception):
        self._err = err

    def result(self, timeout=None):
        raise self._err


def outcome(fut):
    """A shard call's response, or the LookalikeError it raised."""
    try:
        return fut.result()
    except LookalikeError as err:
        return err
