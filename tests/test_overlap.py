"""Micro-batch overlap without Ray: the cache split and join, and overlapped decode steps equal to
plain ones (the Ray transports' overlap is tested in test_socket_transport.py)."""

import torch
from conftest import rel_err
from tiny_models import VOCAB
from transformers.cache_utils import DynamicCache

from router_service import Engine
from router_service.generation.decoding import DecodeBatch, SamplingParams, Sequence
from router_service.generation.overlap import MicroBatchRunner, join_caches, split_bounds, split_cache


def test_split_bounds_cover_the_rows_evenly():
    assert split_bounds(16) == [(0, 8), (8, 16)]
    assert split_bounds(5) == [(0, 2), (2, 5)]


def test_split_views_and_join_restores_the_cache():
    cache = DynamicCache()
    for _ in range(3):
        cache.update(torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4), len(cache.layers))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    parts = [split_cache(cache, lo, hi) for lo, hi in split_bounds(6)]
    for part, (lo, hi) in zip(parts, split_bounds(6), strict=True):
        for mine, whole in zip(part.layers, cache.layers, strict=True):
            assert mine.keys.data_ptr() == whole.keys[lo:hi].data_ptr()  # a view, not a copy
    for i, part in enumerate(parts):  # each micro-batch appends one position
        for layer in part.layers:
            layer.update(torch.full((3, 2, 1, 4), float(i)), torch.full((3, 2, 1, 4), float(i)))
    join_caches(cache, parts)
    for layer, (k, v) in zip(cache.layers, before, strict=True):
        assert layer.keys.shape == (6, 2, 6, 4)
        assert torch.equal(layer.keys[:, :, :5], k) and torch.equal(layer.values[:, :, :5], v)
        assert torch.equal(layer.keys[:3, :, 5], torch.zeros(3, 2, 4))
        assert torch.equal(layer.keys[3:, :, 5], torch.ones(3, 2, 4))


def test_overlapped_steps_equal_plain_steps(tiny_model_dir):
    """The same prompts (left-padded to different lengths) decoded 6 steps as one batch and as two
    micro-batches in their own threads: the same logits and tokens."""
    with Engine.from_pretrained(tiny_model_dir("deepseek_v3"), num_workers=2, num_threads=1) as engine:
        router = engine.router
        prompts = [torch.randint(3, VOCAB, (int(n),)).tolist() for n in (3, 9, 5, 7, 4)]
        runs = []
        for runner in (None, MicroBatchRunner(router.dispatcher, 1, 2)):
            batch = DecodeBatch(router.model, set(), torch.device("cpu"), runner)
            seen = []
            sample = batch._sample
            batch._sample = lambda logits, seqs, seen=seen, sample=sample: (
                seen.append(logits.clone()),
                sample(logits, seqs),
            )[1]
            with router.lock:
                batch.add([Sequence(p, SamplingParams(20)) for p in prompts])
                for _ in range(6):
                    batch.step()
            runs.append((torch.stack(seen), [s.generated for s in batch.seqs]))
            if runner is not None:
                runner.close()
    (plain, plain_tokens), (overlapped, overlapped_tokens) = runs
    assert rel_err(overlapped, plain) < 1e-6
    assert overlapped_tokens == plain_tokens
