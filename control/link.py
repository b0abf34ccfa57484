"""A router's link to its control plane on a Ray cluster, kept up: when the control plane stops answering (the Ray
head restarted, so the Ray Client session and every actor handle of it are gone), the link says so, keeps the
router answering what it can, and connects again once the head is back.

- The router sees the control plane, the jobs and the encoder pool through :class:`ControlPlaneLink`'s proxies
  (``link.control``, ``link.jobs``, ``link.encoders``): each attribute is looked up on the current connection, so
  a reconnection changes what they reach without the router knowing.
- A watcher thread asks the control plane for its epoch every ``interval_s``. Failing for ``reconnect_after_s`` in
  a row, the link is *lost*: it logs a warning, drops the connection, and calls ``connect`` again (join Ray, get or
  re-create the controller, which reloads the cluster from storage) until it succeeds, then logs that it is back.
- Meanwhile the router's health (router/health.py probes ``link.control``) is NOT_SERVING, and searches go on
  against the shard maps it holds: the shards' gRPC servers run on the worker pods, which outlive the head. Calls
  that need the control plane get UNAVAILABLE with a sentence.

Uses the base package only (errors); ``connect`` (control.ray_cluster.connect_router in ``lookalike serve``) brings
Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from lookalike.errors import Unavailable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Connection:
    """What one connection to the control plane gives a router.

    Attributes:
        control: router.core.ControlPlane (control.ray_actors.RayControlPlane).
        jobs: the catalog jobs (control.ray_actors.RayJobs), or None.
        encoders: router.encoding.EncoderPool (control.ray_encoders.RayEncoderPool), or None.
        close: called when the link drops this connection (best effort: its peer is probably gone).
    """

    control: object
    jobs: object = None
    encoders: object = None
    close: Callable[[], None] = lambda: None


class _Proxy:
    """Attributes of one part of the link's current connection, looked up at each access."""

    def __init__(self, link: "ControlPlaneLink", part: str):
        self._link = link
        self._part = part

    def __getattr__(self, name):
        return getattr(self._link.current(self._part), name)


class ControlPlaneLink:
    """Keeps a router connected to its control plane (see the module's docstring).

    Args:
        connect: () -> :class:`Connection`; raises when the control plane cannot be reached (yet).
        where: names the control plane in log lines and errors ("the Ray cluster at ray://head:10001").
        reconnect_after_s: seconds the control plane may fail to answer before the link drops the connection and
            connects again: longer than a controller's restart, shorter than a head's.
        interval_s: seconds between the watcher's probes (and between connection attempts while lost).
        probe: (connection) -> None, raises when the control plane does not answer (default: its epoch).
    """

    def __init__(self, connect: Callable[[], Connection], where: str, reconnect_after_s: float = 15.0,
                 interval_s: float = 1.0, probe: Callable[[Connection], object] | None = None):
        self._connect = connect
        self.where = where
        self.reconnect_after_s = reconnect_after_s
        self.interval_s = interval_s
        self._probe = probe or (lambda conn: conn.control.epoch())
        self._conn: Connection | None = None
        self._first: Connection | None = None
        self._pending: tuple | None = None  # (connection, done Event, result box) of a probe still running
        self._why = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        self.control = _Proxy(self, "control")
        self.jobs = _Proxy(self, "jobs")
        self.encoders = _Proxy(self, "encoders")

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def has(self, part: str) -> bool:
        """Whether the connection gives a jobs actor or an encoder pool (the first one tells: they do not change)."""
        return getattr(self._first, part) is not None

    def current(self, part: str):
        """The current connection's ``part`` ("control", "jobs", "encoders").

        Raises:
            Unavailable: lost, not connected again yet.
        """
        conn = self._conn
        if conn is None:
            raise Unavailable(f"the router lost its control plane ({self._why}) and is connecting to {self.where} "
                              "again; searches of collections whose shard map it holds are answered meanwhile")
        return getattr(conn, part)

    def start(self) -> "ControlPlaneLink":
        """Connects (here: ``connect``'s errors reach the caller) and starts watching."""
        self._conn = self._first = self._connect()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="control-plane-link")
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops watching (the connection stays: the caller stops what it holds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.interval_s):
            conn = self._conn
            if conn is None:
                self._reconnect()
                last_ok = time.monotonic()
                continue
            why = self._probe_within(conn, self.reconnect_after_s)
            now = time.monotonic()
            if why is None:
                last_ok = now
            elif now - last_ok >= self.reconnect_after_s:
                self._lose(conn, why, now - last_ok)

    def _probe_within(self, conn: Connection, timeout: float) -> str | None:
        """None when the control plane answered within ``timeout`` seconds, else why not. A probe that hangs (a Ray
        Client waiting out its reconnection grace) is waited on by the next call rather than started again."""
        if self._pending is None or self._pending[0] is not conn:
            done, box = threading.Event(), {}

            def run():
                try:
                    self._probe(conn)
                    box["why"] = None
                except Exception as err:  # noqa: BLE001: whatever it is, the control plane did not answer
                    box["why"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                finally:
                    done.set()

            threading.Thread(target=run, daemon=True, name="control-plane-probe").start()
            self._pending = (conn, done, box)
        _, done, box = self._pending
        if not done.wait(timeout):
            return f"no answer within {timeout:g} s"
        self._pending = None
        return box["why"]

    def _lose(self, conn: Connection, why: str, for_s: float) -> None:
        with self._lock:
            self._conn, self._why = None, why
        log.warning("lost the control plane at %s: it has not answered for %.0f s (%s); answering searches from the "
                    "shard maps held, and connecting again", self.where, for_s, why)
        try:
            conn.close()
        except Exception as err:  # noqa: BLE001: its peer is gone; nothing to keep of it
            log.info("closing the lost connection: %s", err)

    def _reconnect(self) -> None:
        try:
            conn = self._connect()
        except Exception as err:  # noqa: BLE001: not back yet; try again
            log.warning("cannot reach the control plane at %s yet: %s", self.where, str(err).splitlines()[0][:200]
                        if str(err) else type(err).__name__)
            return
        if self._stop.is_set():
            conn.close()
            return
        with self._lock:
            self._conn = conn
            self.reconnects += 1
        log.info("connected to the control plane at %s again", self.where)
