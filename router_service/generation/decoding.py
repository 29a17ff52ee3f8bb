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

from moe_serving import tracing
from router_service.generation.constraints import GrammarMasks, GrammarState
from router_service.generation.overlap import join_caches, split_bounds, split_cache


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence decoding settings. temperature 0 is greedy.

    Logits are processed in this order (vLLM's, and transformers' where it has the processor):
    `min_tokens` masks the end-of-sequence and stop tokens until that many tokens are made
    (transformers' MinNewTokensLengthLogitsProcessor); `repetition_penalty` divides positive and
    multiplies negative logits of every token in prompt + completion (transformers'
    RepetitionPenaltyLogitsProcessor); `frequency_penalty` * count and `presence_penalty` * (count > 0)
    over the completion's tokens are subtracted (OpenAI's definitions); then temperature, min-p,
    top-k and top-p. Before all of them, a `grammar` (llguidance's, `constraints.py`) masks what the
    structured output does not allow, `allowed_token_ids` masks every other token, and
    `logit_bias` ((token, bias) pairs) is added.

    stop_token_ids: tokens that end the sequence ("stop") like the end-of-sequence token, which
    `ignore_eos` turns off (stop_token_ids still stop). logprobs: None, or report the chosen token's
    log-probability and the `logprobs` most likely tokens' under the model's own distribution
    (log-softmax of the raw logits, before penalties and temperature, as vLLM reports them).
    resume_at: the index, within the completion, of the first token this request makes (non-zero
    when a request resumes after a router restart, its earlier tokens appended to the prompt).
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    resume_at: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if not isinstance(self.resume_at, int) or self.resume_at < 0:
            raise ValueError(f"resume_at must be a non-negative int, got {self.resume_at!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative int, got {self.min_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative int (0: off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
            object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in self.allowed_token_ids))

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def biased(self) -> bool:
        return bool(self.logit_bias) or self.allowed_token_ids is not None


MAX_LOGPROBS = 20  # most likely alternatives reported per token, at most (vLLM's default limit)


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
    grammar: GrammarState | None = None  # the structured output's matcher (set at submission)

    def __post_init__(self):
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            self.seed = self.params.seed if self.params.seed is not None else int(self.generator.seed())

    def next_generator(self) -> torch.Generator:
        """The generator for the next token's draw."""
        return self.generator.manual_seed(_mix(self.seed, self.made()))

    def made(self) -> int:
        """Tokens of the completion made so far (by this router and, before a restart, others)."""
        return self.params.resume_at + len(self.generated)

    def completion(self) -> list[int]:
        """The completion's tokens so far (those made before a router restart end the prompt)."""
        r = self.params.resume_at
        return (self.prompt[len(self.prompt) - r :] if r else []) + self.generated


