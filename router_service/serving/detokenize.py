"""The text side of a token stream: incremental detokenisation, stop strings, token pieces.

`TextStream` turns token ids into text deltas as they arrive, in time linear in the stream's length.
A fast (`tokenizers`) tokenizer uses the library's own streaming decoder (`DecodeStream`), which
keeps back the bytes of a character split over several tokens until the character is complete;
other tokenizers use the prefix-offset method (decode a short window before and after the new token
and emit the difference once it no longer ends in U+FFFD), which vLLM and transformers'
TextStreamer use. The stream is primed with the end of the prompt, so a word-initial token
("▁Hello" in SentencePiece vocabularies) keeps its leading space.

`StopStrings` cuts the text before the first stop string, holding back any tail that could still
become one, so a stop string split over two chunks is never half-sent.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer
from tokenizers import decoders as tk_decoders

from moe_serving.types import TokenLogprob

PRIME_TOKENS = 6  # prompt tokens the stream decodes before the first new one (context for spaces)


class TextStream:
    """Text deltas of a growing token sequence: `push(token_id)` returns the new text ("" while a
    character is incomplete), `flush()` what is left at the end (an incomplete character as U+FFFD).

    `streaming=False` forces the prefix-offset method on a fast tokenizer (tests).
    """

    def __init__(self, tokenizer, prompt_ids: list[int] = (), streaming: bool = True):
        self.tokenizer = tokenizer
        prime = list(prompt_ids)[-PRIME_TOKENS:]
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = backend if streaming and isinstance(backend, Tokenizer) else None
        if self._fast is not None:
            self._decoder = tk_decoders.DecodeStream(ids=prime, skip_special_tokens=True)
            self._pending: list[int] = []  # tokens whose text the decoder still holds back
        else:
            self._ids = prime
            self._prefix = 0  # start of the context window
            self._read = len(prime)  # tokens before this one have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        if self._fast is not None:
            text = self._decoder.step(self._fast, int(token_id))
            if text is None:
                self._pending.append(int(token_id))
                return ""
            self._pending = []
            return text
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character decodes as U+FFFD)."""
        if self._fast is not None:
            pending, self._pending = self._pending, []
            return self._decode(pending) if pending else ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopStrings:
    """Cuts a text stream before the first of `stops`: `push(delta)` returns (text safe to send,
    whether a stop string was found); after a find, nothing more is to be sent. `flush()` returns
    the held-back tail when the stream ends without one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buf[: min(found)], True
        # Hold back the longest tail of buf that begins some stop string.
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in visible}
    others = [b for b in range(256) if b not in visible]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class TokenPieces:
    """What logprobs report of a single token: its text and its bytes (OpenAI's `bytes`: the UTF-8
    bytes of the token, which for a byte-level vocabulary may be part of a character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = backend is not None and isinstance(backend.decoder, tk_decoders.ByteLevel)
        self._u2b = _gpt2_unicode_to_byte() if self._byte_level else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        if token_id in set(getattr(self.tokenizer, "all_special_ids", ())):
            text = self.tokenizer.convert_ids_to_tokens(token_id)
            return text, list(text.encode())
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_level and isinstance(raw, str) and all(c in self._u2b for c in raw):
            data = bytes(self._u2b[c] for c in raw)
        elif isinstance(raw, str) and (m := _BYTE_FALLBACK.match(raw)):
            data = bytes([int(m.group(1), 16)])
        else:
            data = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode()
        return data.decode("utf-8", errors="replace"), list(data)


class CompletionText:
    """One choice's tokens -> (tokens, text, logprobs, finish) as its client sees them: text decoded
    incrementally, cut before a stop string (the tokens after the one that completed it dropped),
    a stop token's own text left out, logprobs with each token's text, bytes and text offset.

    `tokenizer` may be None (token ids only: no text, no stop strings)."""

    def __init__(self, tokenizer, prompt_ids, stop=(), stop_token_ids=(), logprobs: bool = False):
        self.text = TextStream(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stops = StopStrings(stop)
        self.stop_ids = set(stop_token_ids)
        self.pieces = TokenPieces(tokenizer) if tokenizer is not None and logprobs else None
        self.offset = 0  # characters of decoded text so far (before any cut)

    def feed(self, tokens: list[int], finish: str | None, logprobs: list | None):
        """(tokens kept, text to send, their TokenLogprobs or None, finish_reason): finish is "stop"
        when a stop string ended the text here, and then nothing more is to be sent."""
        kept, out = [], []
        lps = [] if logprobs is not None else None
        for k, t in enumerate(tokens):
            kept.append(t)
            if lps is not None:
                lps.append(self._logprob(t, logprobs[k]))
            last = finish is not None and k == len(tokens) - 1
            piece = ""
            if self.text is not None:
                if not (last and finish == "stop" and t in self.stop_ids):
                    piece = self.text.push(t)
                if last:
                    piece += self.text.flush()
            self.offset += len(piece)
            emit, hit = self.stops.push(piece)
            out.append(emit)
            if hit:
                return kept, "".join(out), lps, "stop"
        if finish is not None:
            out.append(self.stops.flush())
        return kept, "".join(out), lps, finish

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        return self.pieces(token_id) if self.pieces is not None else ("", [])

    def _logprob(self, token_id: int, entry) -> TokenLogprob:
        logprob, top = entry
        token, data = self._piece(token_id)
        alternatives = []
        for alt_id, alt_logprob in top:
            alt_token, alt_data = self._piece(alt_id)
            alternatives.append(TokenLogprob(alt_id, alt_token, alt_logprob, alt_data))
        return TokenLogprob(token_id, token, logprob, data, alternatives, self.offset)
