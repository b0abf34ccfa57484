"""What a load test does: :class:`LoadConfig` (mode, rate or concurrency, mix, stop conditions), the request mix
parsed from ``--mix``, the open loop's send schedule, and :class:`WorkerInput` (one worker process's share).

May use: numpy only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


OPS = ("search", "upsert", "delete")
OK = 0  # the gRPC status code of a request that succeeded


@dataclasses.dataclass
class LoadConfig:
    """What a load test does (see the module docstring)."""

    target: str
    collection: str
    mode: str = "closed"
    rate: float = 100.0
    concurrency: int = 8
    duration: float = 10.0
    requests: int = 0
    mix: dict = dataclasses.field(default_factory=lambda: {"search": 1.0})
    k: int = 10
    batch: int = 1
    nprobe: int = 0
    ef_search: int = 0
    filter: bytes = b""  # searches: a serialized Filter (lookalike.filters), b"" for none
    processes: int = 1
    timeout: float = 10.0
    arrivals: str = "uniform"
    recall_sample: int = 100
    keep_writes: bool = False
    seed: int = 0
    run_id: str = ""
    tls: object = None  # lookalike.security.TLSConfig
    token: str | None = dataclasses.field(default=None, repr=False)  # bearer token; never printed

    def check(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be open or closed, not {self.mode!r}")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError("an open-loop test needs --rate > 0")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("a closed-loop test needs --concurrency >= 1")
        if not self.duration > 0 and self.requests <= 0:
            raise ValueError("give --duration or --requests: a load test must stop by itself")
        if self.arrivals not in ("uniform", "poisson"):
            raise ValueError(f"arrivals must be uniform or poisson, not {self.arrivals!r}")
        if self.processes < 1 or self.batch < 1 or self.k < 1:
            raise ValueError("--processes, --batch and -k must be at least 1")
        unknown = set(self.mix) - set(OPS)
        if unknown or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix: give positive shares of {', '.join(OPS)}, e.g. search=0.9,upsert=0.1")


def parse_mix(text: str) -> dict:
    """``"search=0.9,upsert=0.1"`` -> {"search": 0.9, "upsert": 0.1}."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, share = part.partition("=")
        try:
            mix[name.strip()] = float(share) if share else 1.0
        except ValueError:
            raise ValueError(f"mix: {part!r} is not name=share") from None
    return mix


# --- schedules --------------------------------------------------------------------------------------------------
def open_schedule(rate: float, duration: float, requests: int, processes: int, worker: int, arrivals: str,
                  seed: int) -> np.ndarray:
    """Send times (seconds after the start) of one worker's requests in an open-loop test.

    The whole test sends ``rate`` requests a second for ``duration`` seconds (at most ``requests`` when > 0);
    worker w of P sends the requests w, w+P, w+2P... of the uniform schedule, or its own Poisson process of rate
    rate/P (the merge of P Poisson processes is one of rate ``rate``).
    """
    total = int(math.floor(rate * duration)) if duration > 0 else requests
    if requests > 0:
        total = min(total, requests)
    if arrivals == "uniform":
        return np.arange(worker, total, processes, dtype=np.float64) / rate
    rng = np.random.default_rng([seed, worker, 1])
    n = len(range(worker, total, processes))
    return np.cumsum(rng.exponential(processes / rate, n))


def split_share(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


@dataclasses.dataclass
class WorkerInput:
    cfg: LoadConfig
    worker: int
    queries: np.ndarray
    write_mean: np.ndarray
    write_std: np.ndarray
