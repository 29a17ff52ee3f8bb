"""Echo: a completion's prompt handed back with its tokens' logprobs, as lm-evaluation-harness asks
for them (`echo: true, logprobs: N, max_tokens: 0 or 1`) to score multiple choice and perplexity.

The logprobs come from one forward pass of the prompt (the `/v1/forward` path: logits at every
position), in float32 log_softmax, so they are the ones `transformers` gives for the same
checkpoint. Pure functions, no Ray.
"""

from __future__ import annotations

import torch

from moe_serving.types import TokenLogprob
from router_service.serving.detokenize import TokenPieces


def prompt_logprobs(
    logits: torch.Tensor, ids: list[int], top: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """(logprob of token i+1 given tokens 0..i, its `top` most likely alternatives) for every prompt
    token after the first (the first has no context, so nothing here: it is reported as null).

    S = prompt tokens, V = vocabulary. logits: [S, V] (the forward's, any float dtype)."""
    if len(ids) < 2:
        return []
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [S-1, V]: position i predicts token i+1
    nxt = torch.tensor(ids[1:], dtype=torch.long)
    chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()  # [S-1]
    if top > 0:
        alt_lp, alt_ids = logp.topk(top, dim=-1)  # [S-1, top]
        alts = [list(zip(i, v, strict=True)) for i, v in zip(alt_ids.tolist(), alt_lp.tolist(), strict=True)]
    else:
        alts = [[] for _ in chosen]
    return list(zip(chosen, alts, strict=True))


def echo_token_logprobs(tokenizer, ids: list[int], entries) -> list[TokenLogprob]:
    """The prompt's TokenLogprobs: the first with logprob None (and no alternatives: top_logprobs
    null), then `entries` (from `prompt_logprobs`); text_offset: characters of the token pieces
    before each token, from the start of the choice's text."""
    pieces = TokenPieces(tokenizer) if tokenizer is not None else (lambda _t: ("", []))
    out, offset = [], 0
    for k, t in enumerate(ids):
        token, data = pieces(t)
        if k == 0:
            out.append(TokenLogprob(t, token, None, data, None, offset))
        else:
            logprob, top = entries[k - 1]
            alternatives = [TokenLogprob(a, *_piece_and_logprob(pieces, a, lp)) for a, lp in top]
            out.append(TokenLogprob(t, token, logprob, data, alternatives, offset))
        offset += len(token)
    return out


def _piece_and_logprob(pieces, token_id: int, logprob: float) -> tuple[str, float, list[int]]:
    token, data = pieces(token_id)
    return token, logprob, data


def echo_text(tokenizer, prompt: str | None, ids: list[int]) -> str:
    """The echoed prompt: the text as given, or a token-id prompt decoded (as vLLM echoes it)."""
    if prompt is not None:
        return prompt
    return tokenizer.decode(ids) if tokenizer is not None else ""
