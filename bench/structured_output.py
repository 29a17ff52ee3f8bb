"""What a structured output costs per decode step: the grammar mask (llguidance) on the router.

Two measurements, both in this process, on the machine's own CPU:

1. the mask alone (`GrammarMasks.apply`: every constrained row's bitmask filled in one llguidance
   call, then applied to the logits), per step, for B constrained rows of a JSON-schema grammar
   caught mid-object, over the built-in model's vocabulary (259 byte-level tokens) and over a
   synthetic byte-level BPE vocabulary of `--big-vocab` tokens (the size of a real model's; the
   mask's cost grows with the vocabulary, not with the model);
2. whole decode steps of the built-in model (local transport, `Engine.generate_stream`), B greedy
   sequences with and without the same schema, ms per step.

    python -m bench.structured_output
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moe_serving.types import StructuredOutput
from router_service import Engine
from router_service.default_model import default_model_dir, make_tokenizer
from router_service.generation.constraints import (
    GrammarMasks,
    GrammarState,
    compile_grammar,
    hf_grammar_tokenizer,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PREFIX = '{"name":"Ada Love'  # mid-string: the most permissive state (most tokens allowed)


def synthetic_tokenizer(size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `size` tokens (the 256 bytes, then random 2-8 character
    pieces of printable ASCII and spaces), no merges: what llguidance reads is the vocabulary."""
    rng = random.Random(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    space = "Ġ"  # ByteLevel writes a space as this
    while len(vocab) < size - 1:
        piece = (space if rng.random() < 0.4 else "") + "".join(
            rng.choice(letters) for _ in range(rng.randint(2, 8))
        )
        vocab.setdefault(piece, len(vocab))
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def mask_cost(hf, rows: int, repeats: int) -> float:
    """Median ms of one step's mask over `rows` constrained rows."""
    vocab = len(hf)
    ll = hf_grammar_tokenizer(hf, vocab, (hf.eos_token_id,))
    grammar = compile_grammar(StructuredOutput("json", SCHEMA))
    prefix = hf.encode(PREFIX, add_special_tokens=False)
    states = [GrammarState(ll, grammar, prefix) for _ in range(rows)]
    masks = GrammarMasks()
    logits = torch.randn(rows, vocab)
    index = list(range(rows))
    masks.apply(logits, index, states)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        masks.apply(logits, index, states)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def step_ms(engine, tokenizer, rows: int, tokens: int, grammar: str | None) -> float:
    """ms per decode step with `rows` concurrent greedy sequences of `tokens` tokens each."""
    prompt = tokenizer.encode("The person is")
    options = {"grammar": grammar} if grammar else {"ignore_eos": True}
    made = []

    def run():
        n = sum(len(c["token_ids"]) for c in engine.generate_stream(prompt, tokens, **options))
        made.append(n)

    threads = [threading.Thread(target=run) for _ in range(rows)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return seconds * 1e3 / max(made), min(made)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,64", help="constrained rows per step")
    ap.add_argument("--big-vocab", type=int, default=128000)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=40, help="tokens per sequence in the decode-step runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    small = make_tokenizer()
    t0 = time.perf_counter()
    big = synthetic_tokenizer(args.big_vocab)
    print(f"synthetic {args.big_vocab}-token tokenizer built in {time.perf_counter() - t0:.1f} s")
    print(f"\n| constrained rows | mask ms/step, 259 tokens | mask ms/step, {args.big_vocab} tokens |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r} | {mask_cost(small, r, args.repeats):.3f} | {mask_cost(big, r, args.repeats):.3f} |")
    grammar = compile_grammar(StructuredOutput("json", SCHEMA))
    print("\n| sequences | decode ms/step, free text | decode ms/step, JSON schema | ratio |")
    print("|---|---|---|---|")
    with Engine.from_pretrained(default_model_dir(), num_workers=2) as engine:
        step_ms(engine, small, 2, 8, grammar)  # warm-up (and the router's grammar tokenizer)
        for r in rows:
            free, _ = step_ms(engine, small, r, args.tokens, None)
            constrained, shortest = step_ms(engine, small, r, args.tokens, grammar)
            note = "" if shortest >= args.tokens else f" (some ended at {shortest} tokens)"
            print(f"| {r} | {free:.2f} | {constrained:.2f} | {constrained / free:.2f}x{note} |")
    print(json.dumps({"torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
