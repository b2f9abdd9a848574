"""Model configuration, read from a Hugging Face `config.json` or GGUF metadata (never from a size table)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency-dependent RoPE scaling."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_context: int
    qkv_bias: bool = False
    tie_embeddings: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        arch = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}.get(model_type)
        if arch is None:
            raise ValueError(f"unsupported model_type {model_type!r} in config.json: supported are llama, qwen2")
        try:
            n_heads = cfg["num_attention_heads"]
            dim = cfg["hidden_size"]
            rope_scaling = None
            rs = cfg.get("rope_scaling") or None
            if rs is not None:
                kind = rs.get("rope_type", rs.get("type"))
                if kind != "llama3":
                    raise ValueError(f"unsupported rope_scaling type {kind!r}: only 'llama3' is implemented")
                rope_scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                                           int(rs["original_max_position_embeddings"]))
            return cls(
                architecture=arch, dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads", n_heads), head_dim=cfg.get("head_dim") or dim // n_heads,
                hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(cfg.get("rope_theta", 10000.0)), max_context=cfg.get("max_position_embeddings", 2048),
                qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_scaling=rope_scaling)
        except KeyError as e:
            raise ValueError(f"config.json is missing required key {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, kv: dict, tensor_names: set[str]) -> "ModelConfig":
        arch = kv.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
        n_heads, dim = kv[f"{arch}.attention.head_count"], kv[f"{arch}.embedding_length"]
        rope_scaling = None
        if kv.get(f"{arch}.rope.scaling.type") == "llama3" or "rope_freqs.weight" in tensor_names and arch == "llama":
            # GGUF stores llama3 scaling as precomputed factors (rope_freqs); we recompute from the keys when present.
            if f"{arch}.rope.scaling.factor" in kv:
                rope_scaling = RopeScaling(kv[f"{arch}.rope.scaling.factor"], kv.get(f"{arch}.rope.scaling.low_freq_factor", 1.0),
                                           kv.get(f"{arch}.rope.scaling.high_freq_factor", 4.0),
                                           kv.get(f"{arch}.rope.scaling.original_context_length", 8192))
        return cls(
            architecture=arch, dim=dim, n_layers=kv[f"{arch}.block_count"], n_heads=n_heads,
            n_kv_heads=kv.get(f"{arch}.attention.head_count_kv", n_heads),
            head_dim=kv.get(f"{arch}.attention.key_length", dim // n_heads), hidden_dim=kv[f"{arch}.feed_forward_length"],
            vocab_size=len(kv["tokenizer.ggml.tokens"]), norm_eps=kv[f"{arch}.attention.layer_norm_rms_epsilon"],
            rope_theta=float(kv.get(f"{arch}.rope.freq_base", 10000.0)), max_context=kv.get(f"{arch}.context_length", 2048),
            qkv_bias="blk.0.attn_q.bias" in tensor_names, tie_embeddings="output.weight" not in tensor_names,
            rope_scaling=rope_scaling)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies in float32, as transformers computes them (llama3 scaling included)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.int64).astype(np.float32) / config.head_dim))
    inv_freq = inv_freq.astype(np.float32)[:half]
    rs = config.rope_scaling
    if rs is not None:
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(mid, (1 - smooth) * scaled / rs.factor + smooth * scaled, scaled).astype(np.float32)
    return inv_freq
