"""A shard's health probe (lookalike.health.HealthChecker runs it): is it loaded, does its storage take a durable
write, and which of its collections it does not serve (quarantined, broken, reloading).

The shard as a whole (health service "" and ``lookalike.v1.Shard``) is NOT_SERVING while it loads and while its
storage fails: a small file under the shard's directory is written and fsynced each probe, and the checker counts
a probe slower than its timeout as failed (a hung mount). A collection the shard does not serve is reported under
the service ``lookalike.v1.Shard/<collection>`` (NOT_SERVING with the reason in the log), while the shard serves its
other collections. Uses the base package and the shard.
"""

from __future__ import annotations

import os
import time

from lookalike.health import Report

PROBE_FILE = ".health-probe"


def storage_problem(root) -> str | None:
    """Writes and fsyncs ``root/.health-probe``; None if that worked, else the sentence that says why not."""
    path = os.path.join(root, PROBE_FILE)
    try:
        os.makedirs(root, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{time.time():.3f}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        return f"its storage at {root} fails a durable write: {err.strerror or err}"
    return None


def shard_probe(shard, service_name: str):
    """A probe of ``shard`` (shard.shard.Shard) whose collections are reported as ``<service_name>/<collection>``."""

    def probe() -> Report:
        if not shard.serving:
            report: Report = {"": f"shard {shard.shard_id} is loading its data"}
        else:
            report = {"": storage_problem(shard.root)}
        for name, problem in shard.collection_problems().items():
            report[f"{service_name}/{name}"] = problem
        return report

    return probe
