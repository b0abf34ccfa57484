"""The server's own view of a load test: the router's latency histograms (``lookalike_router_request_seconds``,
lookalike.metrics) read from its /metrics before and after the run; their difference is what the run's requests
(and any others the router served meanwhile) took inside the router, from the call's arrival to its answer, without
the network and the client. Quantiles are estimated from the buckets as Prometheus' ``histogram_quantile`` does
(linear within a bucket), so they are as coarse as the buckets.

May use: prometheus_client's parser, and the standard library.
"""

from __future__ import annotations

import math
import ssl
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "lookalike_router_request_seconds"
METHODS = {"search": "Search", "upsert": "Upsert", "delete": "Delete"}  # the load test's kinds -> API methods


def read_metrics(url: str, tls=None, timeout: float = 10.0) -> str:
    """The text of ``url`` (the router's /metrics). ``tls``: lookalike.security.TLSConfig for https (its ca checks
    the server, its cert and key are the client certificate the endpoint asks for).

    Raises:
        ValueError: it cannot be read (the sentence names the URL and why).
    """
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=(tls.ca or None) if tls else None)
        if tls is not None and tls.cert and tls.key:
            context.load_cert_chain(tls.cert, tls.key)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, OSError, ssl.SSLError, ValueError) as err:
        raise ValueError(f"cannot read the server's metrics at {url}: {getattr(err, 'reason', err)}") from None


def buckets(text: str, method: str, name: str = HISTOGRAM) -> dict:
    """{"le": {upper bound: cumulative count}, "sum": seconds, "count": n} of one method's histogram in ``text``."""
    out = {"le": {}, "sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.labels.get("method") != method:
                continue
            if s.name.endswith("_bucket"):
                out["le"][float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
            elif s.name.endswith("_count"):
                out["count"] = s.value
    return out


def quantile(q: float, le: dict) -> float:
    """Prometheus' histogram_quantile of cumulative bucket counts ``le`` ({bound: count}); NaN when empty."""
    bounds = sorted(le)
    if not bounds or le[bounds[-1]] <= 0:
        return math.nan
    rank = q * le[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        if le[b] >= rank:
            if math.isinf(b):  # in the +Inf bucket: the highest finite bound is all that is known
                return prev_bound
            span = le[b] - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / span if span else 1.0)
        prev_bound, prev_count = b, le[b]
    return prev_bound


def server_latency(before: str, after: str) -> dict:
    """Per kind of request: {"count", "mean", "p50", "p90", "p99"} in milliseconds, of what the router's histogram
    gained between the two scrapes."""
    out = {}
    for kind, method in METHODS.items():
        a, b = buckets(before, method), buckets(after, method)
        le = {bound: n - a["le"].get(bound, 0.0) for bound, n in b["le"].items()}
        count = b["count"] - a["count"]
        st = {"count": int(count), "mean": 1000 * (b["sum"] - a["sum"]) / count if count else math.nan}
        for p in (50, 90, 99):
            st[f"p{p}"] = 1000 * quantile(p / 100, le)
        out[kind] = st
    return out


def format_server(report: dict) -> list[str]:
    """Report lines of :func:`server_latency` beside the client's (empty without it)."""
    server = report.get("server_latency_ms")
    if not server:
        return []
    lines = [f"  {'server ms':<12}{'count':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}"
             f"   (router's {HISTOGRAM}, from its buckets)"]
    for kind, st in server.items():
        if st["count"]:
            lines.append(f"  {kind:<12}{st['count']:>8}" + "".join(f"{st[p]:>9.2f}" for p in
                                                                   ("p50", "p90", "p99", "mean")))
    return lines
