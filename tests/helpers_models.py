"""Tiny random Llama / Qwen2 checkpoints written as HF directories, and an independent numpy forward."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from helpers_tokenizer import write_tiny_tokenizer

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


def write_tiny_checkpoint(directory, arch: str = "llama", seed: int = 0, tie: bool | None = None, dtype=np.float32,
                          rope_scaling: dict | None = None, **overrides) -> Path:
    """config.json + model.safetensors + tokenizer files for a random model of family `arch` (llama | qwen2)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY, **overrides, "model_type": arch,
           "tie_word_embeddings": (arch == "qwen2") if tie is None else tie}
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    rng = np.random.default_rng(seed)
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = D // H

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, D, scale=1.0), "model.norm.weight": 1 + 0.1 * w(D, scale=1.0)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + 0.1 * w(D, scale=1.0),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * w(D, scale=1.0),
                  p + "self_attn.q_proj.weight": w(H * hd, D), p + "self_attn.k_proj.weight": w(KV * hd, D),
                  p + "self_attn.v_proj.weight": w(KV * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
                  p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D), p + "mlp.down_proj.weight": w(D, F)})
        if arch == "qwen2":
            t.update({p + "self_attn.q_proj.bias": w(H * hd, scale=0.1), p + "self_attn.k_proj.bias": w(KV * hd, scale=0.1),
                      p + "self_attn.v_proj.bias": w(KV * hd, scale=0.1)})
    save_file({k: v.astype(dtype) for k, v in t.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    write_tiny_tokenizer(d, V)
    return d


def load_numpy_weights(directory) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file
    d = Path(directory)
    return json.loads((d / "config.json").read_text()), {k: v.astype(np.float32) for k, v in load_file(str(d / "model.safetensors")).items()}


def reference_logits(directory, ids: list[int]) -> np.ndarray:
    """Causal forward over `ids` in float64 numpy, written from the HF equations (independent of the package)."""
    cfg, t = load_numpy_weights(directory)
    D, H, KV, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hd, eps, n = D // H, cfg["rms_norm_eps"], len(ids)

    def norm(x, wt):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * wt

    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # (heads, n, hd)
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rot * sin

    x = t["model.embed_tokens.weight"][ids].astype(np.float64)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(L):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q, k, v = (h @ t[p + f"self_attn.{m}_proj.weight"].T + t.get(p + f"self_attn.{m}_proj.bias", 0) for m in "qkv")
        q = rope(q.reshape(n, H, hd).transpose(1, 0, 2))
        k = rope(k.reshape(n, KV, hd).transpose(1, 0, 2))
        v = v.reshape(n, KV, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(n, D)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        g = h @ t[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    x = norm(x, t["model.norm.weight"])
    return x @ t.get("lm_head.weight", t["model.embed_tokens.weight"]).T
