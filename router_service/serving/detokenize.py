"""Incremental detokenisation: text deltas for a growing list of token ids.

Byte-level tokenizers can split one UTF-8 character over several tokens; decoding each token alone
would print replacement characters. So the whole generated sequence is decoded each time and only
the new, complete suffix is emitted; a trailing U+FFFD (an incomplete character) is held back until
the next token completes it, or released at the end.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted

    def push(self, token_ids: list[int], final: bool = False) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
