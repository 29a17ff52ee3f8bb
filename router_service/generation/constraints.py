"""Constrained decoding: an output that must match a JSON schema, a regex, a list of choices or a
grammar, enforced token by token with llguidance (a grammar engine made for this: CPU, byte-level
over the tokenizer's vocabulary, tens of microseconds per token mask).

Two halves, in two processes:
- the ingress turns a request's `StructuredOutput` into an llguidance grammar (`compile_grammar`)
  and validates it against the model's tokenizer, so a bad schema or regex is a 400 naming it;
- the router keeps one `LLMatcher` per constrained sequence (`GrammarState`), and at every step
  fills one bitmask row per constrained sequence and masks those rows of the logits together
  (`GrammarMasks.apply`); after sampling, each matcher consumes its token. A matcher that can take no
  more tokens ends its sequence ("stop"), as vLLM does.

JSON is compact by default (no free whitespace between tokens): a small model that may put a
space or newline anywhere can loop on whitespace until max_tokens, and vLLM's
`disable_any_whitespace` exists for that reason. `structured_outputs.disable_any_whitespace:
false` asks for the flexible form.
"""

from __future__ import annotations

import functools
import json
import threading

import llguidance
import llguidance.hf
import torch
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from moe_serving.types import STRUCTURED_KINDS, StructuredOutput


def compile_grammar(so: StructuredOutput) -> str:
    """The llguidance grammar (a string) for `so`; ValueError naming what is wrong."""
    if so.kind not in STRUCTURED_KINDS:
        raise ValueError(f"unknown structured output kind {so.kind!r} (one of {', '.join(STRUCTURED_KINDS)})")
    if so.kind in ("json", "json_object"):
        schema = {"type": "object"} if so.kind == "json_object" else so.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("a JSON schema must be an object")
        compact = so.compact_json
        options = {"whitespace_flexible": not compact}
        if compact:
            options.update(item_separator=",", key_separator=":")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as e:
            raise ValueError(f"the JSON schema cannot be compiled: {e}") from None
    if so.kind == "regex":
        if not isinstance(so.value, str) or not so.value:
            raise ValueError("regex must be a non-empty string")
        return llguidance.LLMatcher.grammar_from_regex(so.value)
    if so.kind == "choice":
        choices = so.value
        if (
            not isinstance(choices, list | tuple)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    grammar = so.value  # Lark (llguidance's syntax), or GBNF / EBNF as llama.cpp and xgrammar write it
    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError("grammar must be a non-empty string")
    try:
        grammar = any_to_lark(grammar)  # GBNF is converted; Lark passes through
    except GbnfToLarkError as e:
        raise ValueError(f"the GBNF grammar cannot be read: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(grammar)


def hf_grammar_tokenizer(hf, vocab_size: int, eos: tuple[int, ...] = ()) -> llguidance.LLTokenizer:
    """llguidance's view of a transformers tokenizer (the byte string of every token id), over the
    model's `vocab_size` logits: ~1 s for a 100k-token vocabulary, so callers keep it. ValueError
    when it is not a fast tokenizer (llguidance reads its `tokenizer.json` form)."""
    try:
        return llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=list(eos) or None)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(
            f"structured output needs the model's fast tokenizer (tokenizer.json): {e}"
        ) from None


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(model_dir: str, vocab_size: int, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    """`hf_grammar_tokenizer` of the model's own tokenizer, once per process and model."""
    from transformers import AutoTokenizer  # the serving processes import transformers anyway

    try:
        hf = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"structured output needs the model's tokenizer, which could not be read: {e}"
        ) from None
    return hf_grammar_tokenizer(hf, vocab_size, eos)


def check_grammar(grammar: str, tokenizer: llguidance.LLTokenizer) -> None:
    """ValueError with llguidance's message when `grammar` is invalid for this tokenizer."""
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if error:
        raise ValueError(f"the structured output cannot be compiled: {'; '.join(messages)}")


class GrammarState:
    """One sequence's matcher; `advance` says when the grammar takes no more tokens (it stops)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, made: list[int]):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the structured output cannot be compiled: {self.matcher.get_error()}")
        if made:  # a stream resumed on another router: its tokens so far come first
            self.matcher.consume_tokens(made)

    def advance(self, token: int) -> bool:
        """Take the sampled token; True once the grammar takes no more (the sequence is done)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()


class GrammarMasks:
    """Masks the constrained rows of a batch's logits, all rows' bitmasks filled in one call
    (llguidance fills them on its own threads, without the GIL)."""

    # bit j of a byte -> bool: a bitmask read as bytes unpacks with one gather (a shift-and over
    # int32 words was 10x slower at 128k tokens)
    _BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # [256, 8]

    def __init__(self):
        self._executor: llguidance.LLExecutor | None = None
        self._lock = threading.Lock()
        self._bits: dict[torch.device, torch.Tensor] = {}  # _BITS on each device the logits were on

    def apply(self, logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> torch.Tensor:
        """logits [B, V] (float32) with rows[i] limited to what states[i] allows; a new tensor."""
        vocab = logits.shape[1]
        words = (vocab + 31) // 32
        mask = torch.zeros(len(rows), words, dtype=torch.int32)  # [R, W], bit k of word w: token 32w+k
        with self._lock:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(
                [(s.matcher, i) for i, s in enumerate(states)], mask.data_ptr(), words * 4, len(rows)
            )
        # Unpacked where the logits are: a GPU gets the 32x smaller bitmask, not [R, V] booleans.
        device = logits.device
        bits = self._bits.get(device)
        if bits is None:
            bits = self._bits[device] = self._BITS.to(device)
        packed = mask.view(torch.uint8).to(device, non_blocking=True).long()  # [R, 4W]
        banned = ~bits[packed].reshape(len(rows), words * 32)[:, :vocab]  # [R, V]
        if len(rows) == logits.shape[0]:  # every row constrained (rows are in order)
            return logits.masked_fill(banned, float("-inf"))
        out = logits.clone()
        index = torch.tensor(rows, device=logits.device)
        out[index] = logits[index].masked_fill(banned, float("-inf"))
        return out
