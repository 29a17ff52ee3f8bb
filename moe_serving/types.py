"""Request and result types of text generation, shared by the HTTP and gRPC front ends and clients."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerateParams:
    """One generation request. Exactly one of `prompt` (text) and `prompt_token_ids` is set."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerateChunk:
    """Tokens generated since the previous chunk; the last chunk has `finish_reason` set
    ("length": max_tokens reached, "stop": the model's end-of-sequence token)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
