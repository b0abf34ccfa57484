"""Health that tells the truth: a background checker that sets grpc.health.v1 statuses from a probe.

A server's health says whether it can do its job now, not only that its process runs: a router that cannot reach
the control plane, or a shard whose storage fails, reports NOT_SERVING until the probe passes again. The calls
themselves keep being served meanwhile (a router searches with its cached shard maps); health tells load balancers
and Kubernetes' readiness probes to prefer other servers.

Two kinds of service names:

- ``""`` and the server's own services (``lookalike.v1.Lookalike``, ``lookalike.v1.Shard``): readiness, what the
  probe says (and NOT_SERVING while the server drains);
- :data:`LIVENESS`: SERVING from start to stop whatever the probe says, for liveness probes, which restart the
  process: a router that only waits for its control plane must not be restarted for it.

Uses grpc_health and the base package's config.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from grpc_health.v1 import health_pb2

from lookalike.config import RPC

log = logging.getLogger(__name__)

# The health service name that stays SERVING while the process serves (liveness), whatever the probe says.
LIVENESS = "liveness"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

# What a probe returns: service name -> None (serving) or the sentence that says why not. The key "" stands for
# the server as a whole: "" and the checker's ``service_names``. Other keys are extra services (a shard's
# collections); one that a later probe no longer names turns SERVICE_UNKNOWN.
Report = dict[str, "str | None"]


class HealthChecker:
    """Runs ``probe`` every ``interval_s`` seconds on a thread of its own and sets the statuses it reports on every
    health servicer in ``healths``.

    A probe that raises counts as failed (its message is the reason); one that takes longer than ``timeout_s``
    too, and no new probe starts until that one returns (a hung control plane or disk costs one thread, not one
    per interval).

    Args:
        probe: () -> :data:`Report`.
        healths: health servicers (grpc_health's, or lookalike.net's asyncio one); more with :meth:`add`.
        service_names: the server's services, set like "" (readiness).
        what: names the server in log lines ("router", "shard shard-0").
    """

    def __init__(self, probe: Callable[[], Report], healths: list, service_names: list[str], what: str,
                 interval_s: float = RPC.health_interval_s, timeout_s: float = RPC.health_timeout_s):
        self.probe = probe
        self.healths = list(healths)
        self.service_names = list(service_names)
        self.what = what
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.report: Report = {}
        self._extra: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: tuple[threading.Event, dict] | None = None
        self._thread: threading.Thread | None = None

    @property
    def problem(self) -> str | None:
        """Why the server as a whole is not serving (the last probe's), or None."""
        return self.report.get("", None)

    def add(self, health) -> None:
        """Sets the statuses of the last probe on one more health servicer, and keeps it up to date."""
        with self._lock:
            self.healths.append(health)
            self._apply(health, self.report, set(), set(self.report))
            health.set(LIVENESS, SERVING)

    def start(self) -> "HealthChecker":
        """Probes once (here, so that the statuses are true when this returns), then every interval_s."""
        for h in self.healths:
            h.set(LIVENESS, SERVING)
        self.check()
        self._thread = threading.Thread(target=self._run, daemon=True, name="health-check")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops probing; the statuses stay as they are (a draining server then sets NOT_SERVING itself)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def _probe_within(self) -> Report:
        """The probe's report, or the failure of a probe that raised or did not answer within timeout_s."""
        if self._pending is None:  # else the last probe has not returned yet: wait on it rather than start another
            done, box = threading.Event(), {}

            def run():
                try:
                    box["report"] = self.probe()
                except Exception as err:  # noqa: BLE001: a failed probe is what this reports
                    box["report"] = {"": f"{type(err).__name__}: {err}"}
                finally:
                    done.set()

            threading.Thread(target=run, daemon=True, name="health-probe").start()
            self._pending = (done, box)
        done, box = self._pending
        if not done.wait(self.timeout_s):
            return {**{k: v for k, v in self.report.items() if k}, "": f"its health probe did not answer within "
                                                                        f"{self.timeout_s:g} s"}
        self._pending = None
        return box["report"]

    def check(self) -> Report:
        """Probes now and sets the statuses; returns the report."""
        report = self._probe_within()
        with self._lock:
            if self._stop.is_set() and self._thread is not None:
                return report  # stopped while probing: a draining server's NOT_SERVING must stay
            old = self.report
            gone = set(old) - set(report)
            changed = {k for k in report if k not in old or (old[k] is None) != (report[k] is None)}
            if not old:
                changed.add("")
            for h in self.healths:
                self._apply(h, report, gone, changed)
            self.report = report
        if "" in changed:
            if report.get("") is None:
                log.info("%s is SERVING again" if old else "%s is SERVING", self.what)
            else:
                log.warning("%s is NOT_SERVING: %s", self.what, report[""])
        for name in sorted(changed - {""}):
            if report[name] is not None:
                log.warning("%s: %s is NOT_SERVING: %s", self.what, name, report[name])
        return report

    def _apply(self, health, report: Report, gone: set[str], changed: set[str]) -> None:
        for name in changed:
            status = SERVING if report.get(name) is None else NOT_SERVING
            for service in (["", *self.service_names] if name == "" else [name]):
                health.set(service, status)
        for name in gone:
            if name:
                health.set(name, SERVICE_UNKNOWN)
