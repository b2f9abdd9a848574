"""Batched decoding of left-padded prompts on a whole model, for self-distillation data.

Transformer.forward takes one (T, T) mask for the whole batch, which cannot hide each sequence's own left
padding; this module runs the model's blocks with a (B, 1, 1, T, S) mask instead. Padding slots get a large
finite penalty rather than -inf: an all-padding query row then stays finite instead of turning into NaN that
would leak through zero attention weights."""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes

from ..model import Transformer, apply_rope, causal_mask

HIDDEN = -1e9  # additive score for keys a query must not see


def _attention(attn, x: Tensor, cache_kv: Tensor, start_pos, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
    c, (B, T, _) = attn.config, x.shape
    q = attn.q_proj(x).reshape(B, T, c.n_heads, c.head_dim).transpose(1, 2)
    k = attn.k_proj(x).reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
    v = attn.v_proj(x).reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache_kv[:, :, :, start_pos:start_pos + T].assign(Tensor.stack(k, v).cast(cache_kv.dtype)).realize()
    keys, values = cache_kv[0, :, :, 0:start_pos + T], cache_kv[1, :, :, 0:start_pos + T]
    group = c.n_heads // c.n_kv_heads
    q = q.reshape(B, c.n_kv_heads, group, T, c.head_dim)
    scores = q @ keys.unsqueeze(2).transpose(-1, -2) * (1.0 / c.head_dim ** 0.5) + mask
    out = scores.softmax(-1) @ values.unsqueeze(2)
    return attn.o_proj(out.reshape(B, c.n_heads, T, c.head_dim).transpose(1, 2).reshape(B, T, -1))


def batched_forward(model: Transformer, x: Tensor, layers: list[Tensor], start_pos, key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, T) token ids at cache slots start_pos..start_pos+T-1, causal among themselves; key_mask (B, cache_len)
    additive, HIDDEN on each sequence's padding slots. Returns (normed hidden (B, T, D), logits (B, T, V))."""
    B, T = x.shape
    rope_cos, rope_sin = model._rope_tables()
    cos, sin = rope_cos[start_pos:start_pos + T], rope_sin[start_pos:start_pos + T]
    causal = Tensor(np.maximum(causal_mask(T), HIDDEN), device=key_mask.device).pad(((0, 0), (start_pos, 0)))
    mask = key_mask[:, 0:start_pos + T].reshape(B, 1, 1, 1, -1) + causal.reshape(1, 1, 1, T, -1)
    h = model.embed_tokens[x]
    for block, cache_kv in zip(model.layers.values(), layers):
        h = (h + _attention(block.self_attn, block.input_layernorm(h), cache_kv, start_pos, cos, sin, mask)).contiguous()
        h = (h + block.mlp(block.post_attention_layernorm(h))).contiguous()
    hidden = model.norm(h).contiguous()
    return hidden, model.logits(hidden)


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
