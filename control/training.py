"""Trained indexes: the collection-wide training of an index that needs it (IVF, PQ), and moving shards into it.

A collection whose index needs training searches exactly until it holds enough vectors; then one shard trains
version N on a sample read from every bucket's storage (``ShardPlacer.train_collection``), the controller
publishes it (the collection's config carries ``trained_version``), and every shard holding the collection moves
into it (``use_trained``), searching the previous version (or exactly) meanwhile. It is trained again as it
grows (``lookalike.indexspec.RETRAIN_GROWTH``) and when asked (``lookalike train``).

Uses lookalike (config, errors, indexspec), numpy and the controller's parts (control.state, control.registry);
reaches shards through a ``control.placer.ShardPlacer`` that has ``train_collection`` and ``use_trained``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np

from control.placer import ShardPlacer
from control.registry import CollectionRegistry
from control.state import ClusterState, Training
from lookalike.config import CollectionConfig, MovePolicy
from lookalike.errors import FailedPrecondition
from lookalike.indexspec import RETRAIN_GROWTH, training_points

log = logging.getLogger(__name__)

_GROWTH_CHECK_S = 10.0  # seconds between counts of a trained collection that may be trained again as it grows


class Trainings:
    """Starts the trainings collections need, numbers their versions across the cluster, moves shards into them,
    and says where each stands."""

    def __init__(self, state: ClusterState, placer: ShardPlacer, policy: MovePolicy, registry: CollectionRegistry):
        self._state = state
        self._placer = placer
        self._policy = policy
        self._registry = registry

    def loop(self, stop: threading.Event) -> None:
        """Trains collections that reached their threshold (or were asked to), and moves every shard into the current
        trained version."""
        while not stop.wait(self._policy.train_check_s):
            try:
                self.check_training()
            except Exception:  # noqa: BLE001: a failed check is logged and tried again at the next one
                log.exception("training check failed")

    def check_training(self) -> None:
        """One pass of the training loop (also called by tests)."""
        with self._state.cond:
            names = [n for n, c in self._state.collections.items() if training_points(c.cfg.index)[0]]
        for name in names:
            with self._state.cond:
                c = self._state.collections.get(name)
                if c is None or c.training.running:
                    continue
                cfg, tr, trained_on = c.cfg, c.training, c.trained_on
            needed, sample = training_points(cfg.index)
            # Counting asks every shard: once trained, only now and then, to see whether it grew enough to train again.
            recount = time.monotonic() >= tr.counted_at + (_GROWTH_CHECK_S if cfg.trained_version else 0)
            if (cfg.trained_version == 0 or tr.requested or trained_on < sample) and recount:
                sizes = self._registry.bucket_sizes(name)
                tr.vectors = int(sizes.sum())
                tr.counted_at = time.monotonic()
                grown = cfg.trained_version and trained_on < sample and tr.vectors >= RETRAIN_GROWTH * trained_on
                if tr.vectors >= needed and (cfg.trained_version == 0 or tr.requested or grown) \
                        and time.monotonic() >= tr.retry_at:
                    self._train(name, cfg, tr, sample, sizes)
            self._sync_trained(name)

    def _train(self, name: str, cfg: CollectionConfig, tr: Training, sample: int, sizes: np.ndarray) -> None:
        """Trains the next version on one shard (reading a sample of every bucket from storage), then publishes it.

        Versions are numbered across the whole cluster, never twice (``trained_seq`` in the state): a collection
        dropped and created again under its name never meets a version number its predecessor used, so a router
        or shard holding the old one's coarse centroids cannot take them for the new one's."""
        with self._state.cond:
            c = self._state.collections.get(name)
            if c is None or c.cfg != cfg:
                return
            # A retry keeps its number.
            version = tr.next_version = tr.next_version or self._state.next_trained_version()
            order = np.random.default_rng(version).permutation(cfg.buckets)
            trainer = next((s for s in sorted(c.holders()) if self._state.info(s).serving), None)
            owners = [list(o) for o in c.owners]
            tr.running, tr.running_version, tr.started = True, version, time.monotonic()
        try:
            if trainer is None:
                raise FailedPrecondition("no shard of the collection is serving")
            upto = int(np.searchsorted(np.cumsum(sizes[order]), sample)) + 1
            sources: dict[str, list[int]] = {}
            for b in order[:upto].tolist():
                sources.setdefault(owners[b][0], []).append(b)
            note = self._placer.train_collection(trainer, cfg, version, list(sources.items()), sample)
        except Exception as err:  # noqa: BLE001: reported in describe/status, tried again later
            with self._state.cond:
                tr.running = False
                tr.error = f"training v{version} failed: {err}"
                tr.retry_at = time.monotonic() + self._policy.train_retry_s
            log.error("%s: %s; trying again in %.0fs", name, tr.error, self._policy.train_retry_s)
            return
        with self._state.cond:
            tr.running = False
            c = self._state.collections.get(name)
            if c is None or c.cfg != cfg:  # dropped (or recreated) meanwhile
                return
            c.cfg = dataclasses.replace(cfg, trained_version=version)
            c.trained_on = int(note.get("trained_on", 0))
            tr.error = ""
            if tr.next_version == version:  # else `train` asked for another one meanwhile: it comes next
                tr.requested, tr.next_version = False, 0
            tr.ready, tr.adopt_errors = {}, {}
            self._state.bump()
        log.info("%s: trained index v%d (%s) on %d vectors in %.1fs; moving the shards into it", name, version,
                 cfg.index, c.trained_on, note.get("seconds", 0.0))

    def _sync_trained(self, name: str) -> None:
        """Tells each shard holding the collection that is not yet on the current trained version to move into it,
        each in a thread of its own (encoding a shard's items takes a while)."""
        with self._state.cond:
            c = self._state.collections.get(name)
            if c is None or not c.cfg.trained_version:
                return
            cfg, tr = c.cfg, c.training
            holders = c.holders() | {m.target for m in c.moves.values()}
            todo = [s for s in sorted(holders) if tr.ready.get(s) != cfg.trained_version and s not in tr.adopting
                    and self._state.info(s).serving]
            tr.adopting.update(todo)

        def adopt(sid):
            try:
                self._placer.use_trained(sid, cfg)
            except Exception as err:  # noqa: BLE001: tried again at the next check
                with self._state.cond:
                    tr.adopt_errors[sid] = str(err)
                log.warning("%s: shard %s could not move into trained index v%d: %s", name, sid, cfg.trained_version,
                            err)
            else:
                with self._state.cond:
                    tr.ready[sid] = cfg.trained_version
                    tr.adopt_errors.pop(sid, None)
            finally:
                with self._state.cond:
                    tr.adopting.discard(sid)
                    self._state.cond.notify_all()

        for sid in todo:
            threading.Thread(target=adopt, args=(sid,), name=f"adopt-{name}-{sid}", daemon=True).start()

    def train(self, name: str) -> int:
        """Asks for a new training of a collection (``lookalike train``): the next check trains version N+1 on a fresh
        sample and the shards move into it, searching the old version meanwhile. Returns the new version's number
        (versions are numbered across the cluster: the next one, not necessarily N+1).

        Raises:
            NotFound; FailedPrecondition: the spec needs no training, or the collection holds too few vectors.
        """
        with self._state.cond:
            c = self._state.coll(name)
            cfg = c.cfg
        needed, _ = training_points(cfg.index)
        if not needed:
            raise FailedPrecondition(f"collection {name!r} ({cfg.index}) has an index that needs no training")
        size = int(self._registry.bucket_sizes(name).sum())
        if size < needed:
            raise FailedPrecondition(f"collection {name!r} ({cfg.index}) holds {size} vectors; training needs "
                                     f"{needed} (until then its searches are exact)")
        with self._state.cond:
            if c.training.running and c.training.next_version == c.training.running_version:
                c.training.next_version = 0  # the training under way began before this request: one more after it
            if not (c.training.requested and c.training.next_version):
                c.training.next_version = self._state.next_trained_version()
            c.training.requested = True
            c.training.retry_at = c.training.counted_at = 0.0
            return c.training.next_version

    def training_statuses(self) -> dict[str, dict]:
        """:meth:`training_status` of every collection, in one call."""
        with self._state.cond:
            return {name: self.training_status(name) for name in self._state.collections}

    def training_status(self, name: str) -> dict:
        """Where a collection's training stands, for describe and status: state ("not_needed", "untrained",
        "training", "trained"), version, vectors, vectors_needed, trained_on, shards_ready, shards, and a sentence."""
        with self._state.cond:
            c = self._state.coll(name)
            cfg, tr = c.cfg, c.training
            needed, _ = training_points(cfg.index)
            holders = sorted(c.holders())
            ready = sum(tr.ready.get(s) == cfg.trained_version for s in holders) if cfg.trained_version else 0
            out = {"version": cfg.trained_version, "vectors": tr.vectors, "vectors_needed": needed,
                   "trained_on": c.trained_on, "shards_ready": ready, "shards": len(holders),
                   "next_version": tr.next_version}
            if not needed:
                return {**out, "shards_ready": len(holders), "state": "not_needed",
                        "message": f"{cfg.index} needs no training"}
            if tr.running:
                state = "training"
                msg = (f"training v{tr.running_version} ({time.monotonic() - tr.started:.0f}s so far); "
                       + (f"searching v{cfg.trained_version} meanwhile" if cfg.trained_version else "searches are exact"))
            elif not cfg.trained_version:
                state = "untrained"
                msg = f"untrained: {tr.vectors:,} of {needed:,} vectors needed; searches are exact"
            else:
                state = "trained"
                msg = f"trained v{cfg.trained_version} on {c.trained_on:,} vectors; {ready} of {len(holders)} shards use it"
                if ready < len(holders):
                    msg += " (the others are moving into it, or search exactly or the previous version meanwhile)"
            if tr.requested and (not tr.running or tr.next_version != tr.running_version):
                msg += f"; v{tr.next_version} asked for, starting" + (" after it" if tr.running else "")
            if tr.error:
                msg += f"; {tr.error}"
            if tr.adopt_errors:
                msg += "; " + "; ".join(f"{s}: {e}" for s, e in sorted(tr.adopt_errors.items()))
            return {**out, "state": state, "message": msg}

    def wait_trained(self, name: str, timeout: float = 60.0) -> bool:
        """Blocks until the collection is trained and every holder moved into the version (tests, tools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.training_status(name)
            if st["state"] in ("trained", "not_needed") and st["shards_ready"] == st["shards"]:
                return True
            time.sleep(0.05)
        return False
