"""Spreading calls over routers: the server ends old connections (max_connection_age), the client balances calls
over every address its target resolves to (round_robin). lookalike.net's factories use these options;
docs/DEPLOY.md, "Load balancing", says how a cluster and clients in other languages use them.

Kubernetes' Service balances connections, not calls: a client with one long-lived HTTP/2 connection sends every
call to one router, and routers the autoscaler adds get none. Two things fix it: the router sends GOAWAY to each
connection after a while (the client then connects again, through the Service or re-resolving a name), and clients
that can balance themselves resolve a headless Service (one address per ready router) with round_robin.

Uses the base package's config only.
"""

from __future__ import annotations

import json

from lookalike.config import RPC

# Bounds of the public server's max_connection_age (lookalike.config.RpcPolicy): under a second every call would
# race a GOAWAY; over a day the autoscaler's new routers would wait that long for the clients' connections.
MAX_CONNECTION_AGE_BOUNDS_S = (1.0, 86_400.0)
MAX_CONNECTION_AGE_GRACE_BOUNDS_S = (0.0, 7 * 86_400.0)


def connection_age_options(age_s: float, grace_s: float | None = RPC.max_connection_age_grace_s
                           ) -> list[tuple[str, int]]:
    """Server options that end each client connection once it is ``age_s`` seconds old (gRPC adds +-10% jitter):
    the server sends GOAWAY, the client opens a new connection for its next calls, re-resolving its target (a
    ``dns:///`` target then finds the routers added since), and the calls in flight on the old one get ``grace_s``
    seconds to finish (None: as long as they take, gRPC's default; a bulk load's UpsertStream can take hours).

    Args:
        age_s: 0: connections live on.

    Raises:
        ValueError: an age or grace outside MAX_CONNECTION_AGE_BOUNDS_S / MAX_CONNECTION_AGE_GRACE_BOUNDS_S.
    """
    if not age_s:
        return []
    (lo, hi), (glo, ghi) = MAX_CONNECTION_AGE_BOUNDS_S, MAX_CONNECTION_AGE_GRACE_BOUNDS_S
    if not lo <= age_s <= hi:
        raise ValueError(f"the maximum connection age must be 0 (none) or between {lo:g} and {hi:g} seconds, "
                         f"got {age_s:g}")
    options = [("grpc.max_connection_age_ms", int(age_s * 1000))]
    if grace_s is not None:
        if not glo <= grace_s <= ghi:
            raise ValueError(f"the grace of an aged connection's calls must be between {glo:g} and {ghi:g} seconds, "
                             f"got {grace_s:g}")
        options.append(("grpc.max_connection_age_grace_ms", int(grace_s * 1000)))
    return options


# Name resolvers whose targets can name several servers: a client balances calls over them (round_robin).
_RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")
LOAD_BALANCING = ("auto", "round_robin", "pick_first")


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names: "host:port" -> [host]; "dns:///host:port" or "dns://resolver/host:port" ->
    [host]; "ipv4:a:p1,b:p2" -> [a, b]; "unix:..." -> ["localhost"] (a local socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return ["localhost"]
    for scheme in _RESOLVER_SCHEMES:
        if target.startswith(scheme):
            rest = target[len(scheme):]
            if rest.startswith("//"):
                rest = rest[2:].split("/", 1)[-1]  # the authority (a DNS server) is not where calls go
            return [a.rsplit(":", 1)[0] if a.count(":") == 1 or a.startswith("[") else a for a in rest.split(",")]
    return [target.rsplit(":", 1)[0]]


def balancing_options(target: str, load_balancing: str = "auto") -> list[tuple[str, str]]:
    """Channel options of the load-balancing policy: ``round_robin`` spreads calls (not connections) over every
    address the target resolves to, and follows their changes (a ``dns:///`` name of a Kubernetes headless Service:
    the routers' pod IPs); ``pick_first`` sends every call over one connection. ``auto``: round_robin for targets
    with a resolver scheme (dns:, ipv4:, ipv6:), gRPC's default (pick_first) for a plain "host:port".

    Raises:
        ValueError: an unknown policy.
    """
    if load_balancing not in LOAD_BALANCING:
        raise ValueError(f"load balancing must be one of {', '.join(LOAD_BALANCING)}, got {load_balancing!r}")
    policy = load_balancing
    if policy == "auto":
        policy = "round_robin" if target.startswith(_RESOLVER_SCHEMES) else ""
    if not policy:
        return []
    return [("grpc.service_config", json.dumps({"loadBalancingConfig": [{policy: {}}]}))]
