"""Build a Transformer shard and its tokenizer from whatever `registry.resolve` found."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tinygrad.helpers import Context

from .config import ModelConfig
from .transformer import Transformer
from .registry import ResolvedModel, resolve
from .shard import Shard
from ..kernels import products_q8
from ..kernels.tinygrad_hooks import emulates_float16, hand_kernels, install as install_hooks
from .device import choose_device
from .gguf_file import load_gguf
from .tokenizer import Tokenizer
from ..kernels.packed import PackedWeight
from .weights import DTYPES, gguf_packed, gguf_tensors, half_packed, load_into, safetensors_tensors

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    resolved: ResolvedModel
    device: str
    dtype: str
    weights: str = "float32"   # "compact" (GGUF codes dequantized inside the products) or "float32"

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def default_dtype(device: str) -> str:
    # CPUs have no native half arithmetic: float16 was 2.5x slower than float32 there. Where the device's compiler has
    # no float16 at all (pocl's OpenCL), tinygrad emulates it and its emulation breaks reductions (tinygrad_hooks
    # section 8)
    if device.split(":")[0] in ("CPU", "CLANG", "LLVM", "PYTHON") or emulates_float16(device):
        return "float32"
    return "float16"


WEIGHT_FORMATS = ("compact", "float32")


def load_model(model: str | None = None, shard: Shard | None = None, *, dtype: str | None = None, device: str | None = None,
               max_context: int | None = 2048, weights: str | None = None, activations: str = "float32") -> LoadedModel:
    """weights: "compact" keeps a GGUF's codes packed, and a safetensors checkpoint's bfloat16 / float16 matrices in 16
    bits, widening them inside the products (the same float32 values, 2-7x fewer bytes read); "float32" widens on
    load. Default: compact in float32. activations: "q8" rounds the packed products' inputs to int8 (products_q8.py)
    for this process's products from now on; "float32" (default) keeps them exact."""
    device, _ = choose_device(device)  # first: a device that cannot run is one clear error before any work
    install_hooks()
    dtype = dtype or default_dtype(device)
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and default_dtype(device) == "float32":
        raise ValueError(f"--dtype bfloat16 is not supported on {device} (its compiler has no bfloat16 arithmetic): "
                         "use float32")
    if dtype == "float16" and emulates_float16(device):
        raise ValueError(f"--dtype float16 is not supported on {device}: its compiler has no native float16, and "
                         "tinygrad 0.14's float16 emulation fails to compile reductions: use float32")
    resolved = resolve(model)
    if weights == "compact" and dtype != "float32":
        raise ValueError("--weights compact needs --dtype float32 (it widens GGUF codes and 16-bit weights to float32 "
                         f"inside the products); this is {dtype}: use --weights float32")
    asked, weights = weights, weights or ("compact" if dtype == "float32" else "float32")
    _check_activations(activations, device, weights, resolved.kind)
    logits_weight = None
    if resolved.kind == "gguf":
        with _gguf_reader_device(device):
            kv, raw, blocks = load_gguf(resolved.path)
        config = ModelConfig.from_gguf(kv, set(raw))
        tokenizer = Tokenizer.from_gguf_metadata(kv)
        shard = shard or Shard.whole(resolved.model_id, config.n_layers)
        transformer = Transformer(config, _check_shard(shard, config), max_context)
        pack = set(transformer.linears()) - {"lm_head.weight"} if weights == "compact" else set()
        tensors = gguf_tensors(kv, raw, config, blocks, pack)
        if weights == "compact" and shard.is_last_layer():
            logits_weight = gguf_packed("output.weight" if "output.weight" in raw else "token_embd.weight", raw, blocks)
    else:
        config = ModelConfig.from_hf(json.loads((resolved.path / "config.json").read_text()))
        tokenizer = _hf_tokenizer(resolved.path)
        shard = shard or Shard.whole(resolved.model_id, config.n_layers)
        transformer = Transformer(config, _check_shard(shard, config), max_context)
        wanted = set(transformer.parameters()) | {"model.embed_tokens.weight"}
        tensors = safetensors_tensors(resolved.path, wanted)
        if weights == "compact":
            tensors, logits_weight = half_packed(tensors, transformer)
            if not any(isinstance(t, PackedWeight) for t in tensors.values()):
                if asked:
                    raise ValueError(f"--weights compact: {resolved.path} stores no bfloat16 or float16 matrices to "
                                     "keep in 16 bits (its weights are float32): use --weights float32")
                weights = "float32"   # nothing to keep compact: the report says what the products read
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    load_into(transformer, tensors, dtype, device, logits_weight)
    products_q8.set_activations(activations)
    log.info("loaded %s layers %d..%d of %d (%s, %s weights, %s)", resolved.model_id, shard.start_layer, shard.end_layer,
             shard.n_layers, dtype, weights, device)
    return LoadedModel(transformer, tokenizer, resolved, device, dtype, weights)


def _check_activations(activations: str, device: str, weights: str, kind: str) -> None:
    """q8 activations exist only in the hand-written CPU products over a GGUF's packed codes, on AVX512-VNNI."""
    if activations not in products_q8.MODES:
        raise ValueError(f"unknown activations {activations!r}: choose one of {', '.join(products_q8.MODES)}")
    if activations == "float32":
        return
    if not hand_kernels(device):
        raise ValueError(f"--activations q8 needs the CPU device's hand-written products; {device} runs tinygrad's own "
                         "kernels (GPUs, OpenCL, EXO_MEDUSA_KERNELS=tuned): use --activations float32")
    if not products_q8.cpu_has_vnni():
        raise ValueError("--activations q8 needs a CPU with AVX512-VNNI and AVX512-VBMI (vpdpbusd, vpermb), which this "
                         "one lacks: use --activations float32")
    if kind != "gguf" or weights != "compact":
        raise ValueError("--activations q8 needs a GGUF model's packed codes (--weights compact); this model's products "
                         f"read {'float32' if weights != 'compact' else '16-bit float'} weights: use --activations float32")


def _gguf_reader_device(device: str):
    """Where tinygrad's GGUF reader dequantizes: on tinygrad's default device, in float16 arithmetic. On a device that
    emulates float16 (pocl's CL) tinygrad 0.14 zeroed whole Q8_0 blocks of random test data (192 of 3072 values),
    so there the CPU dequantizes and load_into copies the float32 values over; elsewhere, the model's own device."""
    if emulates_float16(device) and shutil.which(os.environ.get("CC", "clang")):
        return Context(DEV="CPU")
    return contextlib.nullcontext()


def _check_shard(shard: Shard, config: ModelConfig) -> Shard:
    shard = Shard.of(shard)
    if shard.n_layers != config.n_layers:
        raise ValueError(f"shard says the model has {shard.n_layers} layers, its config says {config.n_layers}")
    return shard


def _hf_tokenizer(path: Path) -> Tokenizer:
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    return Tokenizer.from_dir(path)
