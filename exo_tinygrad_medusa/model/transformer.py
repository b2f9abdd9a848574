"""A Llama / Qwen2 transformer shard in plain tinygrad tensors, with attention built for token trees.

A forward over T new tokens writes their K/V at a symbolic `start_pos` and attends to the whole cached
prefix plus the new tokens under a (T, T) additive mask. Token i sits at position start_pos + depths[i]:
for causal decoding depths = 0..T-1; in a Medusa tree, siblings share a depth. Because T, the mask and
the depths are fixed per step kind, one TinyJit capture replays at every start position.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, UOp, nn

from ..kernels import tinygrad_hooks
from ..kernels.attention import decode_attention
from .config import ModelConfig, rope_inv_freq
from ..kernels.packed import PackedWeight, panel_width
from .shard import Shard

Pos = int | UOp


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # half-split ("rotate_half") layout, as in transformers; GGUF weights are un-permuted on load to match
    x1, x2 = x.chunk(2, dim=-1)
    return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


class Linear:
    """x @ W (+ b), W held as panels [out / P, in, P] of P = 16 output columns. A product then streams each panel
    front to back (one contiguous run of in * P weights) while 16 outputs accumulate as one vector, and every
    weight load serves several tokens (tinygrad_hooks.choose_opts). A plain [in, out] matrix would walk its
    columns down rows one page apart; [out, in] leaves a horizontal sum per output. `weight` is a float Tensor or a
    PackedWeight (codes dequantized inside the product), both in panels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        self.in_features, self.out_features, self.panel = in_features, out_features, panel_width(out_features)
        self.weight: Tensor | PackedWeight = Tensor.zeros(out_features // self.panel, in_features, self.panel)
        self.bias = Tensor.zeros(out_features) if bias else None

    def panels(self) -> Tensor:
        """The float panels (lazy for packed weights: the dequantization fuses into the product's kernel)."""
        return self.weight if isinstance(self.weight, Tensor) else self.weight.dequantize()

    def matrix(self) -> Tensor:
        """The checkpoint's [out, in] matrix, as a lazy view."""
        return self.panels().permute(0, 2, 1).reshape(self.out_features, self.in_features)

    def set(self, weight: "Tensor | PackedWeight") -> list[Tensor]:
        """Install an [out, in] float matrix (re-laid as panels) or a PackedWeight; returns the tensors to realize."""
        if isinstance(weight, PackedWeight):
            self.weight = weight
            return weight.tensors()
        self.weight = weight.reshape(self.out_features // self.panel, self.panel, self.in_features).permute(0, 2, 1).contiguous()
        return [self.weight]

    def __call__(self, x: Tensor) -> Tensor:
        if isinstance(self.weight, PackedWeight) and tinygrad_hooks.hand_kernels(x.device if isinstance(x.device, str) else ""):
            # a kernel of its own, so that it is exactly the announced one and compiles from hand-written C
            # (tinygrad_hooks section 7): the input made contiguous (a norm is not fused in), the output too
            x = x.contiguous()
            tinygrad_hooks.expect_packed_product(x, self.weight, panel_product)
            y = panel_product(x, self.weight).contiguous()
        else:
            y = panel_product(x, self.weight)
        return y if self.bias is None else y + self.bias


def panel_product(x: Tensor, weight: "Tensor | PackedWeight") -> Tensor:
    """x [..., in] @ the matrix held as panels [out / P, in, P] (float, or packed and dequantized inside the product)."""
    panels = weight if isinstance(weight, Tensor) else weight.dequantize()
    n_panels, _, width = panels.shape
    return (x.unsqueeze(-2).unsqueeze(-1) * panels).sum(-2).reshape(*x.shape[:-1], n_panels * width)


class Attention:
    def __init__(self, config: ModelConfig):
        c = config
        self.config = c
        self.q_proj = Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def __call__(self, x: Tensor, cache_kv: Tensor, start_pos: Pos, cos: Tensor, sin: Tensor, mask: Tensor,
                 key_mask: Tensor | None = None) -> Tensor:
        c, (B, T, _) = self.config, x.shape
        q = self.q_proj(x).reshape(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        # contiguous: left lazy, the rotation of q is recomputed inside the scores kernel for every cached key, and
        # k and v fuse into one product kernel that gets no good kernel choices
        q, k, v = apply_rope(q, cos, sin).contiguous(), apply_rope(k, cos, sin).contiguous(), v.contiguous()

        cache_kv[:, :, :, start_pos:start_pos + T].assign(Tensor.stack(k, v).cast(cache_kv.dtype)).realize()
        keys = cache_kv[0, :, :, 0:start_pos + T]
        values = cache_kv[1, :, :, 0:start_pos + T]

        if key_mask is None and (hand := decode_attention(q, cache_kv, start_pos, mask, c.n_heads // c.n_kv_heads)) is not None:
            return self.o_proj(hand)  # the CPU's hand-written kernel (attention_kernel.py)
        # grouped-query attention without materialising repeated K/V: (B, kv, group, T, S). Written as broadcast
        # products rather than matmuls: a matmul's reshapes merge the symbolic length S into other axes, and every
        # load then pays a division by start_pos + T
        group = c.n_heads // c.n_kv_heads
        q = q.reshape(B, c.n_kv_heads, group, T, 1, c.head_dim)
        scores = (q * keys.reshape(B, c.n_kv_heads, 1, 1, -1, c.head_dim)).sum(-1) * (1.0 / c.head_dim ** 0.5)
        # the cached prefix is fully visible; the new tokens see each other only where the tree mask allows
        scores = scores + mask.pad(((0, 0), (start_pos, 0)))
        if key_mask is not None:  # per-sequence hidden slots, e.g. the left padding of a batch of prompts
            scores = scores + key_mask[:, 0:start_pos + T].reshape(B, 1, 1, 1, -1)
        attn = (scores.softmax(-1).unsqueeze(-1) * values.reshape(B, c.n_kv_heads, 1, 1, -1, c.head_dim)).sum(-2)
        return self.o_proj(attn.reshape(B, c.n_heads, T, c.head_dim).transpose(1, 2).reshape(B, T, -1))


class FeedForward:
    def __init__(self, config: ModelConfig):
        self.gate_proj = Linear(config.dim, config.hidden_dim)
        self.up_proj = Linear(config.dim, config.hidden_dim)
        self.down_proj = Linear(config.hidden_dim, config.dim)

    def __call__(self, x: Tensor) -> Tensor:
        # contiguous: without it tinygrad fuses both products into one kernel (two reductions, no good kernel
        # choices) and recomputes the gated product inside the down projection's kernel
        gate, up = self.gate_proj(x).contiguous(), self.up_proj(x).contiguous()
        return self.down_proj((gate.silu() * up).contiguous())


class Block:
    def __init__(self, config: ModelConfig):
        self.config = config
        self.input_layernorm = nn.RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.mlp = FeedForward(config)

    def __call__(self, x: Tensor, cache_kv: Tensor, start_pos: Pos, cos: Tensor, sin: Tensor, mask: Tensor,
                 key_mask: Tensor | None = None) -> Tensor:
        h = (x + self.self_attn(self.input_layernorm(x), cache_kv, start_pos, cos, sin, mask, key_mask)).contiguous()
        return (h + self.mlp(self.post_attention_layernorm(h))).contiguous()


class Transformer:
    """Layers shard.start_layer..shard.end_layer of a Llama/Qwen2 model.

    The first shard takes token ids (B, T); the others take hidden states (B, T, dim). The last shard returns
    (normed hidden, logits); the others return hidden states for the next shard.
    """

    def __init__(self, config: ModelConfig, shard: Shard, max_context: int | None = None, cache_slack: int = 128):
        if shard.n_layers != config.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model config has {config.n_layers} layers")
        self.config, self.shard = config, shard
        self.max_context = min(max_context or config.max_context, config.max_context)
        # slack past max_context: a padded prefill chunk or a tree at the context end may write there, never read it
        self.cache_len = self.max_context + cache_slack
        self.layers = {i: Block(config) for i in range(shard.start_layer, shard.end_layer + 1)}
        if shard.is_first_layer():
            self.embed_tokens = Tensor.zeros(config.vocab_size, config.dim)
        if shard.is_last_layer():
            self.norm = nn.RMSNorm(config.dim, config.norm_eps)
            self.lm_head = Tensor.zeros(config.vocab_size, config.dim)  # tied models point this at embed_tokens
            self.output = Linear(config.dim, config.vocab_size)           # the logits product: lm_head as [dim, vocab]
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None

    # -- weights ---------------------------------------------------------------------------------------------
    def linears(self) -> dict[str, Linear]:
        """The Linear layers by the Hugging Face name of their weight (lm_head.weight for the logits product)."""
        out = {}
        for i, block in self.layers.items():
            for part, module in (("self_attn", block.self_attn), ("mlp", block.mlp)):
                for proj, linear in vars(module).items():
                    if isinstance(linear, Linear):
                        out[f"model.layers.{i}.{part}.{proj}.weight"] = linear
        if self.shard.is_last_layer():
            out["lm_head.weight"] = self.output
        return out

    def parameters(self) -> dict[str, Tensor]:
        """Tensors by their Hugging Face name and in its [out, in] layout, only those this shard holds (linear weights
        are transposed views of the [in, out] matrices the products use)."""
        params: dict[str, Tensor] = {}
        if self.shard.is_first_layer():
            params["model.embed_tokens.weight"] = self.embed_tokens
        linears = self.linears()
        for i, block in self.layers.items():
            for name, t in nn.state.get_state_dict(block).items():
                name = f"model.layers.{i}.{name}"
                if not any(name.startswith(w) for w in linears):  # linear weights: below, in the checkpoint layout
                    params[name] = t
        for name, linear in linears.items():
            if name != "lm_head.weight":
                params[name] = linear.matrix()
        if self.shard.is_last_layer():
            params["model.norm.weight"] = self.norm.weight
            params["lm_head.weight"] = self.lm_head
        return params

    def set_parameters(self, weights: dict[str, "Tensor | PackedWeight"], logits_weight: PackedWeight | None = None) -> None:
        """Install weights given by Hugging Face name in the [out, in] layout; PackedWeight values (already [in, out])
        stay packed. The logits product reads `logits_weight` when given, else a transposed copy of lm_head (which
        stays the [vocab, dim] float tensor: the heads and tied embeddings use it). Realizes what it creates."""
        linears, made = self.linears(), []
        for name in self.parameters():
            value = weights[name]
            if name == "lm_head.weight":
                self.lm_head = value
                value = logits_weight or value
            if name in linears:
                made.extend(linears[name].set(value))
            elif name != "lm_head.weight":
                self._set(name, value)
        Tensor.realize(*made)

    def _set(self, name: str, value: Tensor) -> None:
        parts = name.split(".")
        if parts[1] == "embed_tokens":
            self.embed_tokens = value
            return
        if parts[1] == "norm":
            self.norm.weight = value
            return
        obj = self.layers[int(parts[2])]
        for p in parts[3:-1]:
            obj = getattr(obj, p)
        setattr(obj, parts[-1], value)

    @property
    def float_weight(self) -> Tensor:
        """A float weight of this shard, whose dtype and device are the shard's. Cheap, unlike parameters(), which
        builds a view of every packed weight (~0.25 s of graph building for SmolLM2: too slow for every ring pass)."""
        return next(iter(self.layers.values())).input_layernorm.weight

    @property
    def packed_logits(self) -> PackedWeight | None:
        """The logits product's weight when it is packed (a GGUF's codes), else None. Heads that share the lm_head
        read their proposal rows from it: ~3x fewer bytes a step than the float rows."""
        weight = self.output.weight if self.shard.is_last_layer() else None
        return weight if isinstance(weight, PackedWeight) else None

    def new_cache(self, batch_size: int = 1) -> "KVCache":
        """Zeroed K/V buffers for this shard's layers: one per request (Exo keeps one per request id)."""
        c, w = self.config, self.float_weight
        layers = [Tensor.zeros(2, batch_size, c.n_kv_heads, self.cache_len, c.head_dim, dtype=w.dtype, device=w.device)
                  .contiguous().realize() for _ in self.layers]
        return KVCache(layers, self.max_context)

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        if self.rope_cos is None:
            w = self.float_weight
            angles = np.arange(self.cache_len, dtype=np.float32)[:, None] * rope_inv_freq(self.config)[None, :]
            self.rope_cos = Tensor(np.cos(angles), device=w.device).cast(w.dtype).realize()
            self.rope_sin = Tensor(np.sin(angles), device=w.device).cast(w.dtype).realize()
        return self.rope_cos, self.rope_sin

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: "KVCache | list[Tensor]", start_pos: Pos, depths: Tensor, mask: Tensor,
                key_mask: Tensor | None = None):
        """x: token ids (B, T) on the first shard, else hidden (B, T, dim). depths: (T,) int32, values < T.
        mask: (T, T) additive (0 or -inf) visibility among the new tokens. key_mask: optional (B, cache_len)
        additive mask over cache slots per sequence (finite values, so no query row is left seeing nothing).
        Returns hidden (B, T, dim), or (normed hidden, logits) on the last shard."""
        T = x.shape[1]
        rope_cos, rope_sin = self._rope_tables()
        # rope rows for positions start_pos + depths: a fixed-size window at the symbolic start, gathered by depth
        cos = rope_cos[start_pos:start_pos + T][depths]
        sin = rope_sin[start_pos:start_pos + T][depths]
        h = self.embed_tokens[x] if self.shard.is_first_layer() else x
        layers = cache.layers if isinstance(cache, KVCache) else cache
        for block, cache_kv in zip(self.layers.values(), layers):
            h = block(h, cache_kv, start_pos, cos, sin, mask, key_mask)
        if not self.shard.is_last_layer():
            return h
        hidden = self.norm(h).contiguous()
        return hidden, self.logits(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.output(hidden)


class KVCache:
    """Per-layer K/V buffers (2, B, n_kv_heads, cache_len, head_dim) of one shard for one request."""

    def __init__(self, layers: list[Tensor], max_context: int):
        self.layers, self.max_context = layers, max_context

    def compact(self, start_pos: Pos, keep: Tensor) -> None:
        """Keep entries start_pos + keep[i] (accepted tree nodes) and move them to slots start_pos + i.

        keep has a fixed length (the tree size) so one capture serves every step; entries past the accepted path
        are arbitrary: those slots are overwritten before they are ever read."""
        compact_layers(self.layers, start_pos, keep)


def compact_layers(layers: list[Tensor], start_pos: Pos, keep: Tensor) -> None:
    n = keep.shape[0]
    for cache in layers:
        window = cache[:, :, :, start_pos:start_pos + n].contiguous()
        cache[:, :, :, start_pos:start_pos + n].assign(window[:, :, :, keep]).realize()


def causal_mask(T: int) -> np.ndarray:
    return np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
