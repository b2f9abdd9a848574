"""Drafting with the feature-level draft head (draft_head.py) during greedy generation: one captured call a step.

After every verify step the head catches up on what the model accepted, then drafts `depth` tokens:
  - catch-up: the verified rows' hidden states (f) paired with the tokens that followed each (the accepted drafts and
    the bonus token) run through the head's layer at their answer positions; their keys and values go into the head's
    own one-layer cache, overwriting the speculative ones the last drafts left there;
  - drafting: the guess of the last accepted row drafts a token over the proposal vocabulary; the guess and that
    token's embedding are the next position's input, `depth` times.
Rows past the accepted ones are computed too (fixed shapes: one capture per verified size) and land past the
accepted positions, where the drafts, and later the next catch-up, overwrite them before anything reads them.

Attention reads a fixed window of cache slots at a symbolic start (a slot is its position plus window - 1, so no
window starts before slot 0), with an additive mask made on the host per call (causality within the window, and the
slots before the answer's first position). Everything else is fixed-shape, so each capture replays at any position."""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes

from ..kernels.ops import take
from ..kernels.packed import Q8_0, pack_ggml
from ..kernels.tinygrad_hooks import read_host
from ..model.requantize import quantize
from ..model.transformer import Linear, Transformer
from .draft_head import DraftHead
from .steps import HostInputs

NEG = -1e9


