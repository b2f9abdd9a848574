"""Batched decoding of left-padded prompts on a whole model, for self-distillation data.

Each sequence's left padding is hidden through the model's per-sequence key mask. Padding slots get a large
finite penalty rather than -inf: an all-padding query row then stays finite instead of turning into NaN that
would leak through zero attention weights."""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes

from ..model.transformer import Transformer, causal_mask

HIDDEN = -1e9  # additive score for keys a query must not see


def batched_forward(model: Transformer, x: Tensor, layers: list[Tensor], start_pos, key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, T) token ids at cache slots start_pos..start_pos+T-1, causal among themselves; key_mask (B, cache_len)
    additive, HIDDEN on each sequence's padding slots. Returns (normed hidden (B, T, D), logits (B, T, V))."""
    T, dev = x.shape[1], key_mask.device
    depths = Tensor(np.arange(T, dtype=np.int32), device=dev)
    return model.forward(x, layers, start_pos, depths, Tensor(causal_mask(T), device=dev), key_mask)


class BatchedDecoder:
    """B sequences decoded in lockstep. Prompts are left-padded to a multiple of `chunk` and prefilled in captured
    chunks; each decode step returns the next token of every sequence and the hidden state it came from."""

    def __init__(self, model: Transformer, batch_size: int, temperature: float = 0.0, chunk: int = 32):
        if not (model.shard.is_first_layer() and model.shard.is_last_layer()):
            raise ValueError("batched decoding needs the whole model")
        self.model, self.B, self.temperature, self.chunk = model, batch_size, temperature, chunk
        dev = model.lm_head.device
        self.cache = model.new_cache(batch_size)
        self.key_mask = Tensor.zeros(batch_size, model.cache_len, device=dev).contiguous().realize()
        self.start_pos = UOp.variable("start_pos", 0, model.max_context)
        self._prefill = TinyJit(self._step)
        self._decode = TinyJit(self._step)
        self.pos = 0

    def _step(self, x: Tensor, layers: list[Tensor], start_pos: UOp, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden, logits = batched_forward(self.model, x, layers, start_pos, key_mask)
        hidden, logits = hidden[:, -1], logits[:, -1]
        if self.temperature > 0:  # Gumbel-max: a sample from softmax(logits / T) without leaving the device
            logits = logits / self.temperature - (-(Tensor.rand(*logits.shape, device=logits.device) + 1e-20).log() + 1e-20).log()
        return logits.argmax(-1).cast(dtypes.int32).realize(), hidden.realize()

    def start(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Prefill up to B prompts (missing rows repeat the last prompt). Returns the first new token of each
        row and the hidden state of each prompt's last token."""
        if not 0 < len(prompts) <= self.B:
            raise ValueError(f"expected 1..{self.B} prompts, got {len(prompts)}")
        rows = prompts + [prompts[-1]] * (self.B - len(prompts))
        C = self.chunk
        width = -(-max(len(p) for p in rows) // C) * C
        if width >= self.model.max_context:
            raise ValueError(f"a prompt of {max(len(p) for p in rows)} tokens does not fit a context of {self.model.max_context}")
        ids = np.zeros((self.B, width), dtype=np.int32)
        mask = np.zeros((self.B, self.model.cache_len), dtype=np.float32)
        for b, p in enumerate(rows):
            ids[b, width - len(p):] = p
            mask[b, :width - len(p)] = HIDDEN
        self.key_mask.assign(Tensor(mask, device=self.key_mask.device)).realize()
        for start in range(0, width, C):
            token, hidden = self._prefill(Tensor(ids[:, start:start + C]), self.cache.layers,
                                          self.start_pos.bind(start), self.key_mask)
        self.pos = width
        return token.numpy(), hidden.numpy()

    @property
    def room(self) -> int:
        """Decode steps left before the context is full."""
        return self.model.max_context - self.pos

    def step(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token per row; returns the next token per row and the hidden state at the fed token."""
        token, hidden = self._decode(Tensor(tokens.reshape(self.B, 1).astype(np.int32)), self.cache.layers,
                                     self.start_pos.bind(self.pos), self.key_mask)
        self.pos += 1
        return token.numpy(), hidden.numpy()
