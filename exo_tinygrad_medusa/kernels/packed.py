"""Weights kept as their GGUF codes, dequantized inside the product that reads them.

A Q4_0 block holds 32 weights as 4-bit codes q with a float16 scale d (w = d * (q - 8)); Q4_1 adds a float16 minimum
m (w = q * d + m); Q8_0 holds 32 int8 codes with a scale (w = d * q). Here the codes sit in the panels every product
reads ([out / P, in, P], see model.Linear): 4-bit codes two to a byte (rows r and r + 1 of a panel in the low and high
nibble), 8-bit codes one to a byte; scales and minimums stay the GGUF's float16 bits [out / P, in / 32, P], widened
inside the product. Bytes a weight: Q4_0 0.5625, Q4_1 0.625, Q8_0 1.0625 (float32: 4). The product computes exactly
the float32 value the dequantizing loader (tinygrad.llm.gguf) produces, right before the multiply-add that uses it:
q * d is exact in float32 (at most 8 + 11 significant bits), so q * d + m and q * d + (-offset * d) round once, as
the loader's q * d + m and d * (q - offset) do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes

BLOCK = 32
Q4_0, Q4_1, Q8_0 = 2, 3, 8
GGML_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}


@dataclass
class PackedWeight:
    """An [out, in] matrix as panels of codes in 32-bit words: words [out/P, in * bits / 8, P/4] (uint32), scales and
    minimums [out/P, in/32, P] (uint16: float16 bits). A word row is one byte per output: output j = 4 * lane + w in
    byte `lane` of word w; with 4-bit codes that byte holds rows 2i (low nibble) and 2i + 1 (high nibble) of word row
    i. Words rather than bytes because tinygrad loads 32-bit elements as vectors and bytes one at a time; with this
    order the lane-th byte of the 4 words is 4 consecutive outputs, one vector of the accumulators."""
    words: Tensor
    scale: Tensor
    minimum: Tensor | None = None   # Q4_0 and Q8_0 have none
    offset: int = 0                 # codes are stored + offset, unsigned: Q8_0 128, Q4_0 8
    bits: int = 8                   # 4: two codes to a byte

    @property
    def shape(self) -> tuple[int, int]:
        """The [out, in] shape of the matrix."""
        panels, rows, words = self.words.shape
        return panels * words * 4, rows * 8 // self.bits

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: every code, scale and minimum once."""
        return sum(t.nbytes() for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.words, self.scale, self.minimum) if t is not None]

    def to(self, device: str | None) -> "PackedWeight":
        moved = (None if t is None else t.to(device).contiguous() for t in (self.words, self.scale, self.minimum))
        return PackedWeight(*moved, offset=self.offset, bits=self.bits)

    def rows(self, ids: np.ndarray) -> "PackedWeight":
        """The matrix's rows `ids` (output features), still packed: the same codes and scales re-laid as panels."""
        ids = np.asarray(ids)
        if len(ids) % 4:
            raise ValueError(f"packed panels need a multiple of 4 output rows, got {len(ids)}")
        codes = _codes(self.words.numpy(), self.bits)      # [out, in]
        pick = lambda t: None if t is None else _panels(_unpanel(t.numpy())[ids])
        return PackedWeight(_words(codes[ids], self.bits), pick(self.scale), pick(self.minimum), self.offset,
                            self.bits).to(self.words.device)

    def dequantize(self) -> Tensor:
        """The float32 panels, lazily: used inside a product it fuses into the product's kernel. Plain integer ops on
        the packed tensors (shifts, masks, an int-to-float conversion, a uint32-to-float32 bitcast), which every
        tinygrad device lowers: no float16 arithmetic."""
        panels, word_rows, words = self.words.shape
        width, rows = 4 * words, self.shape[1]
        lanes = lambda shift: Tensor.stack(*[(self.words >> (8 * lane + shift)) & (0xFF >> (8 - self.bits))
                                             for lane in range(4)], dim=-2).reshape(panels, word_rows, width)
        q = lanes(0) if self.bits == 8 else Tensor.stack(lanes(0), lanes(4), dim=2).reshape(panels, rows, width)
        q = q.cast(dtypes.float32)
        per_row = lambda t: widen_half(t).reshape(panels, rows // BLOCK, 1, width) \
            .expand(panels, rows // BLOCK, BLOCK, width).reshape(panels, rows, width)
        d = per_row(self.scale)
        # as the loader: q * d + m, or d * (q - offset) = q * d + (-offset * d) (q * d exact: one rounding either way)
        return q * d + (per_row(self.minimum) if self.minimum is not None else d * -self.offset)


def widen_half(bits: Tensor) -> Tensor:
    """float16 bits (uint16) -> float32, exactly, by integer ops: (mantissa with its implicit bit) * 2^(exponent - 25),
    the power of two built as float32 bits. No float16 type (CL needs an extension for it; clang's __fp16 does not
    vectorise) and no subnormal float32 on the way (devices that flush them would lose float16 subnormals). Infinite
    and NaN scales (never in a valid file) read as finite."""
    b = bits.cast(dtypes.uint32)
    e = (b >> 10) & 31
    mantissa = (b & 1023) + (e != 0).where(1024, 0).cast(dtypes.uint32)
    power = ((e.maximum(1) + 102) << 23).bitcast(dtypes.float32)
    magnitude = mantissa.cast(dtypes.float32) * power
    return (magnitude.bitcast(dtypes.uint32) | ((b & 0x8000) << 16)).bitcast(dtypes.float32)


def pack_ggml(raw: np.ndarray, ggml_type: int, shape: tuple[int, int], row_order: np.ndarray | None = None) -> PackedWeight:
    """GGUF blocks of an [out, in] matrix (uint8 bytes) -> PackedWeight in panels. row_order permutes the output rows
    (llama's q/k rows, which the converter interleaved)."""
    out_f, in_f = shape
    if ggml_type not in GGML_BLOCK_BYTES:
        raise ValueError(f"GGML type {ggml_type} has no packed form (Q4_0, Q4_1 and Q8_0 do)")
    if in_f % BLOCK:
        raise ValueError(f"a packed matrix needs rows of whole {BLOCK}-weight blocks, got {shape}")
    blocks = raw[:out_f * in_f // BLOCK * GGML_BLOCK_BYTES[ggml_type]].reshape(out_f, in_f // BLOCK, GGML_BLOCK_BYTES[ggml_type])
    if row_order is not None:
        blocks = blocks[row_order]
    half = lambda b: _panels(np.ascontiguousarray(b).view(np.uint16)[..., 0])   # float16 bits, (out, in/32) in panels
    if ggml_type == Q8_0:
        codes = (blocks[..., 2:].view(np.int8).reshape(out_f, in_f).astype(np.int16) + 128).astype(np.uint8)
        return PackedWeight(_words(codes, 8), half(blocks[..., 0:2]), offset=128, bits=8)
    qs = blocks[..., 4:] if ggml_type == Q4_1 else blocks[..., 2:]
    # byte j of a block holds weight j in its low nibble and weight j + 16 in its high nibble
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(out_f, in_f).astype(np.uint8)
    if ggml_type == Q4_1:
        return PackedWeight(_words(codes, 4), half(blocks[..., 0:2]), half(blocks[..., 2:4]), bits=4)
    return PackedWeight(_words(codes, 4), half(blocks[..., 0:2]), offset=8, bits=4)


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


def _words(codes: np.ndarray, bits: int) -> Tensor:
    """codes [out, in] (uint8, each < 2^bits) -> uint32 words [out/P, in * bits / 8, P/4]: output j = 4 * lane + w in
    byte `lane` of word w; 4-bit codes of rows 2i and 2i + 1 in the low and high nibble of word row i."""
    panels = _panel_array(codes)
    if bits == 4:
        panels = panels[:, 0::2] | (panels[:, 1::2] << 4)
    n_panels, rows, width = panels.shape
    if width % 4:
        raise ValueError(f"packed panels need a multiple of 4 output columns, got {codes.shape[0]} rows")
    lanes = panels.reshape(n_panels, rows, 4, width // 4).astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))[:, None]
    return Tensor(np.bitwise_or.reduce(lanes, axis=2))


def _codes(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [out/P, in * bits / 8, P/4] -> codes [out, in] (the inverse of _words)."""
    panels, rows, quarter = words.shape
    lanes = (words[:, :, None, :] >> (8 * np.arange(4, dtype=np.uint32))[None, None, :, None]) & 0xFF
    per_byte = lanes.reshape(panels, rows, 4 * quarter).astype(np.uint8)
    if bits == 4:
        per_byte = np.stack([per_byte & 15, per_byte >> 4], axis=2).reshape(panels, 2 * rows, 4 * quarter)
    return _unpanel(per_byte)
