"""Requantize a GGUF's matrices into other GGML formats (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K), for benchmarks and tests: the
files people download in those formats, made from the one GGUF this package embeds.

The quantizers are plain round-to-nearest with per-block scales from the block's range (not llama.cpp's search for
the best scales), so a requantized model is a valid file of the format, close to but not the same as one llama.cpp
would make. The writer keeps the source file's metadata bytes as they are and rewrites the tensor infos and data."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .gguf_file import read_metadata
from .gguf_writer import GGUFTensor, write_gguf_head

from ..kernels.packed import GGML_BLOCKS, Q4_0, Q4_1, Q4_K, Q6_K, Q8_0


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _safe(d: np.ndarray) -> np.ndarray:
    """d as float32 with zeros replaced by 1 (a block of zeros quantizes to any code times a zero scale)."""
    d = d.astype(np.float32)
    return np.where(d == 0, 1, d)


def quantize(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """An [out, in] float matrix as `ggml_type` blocks (uint8 bytes, row after row)."""
    out, n = w.shape
    per, _ = GGML_BLOCKS[ggml_type]
    b = w.astype(np.float32).reshape(out, n // per, per)
    if ggml_type == Q8_0:
        d = _f16(np.abs(b).max(-1, keepdims=True) / 127)
        q = np.clip(np.round(b / _safe(d)), -127, 127).astype(np.int8)
        return np.concatenate([d.view(np.uint8), q.view(np.uint8)], -1).reshape(-1)
    if ggml_type == Q4_0:
        d = _f16(np.abs(b).max(-1, keepdims=True) / 7)
        q = np.clip(np.round(b / _safe(d)) + 8, 0, 15).astype(np.uint8)
        return np.concatenate([d.view(np.uint8), q[..., :16] | (q[..., 16:] << 4)], -1).reshape(-1)
    if ggml_type == Q4_1:
        m = _f16(b.min(-1, keepdims=True))                              # w = d * q + m
        d = _f16((b.max(-1, keepdims=True) - m.astype(np.float32)) / 15)
        q = np.clip(np.round((b - m.astype(np.float32)) / _safe(d)), 0, 15).astype(np.uint8)
        return np.concatenate([d.view(np.uint8), m.view(np.uint8), q[..., :16] | (q[..., 16:] << 4)], -1).reshape(-1)
    if ggml_type == Q4_K:
        sub = b.reshape(out, n // 256, 8, 32)
        low = np.minimum(sub.min(-1), 0)                               # w = D * q - M with M = -low >= 0
        scale = (sub.max(-1) - low) / 15
        d, dmin = _f16(scale.max(-1, keepdims=True) / 63), _f16(-low.min(-1, keepdims=True) / 63)
        sc = np.clip(np.round(scale / _safe(d)), 1, 63).astype(np.uint8)
        mn = np.clip(np.round(-low / _safe(dmin)), 0, 63).astype(np.uint8)
        D = d.astype(np.float32) * sc
        M = dmin.astype(np.float32) * mn
        q = np.clip(np.round((sub + M[..., None]) / _safe(D)[..., None]), 0, 15).astype(np.uint8)
        scales = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                                 (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], -1)
        qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(out, n // 256, 128)   # sub-blocks 2g, 2g + 1 in group g
        return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], -1).reshape(-1)
    if ggml_type == Q6_K:
        sub = b.reshape(out, n // 256, 16, 16)
        scale = np.abs(sub).max(-1) / 31
        d = _f16(scale.max(-1, keepdims=True) / 127)
        sc = np.clip(np.round(scale / _safe(d)), 1, 127).astype(np.int8)
        D = d.astype(np.float32) * sc
        q = np.clip(np.round(sub / D[..., None]) + 32, 0, 63).astype(np.uint8).reshape(out, n // 256, 2, 128)
        ql = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)                            # [.., 2, 64]
        qh = sum(((q[..., 32 * k:32 * k + 32] >> 4) << (2 * k)) for k in range(4)).astype(np.uint8)   # [.., 2, 32]
        return np.concatenate([ql.reshape(out, n // 256, 128), qh.reshape(out, n // 256, 64), sc.view(np.uint8),
                               d.view(np.uint8)], -1).reshape(-1)
    raise ValueError(f"no quantizer for GGML type {ggml_type}")


def requantize_gguf(source: str | Path, target: str | Path, plan) -> None:
    """Write `target`: `source` with each 2-D tensor whose row length fits the new format's blocks requantized to
    plan(name) (a GGML type, or None to keep it as it is); every other tensor and all metadata unchanged."""
    from tinygrad.llm.gguf import gguf_load
    from .gguf_file import tensor_bytes
    data = Path(source).read_bytes()
    _, state = gguf_load(str(source))
    raw = tensor_bytes(source)
    pos, alignment = _tensor_infos_start(data)
    n_tensors = struct.unpack_from("<Q", data, 8)[0]
    tensors = []
    for _ in range(n_tensors):
        (length,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8:pos + 8 + length].decode()
        pos += 8 + length
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        pos += 4 + 8 * n_dims
        ggml_type, _ = struct.unpack_from("<IQ", data, pos)
        pos += 12
        shape = tuple(reversed(dims))
        new_type = plan(name) if n_dims == 2 else None
        if new_type is not None and new_type != ggml_type and dims[0] % GGML_BLOCKS[new_type][0] == 0:
            tensors.append(GGUFTensor(name, shape, new_type, quantize(state[name].numpy().reshape(shape), new_type)))
        else:
            tensor = GGUFTensor(name, shape, ggml_type, b"")
            tensor.data = raw[name][1][:tensor.nbytes]
            tensors.append(tensor)
    write_gguf_head(target, data[:_tensor_infos_start(data)[0]], tensors, alignment)


def _tensor_infos_start(data: bytes) -> tuple[int, int]:
    """(byte position of the first tensor info, the file's data alignment) of GGUF v2/v3 bytes."""
    reader, _, alignment = read_metadata(memoryview(data))
    return reader.pos, alignment


def q4_k_m(name: str) -> int:
    """Roughly llama.cpp's Q4_K_M mix: Q6_K for the output and value / down projections, Q4_K elsewhere."""
    return Q6_K if any(k in name for k in ("output.weight", "attn_v", "ffn_down", "token_embd")) else Q4_K


def more_bits(layer: int, n_layers: int) -> bool:
    """The layers whose value and down projections llama.cpp's Q4_K_M / Q5_K_M mixes give 6 bits: the first and last
    eighth of the model, where quantization error hurts most, and every third layer between (half of 16 or 28)."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_layers(n_layers: int, tied: bool):
    """llama.cpp's Q4_K_M mix for a model of n_layers, as a plan for requantize_gguf: Q6_K for the logits' matrix
    (output.weight, or token_embd.weight when the embedding is `tied`) and for attn_v / ffn_down of the more_bits
    layers, Q4_K elsewhere (an untied token_embd too: only one row of it is read a token)."""
    def plan(name: str) -> int:
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            return Q6_K
        if name.startswith("blk.") and name.endswith(("attn_v.weight", "ffn_down.weight")):
            return Q6_K if more_bits(int(name.split(".")[1]), n_layers) else Q4_K
        return Q4_K
    return plan


def main(argv=None) -> None:
    import argparse
    plans = {"Q4_0": lambda n: Q4_0, "Q4_1": lambda n: Q4_1, "Q8_0": lambda n: Q8_0, "Q4_K": lambda n: Q4_K,
             "Q6_K": lambda n: Q6_K, "Q4_K_M": q4_k_m}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--format", choices=sorted(plans), required=True)
    args = p.parse_args(argv)
    requantize_gguf(args.source, args.target, plans[args.format])


if __name__ == "__main__":
    main()
