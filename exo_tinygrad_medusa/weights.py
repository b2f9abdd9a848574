"""Load checkpoint tensors into a Transformer shard: HF safetensors (single or sharded) and GGUF."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from tinygrad import Tensor, dtypes
from tinygrad.nn.state import safe_load

from .config import ModelConfig
from .model import Transformer

log = logging.getLogger(__name__)

DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16, "bfloat16": dtypes.bfloat16}

# GGUF tensor names -> Hugging Face names (the model's own naming)
_GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def _hf_name(gguf_name: str) -> str | None:
    for pattern, repl in _GGUF_NAMES:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, repl, gguf_name)
    return None


def _unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    # llama.cpp's converter interleaves the rotary halves of q/k rows per head; undo it for half-split RoPE
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_tensors(kv: dict, state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out = {}
    for name, t in state_dict.items():
        hf = _hf_name(name)
        if hf is None:
            continue  # e.g. rope_freqs.weight: llama3 scaling is recomputed from the metadata
        if config.architecture == "llama" and re.search(r"self_attn\.(q|k)_proj", hf):
            t = _unpermute_rope(t, config.n_heads if ".q_proj" in hf else config.n_kv_heads)
        out[hf] = t
    return out


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def safetensors_tensors(model_dir: Path, wanted: set[str]) -> dict[str, Tensor]:
    """Lazily opened tensors for the wanted names only (other shards' layers are never read)."""
    out = {}
    for f in safetensors_files(model_dir):
        if not f.exists():
            raise FileNotFoundError(f"weight file {f} listed in the index is missing")
        for name, t in safe_load(str(f)).items():
            if name in wanted:
                out[name] = t
    return out


def widen_bfloat16(t: Tensor, device: str | None) -> Tensor:
    """bfloat16 -> float32 by bits (a bfloat16 is the upper half of a float32): exact, and it compiles where clang
    has no __bf16 (x86 CPUs), because the bits become uint16 before any kernel sees them."""
    return (t.bitcast(dtypes.uint16).to(device).cast(dtypes.uint32) << 16).bitcast(dtypes.float32)


def load_into(model: Transformer, tensors: dict[str, Tensor], dtype: str = "float32", device: str | None = None) -> None:
    """Check names and shapes against the config, convert, move to the device and realize."""
    target = DTYPES[dtype]
    expected = model.parameters()
    if model.config.tie_embeddings and "lm_head.weight" in expected and "lm_head.weight" not in tensors:
        if "model.embed_tokens.weight" not in tensors:
            raise ValueError("tied embeddings: the checkpoint has neither lm_head.weight nor model.embed_tokens.weight")
        tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    loaded: dict[str, Tensor] = {}
    by_source: dict[int, Tensor] = {}
    for name, want in expected.items():
        src = tensors[name]
        if tuple(src.shape) != tuple(want.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not match the config's {tuple(want.shape)}")
        if id(src) not in by_source:  # tied lm_head shares the embedding's buffer
            widen = src.dtype == dtypes.bfloat16 and target != dtypes.bfloat16
            moved = widen_bfloat16(src, device) if widen else src.to(device)
            by_source[id(src)] = moved.cast(target).contiguous()
        loaded[name] = by_source[id(src)]
    Tensor.realize(*by_source.values())
    model.set_parameters(loaded)
    log.debug("loaded %d tensors (%s)", len(loaded), dtype)
