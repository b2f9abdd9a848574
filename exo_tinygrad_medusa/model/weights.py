"""Load checkpoint tensors into a Transformer shard: HF safetensors (single or sharded) and GGUF."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import safe_load

from .config import ModelConfig
from .transformer import Transformer
from ..kernels.packed import GGML_BLOCKS, PackedWeight, ggml_nbytes, pack_ggml, pack_half

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


def rope_row_order(rows: int, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of q/k rows per head; this row order undoes it for
    half-split RoPE."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def _rope_heads(config: ModelConfig, hf_name: str) -> int | None:
    if config.architecture == "llama" and re.search(r"self_attn\.(q|k)_proj\.weight", hf_name):
        return config.n_heads if ".q_proj" in hf_name else config.n_kv_heads
    return None


def gguf_tensors(kv: dict, state_dict: dict[str, Tensor], config: ModelConfig, blocks: dict | None = None,
                 pack: set[str] = frozenset()) -> dict[str, "Tensor | PackedWeight"]:
    """HF-named tensors of a GGUF. Names in `pack` whose GGML type has a packed form (packed.GGML_NAMES) come back as
    PackedWeight built from `blocks` (gguf_file.load_gguf: the file's bytes); the others dequantized."""
    out: dict[str, Tensor | PackedWeight] = {}
    for name, t in state_dict.items():
        hf = _hf_name(name)
        if hf is None:
            continue  # e.g. rope_freqs.weight: llama3 scaling is recomputed from the metadata
        heads = _rope_heads(config, hf)
        order = rope_row_order(t.shape[0], heads) if heads else None
        packed = gguf_packed(name, state_dict, blocks, order) if hf in pack else None
        out[hf] = packed or (t if order is None else t[Tensor(order.astype(np.int32), device=t.device)])
    return out


def gguf_packed(name: str, state_dict: dict[str, Tensor], blocks: dict | None, row_order=None) -> PackedWeight | None:
    """The GGUF tensor `name` as a PackedWeight when its GGML type has a packed form, else None."""
    ggml_type, raw = (blocks or {}).get(name, (None, None))
    if ggml_type not in GGML_BLOCKS:
        return None
    rows, cols = state_dict[name].shape
    return pack_ggml(np.asarray(raw[:ggml_nbytes(ggml_type, rows * cols)]), ggml_type, (rows, cols), row_order)


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


HALF_KINDS = {dtypes.bfloat16: "bf16", dtypes.float16: "f16"}


def half_packed(tensors: dict[str, Tensor], model: Transformer) -> tuple[dict, PackedWeight | None]:
    """The model's matrices that a checkpoint stores as bfloat16 or float16, kept in 16 bits (packed.pack_half), and
    the lm_head's for the logits product (the tied embedding's, which lookups still read widened); other tensors as
    they are."""
    def pack(t: Tensor) -> PackedWeight:
        return pack_half(t.bitcast(dtypes.uint16).to("CPU").numpy(), HALF_KINDS[t.dtype])
    out = dict(tensors)
    for name in model.linears():
        if name != "lm_head.weight" and name in out and out[name].dtype in HALF_KINDS:
            out[name] = pack(out[name])
    head = tensors.get("lm_head.weight", tensors.get("model.embed_tokens.weight") if model.config.tie_embeddings else None)
    logits = pack(head) if model.shard.is_last_layer() and head is not None and head.dtype in HALF_KINDS else None
    return out, logits


def widen_bfloat16(t: Tensor, device: str | None) -> Tensor:
    """bfloat16 -> float32 by bits (a bfloat16 is the upper half of a float32): exact, and it compiles where clang
    has no __bf16 (x86 CPUs), because the bits become uint16 before any kernel sees them."""
    return (t.bitcast(dtypes.uint16).to(device).cast(dtypes.uint32) << 16).bitcast(dtypes.float32)


def load_into(model: Transformer, tensors: dict[str, "Tensor | PackedWeight"], dtype: str = "float32",
              device: str | None = None, logits_weight: PackedWeight | None = None) -> None:
    """Check names and shapes against the config, convert, move to the device and realize. PackedWeight values stay
    packed; `logits_weight` is a packed lm_head for the logits product."""
    target = DTYPES[dtype]
    expected = model.parameters()
    if model.config.tie_embeddings and "lm_head.weight" in expected and "lm_head.weight" not in tensors:
        if "model.embed_tokens.weight" not in tensors:
            raise ValueError("tied embeddings: the checkpoint has neither lm_head.weight nor model.embed_tokens.weight")
        tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    loaded: dict[str, Tensor | PackedWeight] = {}
    by_source: dict[int, Tensor | PackedWeight] = {}
    for name, want in expected.items():
        src = tensors[name]
        shape = tuple(src.shape)
        if shape != tuple(want.shape):
            raise ValueError(f"{name}: checkpoint shape {shape} does not match the config's {tuple(want.shape)}")
        if id(src) not in by_source:  # tied lm_head shares the embedding's buffer
            if isinstance(src, PackedWeight):
                by_source[id(src)] = src.to(device)
            else:
                widen = src.dtype == dtypes.bfloat16 and target != dtypes.bfloat16
                moved = widen_bfloat16(src, device) if widen else src.to(device)
                by_source[id(src)] = moved.cast(target).contiguous()
        loaded[name] = by_source[id(src)]
    if logits_weight is not None:
        if logits_weight.shape != tuple(expected["lm_head.weight"].shape):
            raise ValueError(f"packed lm_head {logits_weight.shape} does not match the config's [vocab, dim]")
        logits_weight = logits_weight.to(device)
    Tensor.realize(*[t for v in [*by_source.values(), *([logits_weight] if logits_weight else [])]
                     for t in (v.tensors() if isinstance(v, PackedWeight) else [v])])
    model.set_parameters(loaded, logits_weight)
    log.debug("loaded %d tensors (%s)", len(loaded), dtype)


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights a one-token decode step of this shard reads: every product's matrix once (packed: its codes,
    scales and minimums; float: its elements) and one row of the embedding. Norms and biases (a few KB) are left out.
    Plain decoding is bound by these bytes: tokens/s times this is the bandwidth it achieves."""
    total = 0
    for linear in model.linears().values():
        weight = linear.weight
        total += weight.nbytes if isinstance(weight, PackedWeight) else weight.nbytes()
    embedding = getattr(model, "embed_tokens", None)
    if model.shard.is_first_layer() and isinstance(embedding, Tensor):
        total += embedding.nbytes() // embedding.shape[0]
    return total
