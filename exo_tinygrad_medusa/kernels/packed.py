"""Weights kept as their GGUF codes, dequantized inside the product that reads them.

A Q4_1 block holds 32 weights as 4-bit codes q with a float16 scale d and minimum m (w = q * d + m); a Q8_0 block
holds 32 int8 codes with a scale (w = d * q). Here the codes sit one per byte in the panels every product reads
([out / P, in, P], see model.Linear), with float32 scales [out / P, in / 32, P]: 1.25 bytes a weight instead of 4, and the
product's kernel computes exactly the float32 value the dequantizing loader would have produced, with the same
operations in the same order, right before the multiply-add that uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes

BLOCK = 32
Q4_1, Q8_0 = 3, 8
GGML_BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}


@dataclass
class PackedWeight:
    """An [out, in] matrix as panels of byte codes, four to a 32-bit word: words [out/P, in, P/4] (uint32; code
    j = 4 * lane + w of a panel row sits in word w, byte `lane`), scales and minimums [out/P, in/32, P]. Words rather
    than bytes because tinygrad loads 32-bit elements as vectors and bytes one at a time; with this order the
    lane-th byte of the 4 words is 4 consecutive outputs, one vector of the accumulators."""
    words: Tensor
    scale: Tensor
    minimum: Tensor | None = None   # Q8_0 has none
    offset: int = 0                 # Q8_0 codes are stored + 128 (a byte is unsigned)

    @property
    def shape(self) -> tuple[int, int]:
        """The [out, in] shape of the matrix."""
        panels, rows, words = self.words.shape
        return panels * words * 4, rows

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.words, self.scale, self.minimum) if t is not None]

    def to(self, device: str | None) -> "PackedWeight":
        moved = (None if t is None else t.to(device).contiguous() for t in (self.words, self.scale, self.minimum))
        return PackedWeight(*moved, offset=self.offset)

    def rows(self, ids: np.ndarray) -> "PackedWeight":
        """The matrix's rows `ids` (output features), still packed: the same codes and scales re-laid as panels."""
        ids = np.asarray(ids)
        if len(ids) % 4:
            raise ValueError(f"packed panels need a multiple of 4 output rows, got {len(ids)}")
        words = self.words.numpy()
        panels, rows, quarter = words.shape
        lanes = (words[:, :, None, :] >> (8 * np.arange(4, dtype=np.uint32))[None, None, :, None]) & 0xFF
        codes = _unpanel(lanes.reshape(panels, rows, 4 * quarter).astype(np.uint8))      # [out, in]
        pick = lambda t: None if t is None else _panels(_unpanel(t.numpy())[ids])
        return PackedWeight(_words(codes[ids]), pick(self.scale), pick(self.minimum), self.offset).to(self.words.device)

    def dequantize(self) -> Tensor:
        """The float32 panels, lazily: used inside a product it fuses into the product's kernel."""
        panels, rows, words = self.words.shape
        width = 4 * words
        lanes = [(self.words >> (8 * lane)) & 0xFF for lane in range(4)]
        q = Tensor.stack(*lanes, dim=-2).reshape(panels, rows, width).cast(dtypes.float32)
        if self.offset:
            q = q - self.offset  # exact: small integers
        per_row = lambda t: t.reshape(panels, rows // BLOCK, 1, width).expand(panels, rows // BLOCK, BLOCK, width).reshape(panels, rows, width)
        if self.minimum is None:
            return per_row(self.scale) * q                  # as the loader: d * q
        return q * per_row(self.scale) + per_row(self.minimum)  # as the loader: q * d + m


def pack_ggml(raw: np.ndarray, ggml_type: int, shape: tuple[int, int], row_order: np.ndarray | None = None) -> PackedWeight:
    """GGUF blocks of an [out, in] matrix (uint8 bytes) -> PackedWeight in panels. row_order permutes the output rows
    (llama's q/k rows, which the converter interleaved)."""
    out_f, in_f = shape
    if ggml_type not in GGML_BLOCK_BYTES:
        raise ValueError(f"GGML type {ggml_type} has no packed form (Q4_1 and Q8_0 do)")
    if in_f % BLOCK:
        raise ValueError(f"a packed matrix needs rows of whole {BLOCK}-weight blocks, got {shape}")
    blocks = raw[:out_f * in_f // BLOCK * GGML_BLOCK_BYTES[ggml_type]].reshape(out_f, in_f // BLOCK, GGML_BLOCK_BYTES[ggml_type])
    if row_order is not None:
        blocks = blocks[row_order]
    half = lambda b: np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]   # (out, in/32)
    if ggml_type == Q4_1:
        d, m, qs = half(blocks[..., 0:2]), half(blocks[..., 2:4]), blocks[..., 4:]
        # byte j of a block holds weight j in its low nibble and weight j + 16 in its high nibble
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(out_f, in_f).astype(np.uint8)
        return PackedWeight(_words(codes), _panels(d), _panels(m))
    d, qs = half(blocks[..., 0:2]), blocks[..., 2:].view(np.int8)  # Q8_0
    return PackedWeight(_words((qs.reshape(out_f, in_f).astype(np.int16) + 128).astype(np.uint8)), _panels(d), offset=128)


def panel_width(out_features: int) -> int:
    """P, the output columns of one panel: 16 floats are one AVX-512 vector (two AVX2 ones)."""
    return next(p for p in (16, 8, 4, 2, 1) if out_features % p == 0)


def _panel_array(a: np.ndarray) -> np.ndarray:
    """[out, n] -> [out / P, n, P] (the layout of model.Linear)."""
    out, n = a.shape
    p = panel_width(out)
    return np.ascontiguousarray(a.reshape(out // p, p, n).transpose(0, 2, 1))


def _unpanel(panels: np.ndarray) -> np.ndarray:
    """[out / P, n, P] -> [out, n] (the inverse of _panel_array)."""
    n_panels, n, p = panels.shape
    return np.ascontiguousarray(panels.transpose(0, 2, 1).reshape(n_panels * p, n))


def _panels(a: np.ndarray) -> Tensor:
    return Tensor(_panel_array(a))


def _words(codes: np.ndarray) -> Tensor:
    """uint8 codes [out, in] -> uint32 words [out/P, in, P/4], code j = 4 * lane + w in byte `lane` of word w."""
    panels = _panel_array(codes)
    n_panels, rows, width = panels.shape
    if width % 4:
        raise ValueError(f"packed panels need a multiple of 4 output columns, got {codes.shape[0]} rows")
    lanes = panels.reshape(n_panels, rows, 4, width // 4).astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))[:, None]
    return Tensor(np.bitwise_or.reduce(lanes, axis=2))
