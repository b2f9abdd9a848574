"""Random-weight GGUF files shaped like Llama-3.2-1B and Qwen2.5-1.5B, in Q4_K_M and Q4_1, for speed measurements on
models bigger than the embedded SmolLM2-135M (nothing to download: the text they generate is noise, the bytes each
token reads are a real model's).

Shapes are the real models' (layers, widths, heads, KV heads, FFN, tied embeddings, Qwen's q/k/v biases, RoPE
base), and so is the vocabulary size: the tokenizer is SmolLM2's (copied from the embedded GGUF, so llama.cpp loads
the files), its 49152 tokens padded with unused `[PADn]` tokens, as llama.cpp's converter pads Qwen's, to 128256 /
151936 rows of the embedding and the logits' matrix. Not reproduced: Llama 3's long-context RoPE scaling (it changes
no byte read). Weights are normal with std 0.02 (norms 1 + the same noise), which keeps activations finite.

Q4_K_M follows llama.cpp's mix (requantize.q4_k_m_layers); Q4_1 is Q4_1 everywhere but the logits' matrix, Q6_K as
llama.cpp makes it. The quantizers round to nearest (requantize.quantize), which changes no size or speed.

usage: python examples/big_gguf.py [--out /work/runs/big-gguf] [--models llama-3.2-1b,qwen2.5-1.5b] [--formats Q4_K_M,Q4_1]
"""
import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exo_tinygrad_medusa.kernels.packed import GGML_NAMES, Q4_1, Q6_K                    # noqa: E402
from exo_tinygrad_medusa.model.gguf_writer import F32, GGUFTensor, write_gguf            # noqa: E402
from exo_tinygrad_medusa.model.registry import DEFAULT_MODEL, cards, embedded_gguf       # noqa: E402
from exo_tinygrad_medusa.model.requantize import q4_k_m_layers, quantize                 # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(arch="llama", dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256,
                         tied=True, bias=False, rope_theta=500000.0, eps=1e-5, context=131072),
    "qwen2.5-1.5b": dict(arch="qwen2", dim=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936,
                         tied=True, bias=True, rope_theta=1000000.0, eps=1e-6, context=32768),
}
FILE_TYPES = {"Q4_K_M": 15, "Q4_1": 3}   # llama.cpp's general.file_type codes
STD = 0.02
UNUSED = 5                               # llama.cpp's token type for a token no text produces
ROWS_AT_ONCE = 8192                      # rows generated and quantized together: bounds the memory of a big matrix


def tokenizer_metadata(vocab: int) -> dict:
    """SmolLM2's tokenizer keys from the embedded GGUF, its token list padded to `vocab` entries."""
    from tinygrad.llm.gguf import gguf_load
    kv, _ = gguf_load(str(embedded_gguf(cards()[DEFAULT_MODEL])))
    meta = {k: v for k, v in kv.items() if k.startswith("tokenizer.")}
    n = len(meta["tokenizer.ggml.tokens"])
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + [f"[PAD{i}]" for i in range(n, vocab)]
    meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + [UNUSED] * (vocab - n)
    return meta


def tensor_list(s: dict, plan, seed: int) -> list[GGUFTensor]:
    """Every tensor of the model, named as llama.cpp names them; each one's data made when the writer asks for it."""
    hd = s["dim"] // s["heads"]
    shapes = {"token_embd.weight": (s["vocab"], s["dim"]), "output_norm.weight": (s["dim"],)}
    if not s["tied"]:
        shapes["output.weight"] = (s["vocab"], s["dim"])
    for i in range(s["layers"]):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (s["dim"],), b + "ffn_norm.weight": (s["dim"],),
                       b + "attn_q.weight": (s["heads"] * hd, s["dim"]), b + "attn_k.weight": (s["kv_heads"] * hd, s["dim"]),
                       b + "attn_v.weight": (s["kv_heads"] * hd, s["dim"]), b + "attn_output.weight": (s["dim"], s["heads"] * hd),
                       b + "ffn_gate.weight": (s["ffn"], s["dim"]), b + "ffn_up.weight": (s["ffn"], s["dim"]),
                       b + "ffn_down.weight": (s["dim"], s["ffn"])})
        if s["bias"]:
            shapes.update({b + f"attn_{x}.bias": (n * hd,) for x, n in (("q", s["heads"]), ("k", s["kv_heads"]),
                                                                        ("v", s["kv_heads"]))})
    tensors = []
    for index, (name, shape) in enumerate(shapes.items()):
        rng = np.random.default_rng([seed, index])
        if len(shape) == 1:
            values = STD * rng.standard_normal(shape, dtype=np.float32) + (1 if name.endswith("norm.weight") else 0)
            tensors.append(GGUFTensor(name, shape, F32, values.astype(np.float32)))
        else:
            tensors.append(GGUFTensor(name, shape, plan(name), _matrix(rng, shape, plan(name))))
    return tensors


def _matrix(rng, shape, ggml_type):
    def make() -> np.ndarray:
        rows, cols = shape
        return np.concatenate([quantize(STD * rng.standard_normal((min(ROWS_AT_ONCE, rows - r), cols), dtype=np.float32),
                                        ggml_type) for r in range(0, rows, ROWS_AT_ONCE)])
    return make


def write_model(model: str, fmt: str, out: Path, seed: int = 0) -> tuple[Path, list[int]]:
    """Write out/random-MODEL.FMT.gguf: (its path, each tensor's GGML type)."""
    s = SHAPES[model]
    plan = q4_k_m_layers(s["layers"], s["tied"]) if fmt == "Q4_K_M" else \
        (lambda name: Q6_K if name == "output.weight" or (s["tied"] and name == "token_embd.weight") else Q4_1)
    a = s["arch"]
    meta = {"general.architecture": a, "general.name": f"random-{model}", "general.file_type": FILE_TYPES[fmt],
            "general.quantization_version": 2, f"{a}.block_count": s["layers"], f"{a}.context_length": s["context"],
            f"{a}.embedding_length": s["dim"], f"{a}.feed_forward_length": s["ffn"],
            f"{a}.attention.head_count": s["heads"], f"{a}.attention.head_count_kv": s["kv_heads"],
            f"{a}.rope.freq_base": s["rope_theta"], f"{a}.attention.layer_norm_rms_epsilon": s["eps"],
            f"{a}.rope.dimension_count": s["dim"] // s["heads"], f"{a}.vocab_size": s["vocab"],
            **tokenizer_metadata(s["vocab"])}
    tensors = tensor_list(s, plan, seed)
    path = out / f"random-{model}.{fmt}.gguf"
    write_gguf(path, meta, tensors)
    return path, [t.ggml_type for t in tensors]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/work/runs/big-gguf")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--formats", default=",".join(FILE_TYPES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        for fmt in args.formats.split(","):
            start = time.perf_counter()
            path, types = write_model(model, fmt, out, args.seed)
            mix = ", ".join(f"{n} {GGML_NAMES.get(t, 'F32')}" for t, n in sorted(Counter(types).items()))
            print(f"{path}: {path.stat().st_size / 1e6:.1f} MB ({mix} tensors) in {time.perf_counter() - start:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
