"""The router's health probe: can it reach the control plane (lookalike.health.HealthChecker runs it)?

The router needs the control plane for shard maps it has not cached, for fresh maps after a bucket move or a shard
restart, and for every administrative call; while it cannot reach it, health says NOT_SERVING (readiness: load
balancers and Kubernetes' Service send calls to other routers), and searches of collections whose map is cached
go on being answered. It may use the base package (lookalike).
"""

from __future__ import annotations

from lookalike.health import Report


def control_plane_probe(control):
    """A probe (see lookalike.health) that asks ``control`` (router.core.ControlPlane) for the shard-map epoch:
    the call every shard map hangs on. The checker bounds how long it may take."""

    def probe() -> Report:
        try:
            control.epoch()
        except Exception as err:  # noqa: BLE001: any failure means: not reachable now
            return {"": f"it cannot reach the control plane ({type(err).__name__}: {err}); searches of collections "
                        "whose shard map it holds are still answered"}
        return {"": None}

    return probe
