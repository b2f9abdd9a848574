"""Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` entries (token, logprob, bytes, top_logprobs)
and the completions route's older object (tokens, token_logprobs, top_logprobs, text_offset).

A token's text is what it decodes to alone; its bytes are its exact bytes, also for a token holding part of a
character (its text then shows U+FFFD, as OpenAI's does).
"""
from __future__ import annotations

import functools

from ..decoding.sampling import TokenLogprob


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable stand-in character of each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 256
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(extra)], extra = b, extra + 1
    return out


class TokenTexts:
    """Each token's text and bytes under one tokenizer, cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer.tok, "decoder", None)
        self._byte_level = _byte_level_chars() if type(decoder).__name__ == "ByteLevel" else None

    @functools.lru_cache(maxsize=1 << 16)
    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    @functools.lru_cache(maxsize=1 << 16)
    def bytes(self, token: int) -> tuple[int, ...]:
        piece = self.tokenizer.tok.id_to_token(token) if token not in self.tokenizer.special_ids else None
        if self._byte_level is not None and piece and all(c in self._byte_level for c in piece):
            return tuple(self._byte_level[c] for c in piece)
        return tuple(self.text(token).encode())

    # -- chat: logprobs.content
    def chat_entry(self, entry: TokenLogprob) -> dict:
        return {**self._alternative(entry.token, entry.logprob),
                "top_logprobs": [self._alternative(t, lp) for t, lp in entry.top]}

    def _alternative(self, token: int, logprob: float) -> dict:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.bytes(token))}

    def chat(self, entries: list[tuple[TokenLogprob, int]]) -> dict:
        return {"content": [self.chat_entry(e) for e, _ in entries], "refusal": None}

    # -- completions: the older object; text_offset counts characters from the start of the returned text
    def legacy(self, entries: list[tuple[TokenLogprob, int]], base: int = 0) -> dict:
        top = []
        for e, _ in entries:
            alternatives: dict[str, float] = {}
            for t, lp in e.top:  # two ids may decode to one text: the likelier one's value stays
                alternatives.setdefault(self.text(t), lp)
            top.append(alternatives)
        return {"tokens": [self.text(e.token) for e, _ in entries], "token_logprobs": [e.logprob for e, _ in entries],
                "top_logprobs": top, "text_offset": [base + offset for _, offset in entries]}

