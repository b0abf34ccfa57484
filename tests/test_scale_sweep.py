"""bench/scale_common.py's search for the cheapest nprobe / efSearch reaching a recall: every system of the scale
benchmark is compared at the value it picks, so it must be the smallest value of the grid that reaches the target,
and the grid fine enough that two systems land at about the same recall."""

from __future__ import annotations

import pytest

from bench.scale_common import EF_SEARCHES, NPROBES, cheapest


def _curve(threshold: float, top: float = 1.0):
    """A recall that grows with the parameter and crosses 0.95 at ``threshold``; ``top`` caps it (a plateau)."""
    return lambda p: min(top, 0.95 * (p / threshold) ** 0.25)


@pytest.mark.parametrize("grid", [NPROBES, EF_SEARCHES], ids=["nprobe", "efSearch"])
@pytest.mark.parametrize("threshold", [9, 13, 33, 65, 97, 129, 200, 513])
def test_the_sweep_picks_the_smallest_value_reaching_the_target(grid, threshold):
    calls = []

    def recall_of(p):
        calls.append(p)
        return _curve(threshold)(p)

    got = cheapest(grid, recall_of, 0.95)
    want = min(p for p in grid if p >= threshold)
    assert got["value"] == want and got["met"], got
    assert want <= 1.25 * threshold  # at most a quarter past the target: two systems compare at about one recall
    assert len(calls) == len(set(calls)) <= 2 * len(grid).bit_length() + 4  # doubling, then bisecting


def test_below_a_plateau_the_sweep_takes_the_plateaus_start():
    got = cheapest(NPROBES, _curve(1000, top=0.49), 0.95)
    assert not got["met"]
    assert got["recall"] >= 0.49 - 0.003
    smaller = [p for p in NPROBES if p < got["value"]]
    assert _curve(1000, top=0.49)(smaller[-1]) < 0.49 - 0.003
