"""Continuous batching in the router: sequences that join and leave a running batch get exactly
the tokens transformers' own greedy generate gives them alone; the queue enforces its limits."""

import threading

import pytest
import torch
from tiny_models import BUILTIN_VARIANTS, FAMILIES
from transformers import AutoModelForCausalLM

from router_service import Engine
from router_service.config import BatchLimits
from router_service.errors import QueueFull, RequestTooLarge
from router_service.generation.decoding import DecodeBatch, SamplingParams, Sequence, sample_rows
from router_service.generation.scheduler import GenerationScheduler

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20, 21]]


def hf_greedy(model, prompt, n):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_sequences_joining_and_leaving_equal_transformers_alone(tiny_model_dir, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).eval()
    limits = [8, 5, 8]
    want = [hf_greedy(model, p, n) for p, n in zip(PROMPTS, limits, strict=True)]
    batch = DecodeBatch(model, set(), torch.device("cpu"))
    seqs = [Sequence(p, SamplingParams(n)) for p, n in zip(PROMPTS, limits, strict=True)]
    # (sequences, the step they arrive at); the second joins a running batch with a longer prompt,
    # so the old rows get left-padded. Caches that cannot merge (linear attention, conv, compressed
    # attention: Qwen3-Next, LFM2, DeepSeek-V4, ...) make arrivals wait until the batch drains, as
    # the scheduler does.
    arrivals = [(seqs[:1], 0), (seqs[1:2], 1), (seqs[2:], 3)]
    joined_running = step = 0
    while arrivals or len(batch):
        while arrivals and arrivals[0][1] <= step and batch.can_join():
            joined_running += bool(len(batch))
            batch.add(arrivals.pop(0)[0])
        if len(batch):
            batch.step()
            batch.evict({id(s) for s in batch.seqs if s.finish_reason})
        step += 1
    assert [s.generated for s in seqs] == want
    assert all(s.finish_reason == "length" for s in seqs)
    if family in BUILTIN_VARIANTS:  # full-attention caches: both later arrivals joined a running batch
        assert joined_running == 2


def test_seeded_sampling_does_not_depend_on_batch_company():
    logits = torch.randn(3, 50)
    params = SamplingParams(4, temperature=0.8, top_p=0.9, seed=7)
    alone = sample_rows(logits[1:2], [Sequence([1], params)])
    rows = [Sequence([1], SamplingParams(4)), Sequence([1], params), Sequence([1], SamplingParams(4, 0.5))]
    assert sample_rows(logits, rows)[1] == alone[0]
    assert sample_rows(logits, rows)[0] == int(logits[0].argmax())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -10.0, -10.0]])
    picks = {sample_rows(logits, [Sequence([1], SamplingParams(1, 1.0, 0.5, s))])[0] for s in range(30)}
    assert picks == {0}


class TurnGate:
    """A model lock for the scheduler that lets its first model turn through and each later one
    only once the reader has taken the previous chunk (`permits`), so that what a chunk holds does
    not depend on how fast this machine reads it."""

    def __init__(self):
        self.turns = 0
        self.permits = threading.Semaphore(0)

    def __enter__(self):
        if self.turns:
            self.permits.acquire(timeout=10)  # a loop that steps before handing out shows, not hangs
        self.turns += 1

    def __exit__(self, *exc) -> None:
        pass


def test_first_token_leaves_with_the_prefill_and_each_later_chunk_is_one_step(tiny_model_dir):
    """TTFT is queueing + prefill: the prefill's token is handed out before the batch's next decode
    step (a first chunk of 2 tokens would mean it waited for one)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("deepseek_v3")).eval()
    gate = TurnGate()
    scheduler = GenerationScheduler(model, set(), torch.device("cpu"), gate, BatchLimits())
    prompt = [5, 6, 7]
    try:
        scheduler.submit("a", prompt, SamplingParams(4))
        chunks = []
        for tokens, finish, _ in scheduler.stream("a", timeout=30):
            chunks.append((tokens, finish))
            gate.permits.release()
    finally:
        scheduler.close()
    want = hf_greedy(model, prompt, 4)
    assert chunks == [([t], None) for t in want[:-1]] + [([want[-1]], "length")]
    assert gate.turns == 4  # one prefill, three decode steps


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine.from_pretrained(
        tiny_model_dir("deepseek_v3"),
        num_workers=2,
        batch_limits={"max_batch_size": 4, "max_batch_tokens": 64, "max_waiting": 2},
    ) as e:
        yield e


def test_engine_generate_stream_matches_generate_under_concurrency(engine):
    prompts = [[3 + i, 7, 11 + i] for i in range(6)]
    want = [engine.generate(torch.tensor([p]), 6)[0, 3:].tolist() for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        for _ in range(50):  # max_waiting is 2: retry when the queue is full, as a client would
            try:
                got[i] = [t for c in engine.generate_stream(prompts[i], 6) for t in c["token_ids"]]
                return
            except QueueFull:
                threading.Event().wait(0.05)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    stats = engine.cluster_state()["generation"]
    assert max(stats["steps_by_batch_size"]) <= 4


def test_limits_and_cancellation(engine):
    with pytest.raises(RequestTooLarge, match="64"):
        engine.generate_stream([1] * 60, 10)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate_stream([1, 10**6], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate_stream([1, 2], 0)
    stream = engine.generate_stream([1, 2, 3], 40)
    next(stream)
    stream.close()  # the reader leaves: its sequence leaves the batch
    for _ in range(100):
        state = engine.cluster_state()["generation"]
        if state["running"] == 0:
            break
        threading.Event().wait(0.05)
    assert state["running"] == 0 and state["waiting"] == 0
    assert len([t for c in engine.generate_stream([4, 5], 3) for t in c["token_ids"]]) == 3


def test_multiplexed_events_carry_every_token_and_one_finish(engine):
    """The serving front end's path: many requests reported over one event stream."""
    router = engine.router
    lengths = {"b": 2, "c": 5}  # max_waiting is 2; n=2 finishes in its first loop turn (prefill + step)
    for key, n in lengths.items():
        router.submit_generation(key, [3, 4, 5], n, 0.0, 1.0, None, "front-end-1")
    tokens = {key: [] for key in lengths}
    finishes = {key: [] for key in lengths}
    for incarnation, events, load in router.generation_events("front-end-1"):
        assert len(load) == 2  # (running, waiting) for the ingress's pick
        assert incarnation == router.incarnation
        assert router.event_stream_status("front-end-1") == {"incarnation": incarnation, "reading": True}
        for key, ids, finish, error, _logprobs in events:
            assert error is None
            assert not finishes[key], f"{key} got news after it finished"
            tokens[key] += ids
            if finish:
                finishes[key].append(finish)
        if all(finishes.values()):
            break
    assert {k: len(v) for k, v in tokens.items()} == lengths
    assert tokens["c"] == engine.generate(torch.tensor([[3, 4, 5]]), 5)[0, 3:].tolist()
    assert finishes == {k: ["length"] for k in lengths}
