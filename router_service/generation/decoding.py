"""Continuous batching for generation: many sequences decoded together through one KV cache.

Every decode step runs all live sequences as one batch through the model, so concurrent requests
share each pass through the experts (T = number of live sequences per MoE layer, not 1). New
sequences join between steps: they are prefilled together, then their KV cache is merged into the
running batch by left-padding the shorter of the two along the sequence axis (the padding is masked
out and every sequence keeps its own position ids, so a sequence's logits do not depend on who it
shares the batch with beyond the last bits of the matmuls). Finished or cancelled sequences leave at
once and the columns that only padding still uses are trimmed.

Merging needs the plain per-layer `DynamicLayer` cache (full attention); a model whose cache has
sliding-window or other layer kinds still batches, but new sequences wait until the running batch
is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence decoding settings. temperature 0 is greedy.

    resume_at: the index, within the completion, of the first token this request makes (non-zero
    when a request resumes after a router restart, its earlier tokens appended to the prompt).
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    resume_at: int = 0

    def __post_init__(self):
        if not isinstance(self.resume_at, int) or self.resume_at < 0:
            raise ValueError(f"resume_at must be a non-negative int, got {self.resume_at!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _mix(seed: int, index: int) -> int:
    """A well-spread 63-bit seed for token `index` of a stream seeded with `seed` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


@dataclass(eq=False)
class Sequence:
    """One request's state inside a batch.

    Sampling is counter-based: the random draw of the completion's token i depends only on (seed, i),
    not on how many draws came before in this process, so a stream resumed on a restarted router
    (its earlier tokens re-sent as prompt, `resume_at` set) draws what the uninterrupted one would.
    """

    prompt: list[int]
    params: SamplingParams
    key: object = None  # the caller's handle for this sequence
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "cancelled"
    generator: torch.Generator | None = None
    seed: int = 0

    def __post_init__(self):
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            self.seed = self.params.seed if self.params.seed is not None else int(self.generator.seed())

    def next_generator(self) -> torch.Generator:
        """The generator for the next token's draw."""
        return self.generator.manual_seed(_mix(self.seed, self.params.resume_at + len(self.generated)))


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token per row of logits [B, V] (float32): argmax for greedy rows, else temperature and
    top-p (nucleus) sampling with the row's own generator, so a seeded request is reproducible
    whatever else is in the batch."""
    out = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            continue
        probs = torch.softmax(logits[i].double().cpu() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        out[i] = int(torch.multinomial(probs, 1, generator=seq.next_generator()))
    return out


def _mergeable(cache: DynamicCache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """The running batch: its sequences, one KV cache, the attention mask and per-row positions.

    `model` is a `transformers` causal LM (the router's, experts dispatched to the workers).
    Not thread-safe: the caller serialises calls (the router holds its lock around each step).
    """

    def __init__(self, model, eos_token_ids: set[int], device: torch.device):
        self.model = model
        self.eos = eos_token_ids
        self.device = device
        self.seqs: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] 1 = token, 0 = left padding
        self.pos: torch.Tensor | None = None  # [B] position id of each row's next token
        self.last: torch.Tensor | None = None  # [B] each row's latest token

    def __len__(self) -> int:
        return len(self.seqs)

    def can_join(self) -> bool:
        """New sequences may join now (always when empty; else only with a mergeable cache)."""
        return not self.seqs or _mergeable(self.cache)

    def tokens_in_flight(self) -> int:
        """Upper bound of KV positions the batch will hold if every sequence runs to its limit."""
        return sum(len(s.prompt) + s.params.max_new_tokens for s in self.seqs)

    @torch.inference_mode()
    def add(self, new: list[Sequence]) -> list[tuple[Sequence, int, str | None]]:
        """Prefill `new` (left-padded among themselves), sample their first tokens, merge them in.
        Returns (sequence, token, finish_reason) for each new sequence."""
        if not new:
            return []
        if not self.can_join():
            raise RuntimeError("this model's KV cache cannot take sequences into a running batch")
        width = max(len(s.prompt) for s in new)
        ids = torch.zeros(len(new), width, dtype=torch.long)
        mask = torch.zeros(len(new), width, dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, width - len(s.prompt) :] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos_ids, cache=cache, use_cache=True
        )
        tokens = sample_rows(out.logits[:, -1].float(), new)
        last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = mask.sum(-1)
        self._merge(new, cache, mask, pos, last)
        return self._record(new, tokens)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int, str | None]]:
        """One decode step for every live sequence. Returns (sequence, token, finish_reason) per row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.pos[:, None],
            cache=self.cache,
            use_cache=True,
        )
        tokens = sample_rows(out.logits[:, -1].float(), self.seqs)
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.pos = self.pos + 1
        return self._record(self.seqs, tokens)

    def _record(self, seqs: list[Sequence], tokens: list[int]) -> list[tuple[Sequence, int, str | None]]:
        """(sequence, token, finish_reason as of this token) per row."""
        out = []
        for s, t in zip(seqs, tokens, strict=True):
            s.generated.append(t)
            if t in self.eos:
                s.finish_reason = "stop"
            elif len(s.generated) >= s.params.max_new_tokens:
                s.finish_reason = "length"
            out.append((s, t, s.finish_reason))
        return out

    def _merge(self, new, cache, mask, pos, last) -> None:
        if not self.seqs:
            self.seqs, self.cache, self.mask, self.pos, self.last = list(new), cache, mask, pos, last
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.pos = torch.cat([self.pos, pos])
        self.last = torch.cat([self.last, last])
        self.seqs.extend(new)

    def evict(self, gone: set[int]) -> None:
        """Drop the sequences whose `id()` is in `gone` (finished or cancelled) and the padding
        columns nobody needs any more."""
        keep = [i for i, s in enumerate(self.seqs) if id(s) not in gone]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.seqs, self.cache, self.mask, self.pos, self.last = [], None, None, None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
        self.cache.batch_select_indices(idx)
        # Leading columns that are padding for every remaining row can go.
        first = int(self.mask.argmax(dim=1).min())  # first real token of the row with most history
        if first > 0 and _mergeable(self.cache):
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
