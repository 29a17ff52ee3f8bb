"""The ingress merges a stream's queued token news into one chunk, and never merges past an error."""

import asyncio

from router_service.serving.core import _merge_news


def queue_of(*items) -> asyncio.Queue:
    q: asyncio.Queue = asyncio.Queue()
    for item in items:
        q.put_nowait(item)
    return q


def test_queued_tokens_become_one_chunk_and_an_error_waits_its_turn():
    err = RuntimeError("router lost")
    q = queue_of(
        ([2], None, None, None), ([3, 4], None, None, None), ([], None, err, None), ([9], None, None, None)
    )
    merged, held = _merge_news(([1], None, None, None), q)
    assert merged == ([1, 2, 3, 4], None, None, None)
    assert held == ([], None, err, None)
    assert q.qsize() == 1  # what follows the error is left for later


def test_merging_stops_at_the_finish_and_keeps_logprobs_aligned():
    q = queue_of(
        ([2], None, None, [(-0.5, [])]), ([3], "length", None, [(-0.1, [])]), ([7], None, None, None)
    )
    merged, held = _merge_news(([1], None, None, [(-1.0, [])]), q)
    assert merged == ([1, 2, 3], "length", None, [(-1.0, []), (-0.5, []), (-0.1, [])])
    assert held is None and q.qsize() == 1
    alone, held = _merge_news(([5], None, None, None), queue_of())
    assert alone == ([5], None, None, None) and held is None