class DraftHeadSteps:
    """Captured drafting for one generation at a time on one model (the head's cache is reused: `start` resets it)."""

    def __init__(self, head: DraftHead, model: Transformer, depth: int, packed: bool = True):
        """packed: the head's products and its proposal logits read Q8_0 codes (and the model's packed lm_head rows)
        instead of float32 weights, ~4x fewer bytes a draft; drafts may then differ from the float head's."""
        c = head.config
        if (c.dim, c.vocab_size) != (model.config.dim, model.config.vocab_size):
            raise ValueError(f"the draft head was trained for hidden size {c.dim} and {c.vocab_size} tokens; the model "
                             f"has {model.config.dim} and {model.config.vocab_size}")
        if depth < 1:
            raise ValueError(f"the draft head drafts at least one token a step, got depth {depth}")
        self.head, self.model, self.depth, self.window = head, model, depth, c.window
        self.device = dev = model.float_weight.device
        for name, w in head.weights.items():
            head.weights[name] = w.to(dev).cast(dtypes.float32).contiguous().realize()
        self.off = c.window - 1
        positions = model.cache_len + depth + 1                     # answer positions a generation can reach
        self.cache = Tensor.zeros(2, c.n_kv_heads, positions + self.off, c.head_dim, device=dev).contiguous().realize()
        cos, sin = c.rope(positions)
        self.cos, self.sin = Tensor(cos, device=dev).realize(), Tensor(sin, device=dev).realize()
        # token embeddings are lm_head rows (what the head trained on): the accepted tokens' rows come from the host,
        # a drafted token's from the proposal vocabulary's rows on the device (drafts never leave it)
        self.embeddings = model.lm_head.float().numpy()
        self.vocab = Tensor(head.vocab_ids, device=dev).realize()
        self.rows = Tensor(self.embeddings[head.vocab_ids], device=dev).realize()   # (V', dim)
        # the head's products read Q8_0 codes (a draft is only a proposal: rounding it costs no exactness), and the
        # proposal logits the model's own packed lm_head rows where it has them, as the Medusa heads do
        head.linears = {name: _q8_linear(head.weights[name]) for name in
                        ("fc", "q", "k", "v", "o", "gate", "up", "down")} if packed else {}
        self.logits = Linear(c.dim, len(head.vocab_ids))
        lm = model.packed_logits if packed else None
        Tensor.realize(*self.logits.set(lm.rows(head.vocab_ids) if lm is not None and len(head.vocab_ids) % 4 == 0
                                        else self.rows))
        self.p = UOp.variable("draft_p", 0, positions - 1)
        self.q = UOp.variable("draft_q", 0, positions - 1)
        self._captures: dict[int, TinyJit] = {}
        self._buffer = HostInputs(dev)
        self.position = 0            # answer position of the next catch-up row

    # -- host side ---------------------------------------------------------------------------------------------------
    def _mask(self, first: int, rows: int) -> np.ndarray:
        """(rows, window + rows - 1): row r at position first + r sees window slots r..r + window - 1 (itself and the
        window - 1 positions before), of which those before position 0 hold nothing."""
        W, L = self.window, self.window + rows - 1
        j, r = np.arange(L)[None, :], np.arange(rows)[:, None]
        visible = (j >= r) & (j <= r + W - 1) & (j >= W - 1 - first)
        return np.where(visible, 0.0, NEG).astype(np.float32)

    def start(self, hidden_row: Tensor, token: int) -> list[int]:
        """A new generation: the prefill's last hidden row (1, dim) and the first generated token. Returns the drafts."""
        self.position = 0
        # through the host: a slice of the prefill's output is a view, and a capture wants the same kind of input
        # every call (the verify steps' rows are plain buffers)
        return self.advance(self._buffer("first", hidden_row.numpy().reshape(1, -1), dtypes.float32), [token])

    def capture(self, sizes) -> None:
        """Capture the drafting call for each verified size now (TinyJit captures on a second call), on placeholder
        rows at position 0, which the next generation's start rewrites."""
        for T in sizes:
            for _ in range(2):
                self.position = 0
                self.advance(self._buffer("placeholder", np.zeros((T, self.head.config.dim), np.float32),
                                          dtypes.float32), [0] * T)
        self.position = 0

    def advance(self, hidden: Tensor, emitted: list[int]) -> list[int]:
        """After a verify step: hidden (T, dim), the realized hidden rows of its T verified nodes, the accepted ones
        first (a chain), and the tokens that followed the accepted nodes (accepted drafts, then the bonus token).
        Returns the next drafts."""
        T, accepted = hidden.shape[0], len(emitted)
        if not 1 <= accepted <= T:
            raise ValueError(f"{accepted} emitted tokens for {T} verified rows")
        tokens = np.zeros(T, dtype=np.int32)
        tokens[:accepted] = emitted
        first, next_first = self.position, self.position + accepted
        drafts_mask = np.concatenate([self._mask(next_first + m, 1) for m in range(self.depth - 1)]) \
            if self.depth > 1 else np.zeros((1, self.window), np.float32)
        if T not in self._captures:
            self._captures[T] = TinyJit(self._draft)
        out = self._captures[T](hidden, self._buffer("embeddings", self.embeddings[tokens], dtypes.float32),
                                self._buffer("last", np.array([accepted - 1], np.int32), dtypes.int32),
                                self._buffer("mask", self._mask(first, T), dtypes.float32),
                                self._buffer("drafts_mask", drafts_mask, dtypes.float32),
                                self.p.bind(first), self.q.bind(next_first))
        self.position = next_first
        return read_host(out).tolist()

    # -- captured ----------------------------------------------------------------------------------------------------
    def _layer(self, u: Tensor, first, mask: Tensor) -> Tensor:
        """u (1, R, dim) at positions first..first + R - 1: writes their keys and values, attends over the window,
        returns the guesses (1, R, dim)."""
        head, c, R = self.head, self.head.config, u.shape[1]
        q, k, v = head._qkv(u, self.cos[first:first + R], self.sin[first:first + R])   # q (1, kv, g, R, hd)
        self.cache[:, :, first + self.off:first + self.off + R].assign(Tensor.stack(k[0], v[0])).realize()
        L = self.window + R - 1
        keys = self.cache[0, :, first:first + L].unsqueeze(1)                             # (kv, 1, L, hd)
        values = self.cache[1, :, first:first + L].unsqueeze(1)
        scores = (q[0] @ keys.transpose(-1, -2)) * (1.0 / c.head_dim ** 0.5) + mask       # (kv, g, R, L)
        attn = scores.softmax(-1) @ values                                                # (kv, g, R, hd)
        return head._finish(u, attn.unsqueeze(0))

    def _draft(self, hidden: Tensor, embeddings: Tensor, last: Tensor, mask: Tensor, drafts_mask: Tensor, first,
               next_first):
        head = self.head
        u = head.inputs(hidden.unsqueeze(0), embeddings.unsqueeze(0))                      # (1, T, dim)
        guesses = self._layer(u, first, mask)[0]                                           # (T, dim)
        guess = (Tensor.arange(guesses.shape[0]).to(self.device).unsqueeze(-1) == last).where(guesses, 0).sum(0)
        picks = []
        for m in range(self.depth):
            picks.append(self.logits(guess.reshape(1, -1)).reshape(-1).argmax().reshape(1))  # index into the vocabulary
            if m + 1 == self.depth:
                break
            embedding = self.rows[picks[-1]].reshape(-1)
            u = head.inputs(guess.reshape(1, 1, -1), embedding.reshape(1, 1, -1))
            guess = self._layer(u, next_first + m, drafts_mask[m:m + 1])[0, 0]
        return take(self.vocab, Tensor.cat(*picks)).cast(dtypes.int32).realize()


def _q8_linear(weight: Tensor) -> Linear:
    w = weight.numpy()
    out, inp = w.shape
    linear = Linear(inp, out)
    Tensor.realize(*linear.set(pack_ggml(quantize(w, Q8_0), Q8_0, (out, inp)).to(weight.device)))
    return linear
