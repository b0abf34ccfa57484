"""lookalike.retry: the one schedule of the router's retry loops (tries, deadline, backoff)."""

import asyncio

from lookalike.retry import Retry


def test_tries_and_backoff():
    retry = Retry(attempts=7)
    delays = [retry.delay for _ in retry]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # doubling from 0.05 s, at most 1 s
    assert retry.left() is None and not retry.expired()  # no deadline
    search = Retry(6, delay=0.01, max_delay=0.2)
    assert [round(search.delay, 3) for _ in search] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.2]
    fixed = Retry(3, delay=0.02, factor=1.0)
    assert [fixed.delay for _ in fixed] == [0.02] * 3  # a fixed pause


def test_without_a_limit_until_the_loop_stops():
    retry = Retry(timeout=60.0)
    seen = []
    for attempt in retry:
        seen.append(attempt)
        if attempt == 9:
            break
    assert seen == list(range(10)) and 0 < retry.left() <= 60.0 and not retry.expired()
    assert Retry(timeout=0.0).expired() and Retry(timeout=-1.0).left() < 0


def test_pauses_sleep_the_current_delay():
    retry = Retry(attempts=2, delay=0.001)
    for _ in retry:
        retry.pause()
        asyncio.run(retry.pause_async())
    assert retry.attempt == 1