def process_logits(logits: torch.Tensor, seqs: list[Sequence], eos: set[int]) -> torch.Tensor:
    """Logits [B, V] (float32) with each row's min_tokens mask and penalties applied (see
    SamplingParams for the order and definitions); rows without either are left as they are."""
    out = logits
    for i, seq in enumerate(seqs):
        p = seq.params
        masked = seq.made() < p.min_tokens
        if not (masked or p.penalized or p.biased):
            continue
        if out is logits:
            out = logits.clone()
        row = out[i]  # [V], a view
        if p.allowed_token_ids is not None:
            keep = torch.tensor(p.allowed_token_ids, device=row.device)
            allowed = row[keep]
            row.fill_(-float("inf"))
            row[keep] = allowed
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias, strict=True)
            row[torch.tensor(ids, device=row.device)] += torch.tensor(bias, device=row.device)
        if masked:
            banned = set(p.stop_token_ids) | eos
            if banned:
                row[torch.tensor(sorted(banned), device=row.device)] = -float("inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt + seq.generated, device=row.device).unique()
            score = row[seen]
            row[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            made = seq.completion()
            if made:
                counts = torch.bincount(torch.tensor(made), minlength=row.shape[0]).to(row)  # [V]
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row)
    return out


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list:
    """Per row: None, or (logprob of the chosen token, [(token id, logprob), ...] of the row's
    `logprobs` most likely tokens, most likely first) under log-softmax of the raw logits [B, V]."""
    out: list = [None] * len(seqs)
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1).cpu()  # [R, V]
    k = max(seqs[i].params.logprobs for i in rows)
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    for r, i in enumerate(rows):
        n = seqs[i].params.logprobs
        top = list(zip(top_ids[r, :n].tolist(), top_lp[r, :n].tolist(), strict=True))
        out[i] = (float(lp[r, tokens[i]]), top)
    return out


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token per row of logits [B, V] (float32): argmax for greedy rows, else temperature,
    min-p, top-k and top-p (nucleus) sampling (vLLM's order) with the row's own generator, so a
    seeded request is reproducible whatever else is in the batch."""
    out = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            continue
        # Extreme settings (temperature 1e-300, repetition_penalty 5e-324: a fuzzer's) overflow the
        # scaled logits; inf becomes the largest finite value, so they sample like greedy, and no
        # NaN reaches multinomial (whose error would fail the whole batch).
        scaled = torch.nan_to_num(
            logits[i].double().cpu() / p.temperature, nan=-float("inf"), posinf=torch.finfo(torch.float64).max
        )
        if not torch.isfinite(scaled).any():
            continue  # nothing left to sample from: the argmax (the caller ends such rows)
        probs = torch.softmax(scaled, dim=-1)
        if p.min_p > 0.0:  # tokens less likely than min_p x the most likely one are out
            probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs)
        if 0 < p.top_k < probs.shape[0]:
            kth = probs.topk(p.top_k).values[-1]
            probs = torch.where(probs < kth, 0.0, probs)  # ties at the k-th all stay, as in vLLM
        if p.min_p > 0.0 or p.top_k:
            probs = probs / probs.sum()
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

    def __init__(self, model, eos_token_ids: set[int], device: torch.device, overlap=None):
        self.model = model
        self.overlap = overlap  # a MicroBatchRunner: big enough steps run as overlapped micro-batches
        self.eos = eos_token_ids
        self.masks = GrammarMasks()
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
    def add(self, new: list[Sequence]) -> list[tuple]:
        """Prefill `new` (left-padded among themselves), sample their first tokens, merge them in.
        Returns (sequence, token, finish_reason, logprobs) for each new sequence."""
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
        with tracing.span("model"):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos_ids, cache=cache, use_cache=True
            )
        tokens, logprobs = self._sample(out.logits[:, -1].float(), new)
        last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = mask.sum(-1)
        self._merge(new, cache, mask, pos, last)
        return self._record(new, tokens, logprobs)

    @torch.inference_mode()
    def step(self) -> list[tuple]:
        """One decode step for every live sequence. Returns (sequence, token, finish_reason,
        logprobs) per row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        n = len(self.seqs)
        with tracing.span("model"):
            if self.overlap is not None and self.overlap.wanted(n) and _mergeable(self.cache):
                logits = self._forward_overlapped(n)
            else:
                logits = self._forward(0, n, self.cache)
        with tracing.span("sample"):
            tokens, logprobs = self._sample(logits.float(), self.seqs)
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.pos = self.pos + 1
        return self._record(self.seqs, tokens, logprobs)

    def _forward(self, lo: int, hi: int, cache) -> torch.Tensor:
        """Last-position logits [hi - lo, V] of one decode step for rows [lo, hi), with `cache`."""
        out = self.model(
            input_ids=self.last[lo:hi, None],
            attention_mask=self.mask[lo:hi],
            position_ids=self.pos[lo:hi, None],
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _forward_overlapped(self, n: int) -> torch.Tensor:
        """The step as micro-batches whose dense work and expert round trips overlap."""
        bounds = split_bounds(n)
        parts = [split_cache(self.cache, lo, hi) for lo, hi in bounds]
        logits = self.overlap.run(
            [
                lambda lo=lo, hi=hi, c=c: self._forward(lo, hi, c)
                for (lo, hi), c in zip(bounds, parts, strict=True)
            ]
        )
        join_caches(self.cache, parts)
        return torch.cat(logits)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list]:
        """Next token per row of logits [B, V], and its log-probabilities where asked for."""
        processed = logits
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            with tracing.span("grammar mask", {"rows": len(constrained)}):
                processed = self.masks.apply(logits, constrained, [seqs[i].grammar for i in constrained])
        processed = process_logits(processed, seqs, self.eos)
        tokens = sample_rows(processed, seqs)
        if constrained or any(s.params.allowed_token_ids is not None for s in seqs):
            # A row whose constraints leave no token at all (allowed_token_ids outside the grammar,
            # say) ends here, on the end-of-sequence token, rather than sampling from nothing.
            for i in (~torch.isfinite(processed).any(dim=-1)).nonzero().flatten().tolist():
                seqs[i].finish_reason = "stop"
                tokens[i] = min(self.eos) if self.eos else tokens[i]
        return tokens, token_logprobs(logits, seqs, tokens)

    def _record(self, seqs: list[Sequence], tokens: list[int], logprobs: list) -> list[tuple]:
        """(sequence, token, finish_reason as of this token, logprobs or None) per row. A
        structured output's matcher takes the token; once it takes no more, the sequence stops."""
        out = []
        for s, t, lp in zip(seqs, tokens, logprobs, strict=True):
            s.generated.append(t)
            if s.finish_reason is not None:
                pass  # ended by `_sample`
            elif (
                (t in self.eos and not s.params.ignore_eos)
                or t in s.params.stop_token_ids
                or s.grammar is not None
                and s.grammar.advance(t)
            ):
                s.finish_reason = "stop"
            elif len(s.generated) >= s.params.max_new_tokens:
                s.finish_reason = "length"
            out.append((s, t, s.finish_reason, lp))
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
