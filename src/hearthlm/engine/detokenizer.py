"""Incremental detokenization with stop strings that never leak into the text."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextState:
    text: str = ""
    # text offset up to which stop strings were searched: never past a trailing U+FFFD, a character whose
    # bytes are still arriving (when it completes the text keeps its length, so the search must cover it again)
    stop_checked: int = 0
    num_text_tokens: int = 0  # output tokens that belong in the text (a final stop token does not)
    decoded_tokens: int = -1  # num_text_tokens when text was last decoded
    stopped: bool = False  # text was cut at a stop string; never re-decode

    def update(self, tokenizer, output_ids: list[int], skip_special: bool, stops: list[str],
               include_stop: bool) -> str | None:
        """Re-decode the output if it grew; return the stop string that ended it, if any (text is cut before it)."""
        if self.stopped or self.decoded_tokens == self.num_text_tokens:
            return None
        self.text = tokenizer.decode(output_ids[:self.num_text_tokens], skip_special_tokens=skip_special)
        self.decoded_tokens = self.num_text_tokens
        settled = _settled_len(self.text)
        if not stops:
            self.stop_checked = settled
            return None
        longest = max(len(s) for s in stops)
        begin = max(0, self.stop_checked - longest + 1)
        hit, hit_at = None, len(self.text) + 1
        for s in stops:
            i = self.text.find(s, begin)
            if i != -1 and i < hit_at:
                hit, hit_at = s, i
        self.stop_checked = settled
        if hit is not None:
            self.text = self.text[:hit_at + (len(hit) if include_stop else 0)]
            self.stopped = True
        return hit

    def stable_text(self, stops: list[str], finished: bool) -> str:
        """Text safe to stream: hold back a trailing replacement char and any possible stop-string prefix."""
        if finished:
            return self.text
        text = self.text[:_settled_len(self.text)]
        hold = 0
        for s in stops:
            hold = max(hold, _stop_prefix_at_end(text, s))
        return text[:len(text) - hold] if hold else text


def _settled_len(text: str) -> int:
    """Length of text without its trailing U+FFFD characters (a multi-byte character decoded in part)."""
    return len(text.rstrip("\ufffd"))


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper prefix of stop that text ends with (0 if none). Tries only the tail
    positions holding stop's first character, longest first: C-speed compares, no slice per length."""
    start = max(0, len(text) - len(stop) + 1)
    i = text.find(stop[0], start)
    while i != -1:
        if stop.startswith(text[i:]):
            return len(text) - i
        i = text.find(stop[0], i + 1)
    return 0
