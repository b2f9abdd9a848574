"""Build a Transformer shard and its tokenizer from whatever `registry.resolve` found."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tinygrad import Device

from .config import ModelConfig
from .model import Transformer
from .registry import ResolvedModel, resolve
from .shard import Shard
from .tokenizer import Tokenizer
from .weights import DTYPES, gguf_tensors, load_into, safetensors_tensors

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    resolved: ResolvedModel
    device: str
    dtype: str

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def default_dtype(device: str) -> str:
    # CPUs have no native half arithmetic: float16 was 2.5x slower than float32 there
    return "float32" if device.split(":")[0] in ("CPU", "CLANG", "LLVM", "PYTHON") else "float16"


def load_model(model: str | None = None, shard: Shard | None = None, *, dtype: str | None = None, device: str | None = None,
               max_context: int | None = 2048) -> LoadedModel:
    device = Device.canonicalize(device) if device else Device.DEFAULT
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and default_dtype(device) == "float32":
        raise ValueError(f"--dtype bfloat16 is not supported on {device} (its compiler has no bfloat16 arithmetic): "
                         "use float32")
    resolved = resolve(model)
    if resolved.kind == "gguf":
        from tinygrad.llm.gguf import gguf_load
        kv, raw = gguf_load(str(resolved.path))
        config = ModelConfig.from_gguf(kv, set(raw))
        tokenizer = Tokenizer.from_gguf_metadata(kv)
        shard = shard or Shard.whole(resolved.model_id, config.n_layers)
        transformer = Transformer(config, _check_shard(shard, config), max_context)
        tensors = gguf_tensors(kv, raw, config)
    else:
        config = ModelConfig.from_hf(json.loads((resolved.path / "config.json").read_text()))
        tokenizer = _hf_tokenizer(resolved.path)
        shard = shard or Shard.whole(resolved.model_id, config.n_layers)
        transformer = Transformer(config, _check_shard(shard, config), max_context)
        wanted = set(transformer.parameters()) | {"model.embed_tokens.weight"}
        tensors = safetensors_tensors(resolved.path, wanted)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    load_into(transformer, tensors, dtype, device)
    log.info("loaded %s layers %d..%d of %d (%s, %s)", resolved.model_id, shard.start_layer, shard.end_layer,
             shard.n_layers, dtype, device)
    return LoadedModel(transformer, tokenizer, resolved, device, dtype)


def _check_shard(shard: Shard, config: ModelConfig) -> Shard:
    shard = Shard.of(shard)
    if shard.n_layers != config.n_layers:
        raise ValueError(f"shard says the model has {shard.n_layers} layers, its config says {config.n_layers}")
    return shard


def _hf_tokenizer(path: Path) -> Tokenizer:
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    return Tokenizer.from_dir(path)
