"""Weights kept as their GGUF codes, dequantized inside the product that reads them.

GGML formats, a block of weights sharing a scale: Q4_0 (w = d * (q - 8)), Q4_1 (w = q * d + m), Q5_0 (5-bit,
d * (q - 16)), Q5_1 (5-bit, q * d + m) and Q8_0 (int8, d * q) in blocks of 32 with float16 d, m; the K-quants in
super-blocks of 256: Q4_K and Q5_K (w = (d * s) * q - dmin * mn, 6-bit s and mn a sub-block of 32) and Q6_K (6-bit
codes, w = d * s * (q - 32), int8 s a sub-block of 16).

Here the codes sit in the panels every product reads ([out / P, in, P], see model.Linear), in planes of packed bits:
the low 4 bits of a code two to a byte (rows 2i and 2i + 1 of a panel in the low and high nibble; 8-bit codes one to a
byte), and a Q5/Q6 code's high bits in a plane of their own (8 / h rows to a byte). Scales stay as stored: float16
bits (uint16) a block, or for the K-quants the sub-block's integer scale (uint8, int8 for Q6_K) and the super-block's
float16 d, dmin. Bytes a weight: Q4_0 0.5625, Q4_1 0.625, Q5_0 0.6875, Q5_1 0.75, Q8_0 1.0625, Q4_K 0.578,
Q6_K 0.820, Q5_K 1.078 (a byte a code, see pack_ggml; float32: 4).

Half-precision checkpoints (bfloat16 or float16 safetensors, as Hugging Face ships them) keep their 16 bits a weight
the same way (`pack_half`): the bits in panels [out / P, in, P] (uint16), widened to float32 inside the product. Both
widenings are exact, so the product is the float32 model's.

The product computes exactly the float32 value the dequantizing loader (tinygrad.llm.gguf) produces, right before the
multiply-add that uses it: the block's D = d (or d * s, exact: at most 11 + 8 significant bits) and M = m (or
-(dmin * mn), exact) are exact, so q * D is exact where code and scale bits fit float32's 24 (all formats but Q6_K)
and q * D + M rounds once, as the loader's expression does; Q6_K instead multiplies (q - 32), an exact integer, by D:
one rounding of the same exact product the loader rounds once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes

BLOCK = 32
SUPER = 256
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
# GGML type -> (weights a block, bytes a block)
GGML_BLOCKS = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34),
               Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
GGML_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
TENSORS = ("words", "scale", "minimum", "high", "super_scale", "super_minimum")


def ggml_nbytes(ggml_type: int, n: int) -> int:
    """Bytes of n weights stored as `ggml_type` blocks."""
    weights, nbytes = GGML_BLOCKS[ggml_type]
    return n // weights * nbytes


@dataclass
class PackedWeight:
    """An [out, in] matrix in panels of P outputs. Planes of codes in 32-bit words [out/P, in * b / 8, P/4] (uint32):
    a word row is one byte per output, output j = 4 * lane + w in byte `lane` of word w, and a byte holds 8 / b
    consecutive rows (row 8i/b + k in bits k*b ..). `words` holds the low `bits` (4 or 8) of each code, `high` the
    `high_bits` above them. Scales and minimums [out/P, in/block, P]: float16 bits (uint16), or for the K-quants the
    sub-block's integer scale, with the super-block's float16 d and dmin in super_scale, super_minimum
    [out/P, in/256, P]. Words rather than bytes because tinygrad loads 32-bit elements as vectors and bytes one at a
    time; with this order the lane-th byte of the 4 words is 4 consecutive outputs, one vector of the accumulators."""
    words: Tensor
    scale: Tensor | None            # None for half-precision bits
    minimum: Tensor | None = None   # Q4_1, Q5_1 (float16); Q4_K, Q5_K (the sub-block's mn: w = ... - dmin * mn)
    offset: int = 0                 # codes are stored + offset, unsigned: Q8_0 128, Q4_0 8, Q5_0 16, Q6_K 32
    bits: int = 8                   # bits of a code in `words`: 4 (two to a byte) or 8
    high: Tensor | None = None      # Q5: the 5th bit of each code; Q6_K: bits 5 and 6
    high_bits: int = 0
    super_scale: Tensor | None = None
    super_minimum: Tensor | None = None
    block: int = BLOCK              # rows sharing a scale (Q6_K: 16; half-precision bits: 2, the rows of one step)
    half: str = ""                  # "bf16" or "f16": `words` holds a 16-bit float per weight, no scales

    @property
    def shape(self) -> tuple[int, int]:
        """The [out, in] shape of the matrix."""
        panels, rows, words = self.words.shape
        if self.half:
            return panels * words, rows
        return panels * words * 4, rows * 8 // self.bits

    @property
    def width(self) -> int:
        """P, the outputs of one panel."""
        return self.words.shape[2] * (1 if self.half else 4)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: every code, scale and minimum once."""
        return sum(t.nbytes() for t in self.tensors())

    def named(self) -> dict[str, Tensor]:
        return {name: t for name in TENSORS if (t := getattr(self, name)) is not None}

    def tensors(self) -> list[Tensor]:
        return list(self.named().values())

    def map(self, fn) -> "PackedWeight":
        """The same layout with fn applied to each tensor."""
        return dataclasses.replace(self, **{name: fn(t) for name, t in self.named().items()})

    def to(self, device: str | None) -> "PackedWeight":
        return self.map(lambda t: t.to(device).contiguous())

    def rows(self, ids: np.ndarray) -> "PackedWeight":
        """The matrix's rows `ids` (output features), still packed: the same codes and scales re-laid as panels."""
        ids = np.asarray(ids)
        if self.half:
            return pack_half(_unpanel(self.words.numpy())[ids], self.half).to(self.words.device)
        if len(ids) % 4:
            raise ValueError(f"packed panels need a multiple of 4 output rows, got {len(ids)}")
        bits = {"words": self.bits, "high": self.high_bits}
        pick = lambda name, t: _words(_codes(t.numpy(), bits[name])[ids], bits[name]) if name in bits else \
            _panels(_unpanel(t.numpy())[ids])
        return dataclasses.replace(self, **{name: pick(name, t) for name, t in self.named().items()}).to(self.words.device)

    def dequantize(self) -> Tensor:
        """The float32 panels, lazily: used inside a product it fuses into the product's kernel. Plain integer ops on
        the packed tensors (shifts, masks, int-to-float conversions, a uint32-to-float32 bitcast), which every
        tinygrad device lowers: no float16 arithmetic."""
        if self.half == "bf16":   # a bfloat16 is the upper half of a float32
            return (self.words.cast(dtypes.uint32) << 16).bitcast(dtypes.float32)
        if self.half == "f16":
            return widen_half(self.words)
        panels, _, words = self.words.shape
        width, rows = 4 * words, self.shape[1]
        q = _unpack(self.words, self.bits, rows)
        if self.high is not None:
            q = q + (_unpack(self.high, self.high_bits, rows) << self.bits)

        def per_row(t: Tensor, block: int) -> Tensor:
            return t.reshape(panels, rows // block, 1, width).expand(panels, rows // block, block, width).reshape(panels, rows, width)

        def scaled(t: Tensor, super_t: Tensor | None) -> Tensor:   # a block's D or -M, exact
            if super_t is None:
                return per_row(widen_half(t), self.block)
            # the super-block's float16 spread over its blocks, times each block's integer scale, then over the rows
            n, per = rows // SUPER, SUPER // self.block
            spread = widen_half(super_t).reshape(panels, n, 1, width).expand(panels, n, per, width).reshape(panels, n * per, width)
            return per_row(spread * t.cast(dtypes.float32), self.block)

        d = scaled(self.scale, self.super_scale)
        if self.super_scale is not None and self.minimum is None and self.offset:
            # Q6_K: (q - offset) * D, one rounding (q * D would not be exact)
            return (q.cast(dtypes.int32) - self.offset).cast(dtypes.float32) * d
        q = q.cast(dtypes.float32)
        if self.minimum is None:   # as the loader's d * (q - offset): q * d exact, one rounding
            return q * d + d * -self.offset if self.offset else q * d
        m = scaled(self.minimum, self.super_minimum)
        return q * d - m if self.super_minimum is not None else q * d + m


def _unpack(plane: Tensor, bits: int, rows: int) -> Tensor:
    """A plane of `bits`-bit values [panels, rows * bits / 8, P/4] (uint32) -> [panels, rows, P] (uint32)."""
    panels, word_rows, words = plane.shape
    width, per = 4 * words, 8 // bits
    parts = [Tensor.stack(*[(plane >> (8 * lane + k * bits)) & ((1 << bits) - 1) for lane in range(4)], dim=-2)
             .reshape(panels, word_rows, width) for k in range(per)]
    return parts[0] if per == 1 else Tensor.stack(*parts, dim=2).reshape(panels, rows, width)


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
    if ggml_type not in GGML_BLOCKS:
        raise ValueError(f"GGML type {ggml_type} has no packed form ({', '.join(GGML_NAMES.values())} do)")
    per_block, block_bytes = GGML_BLOCKS[ggml_type]
    if in_f % per_block:
        raise ValueError(f"a packed matrix needs rows of whole {per_block}-weight blocks, got {shape}")
    blocks = raw[:ggml_nbytes(ggml_type, out_f * in_f)].reshape(out_f, in_f // per_block, block_bytes)
    if row_order is not None:
        blocks = blocks[row_order]
    codes, fields = _decode_blocks(blocks, ggml_type)
    codes = codes.reshape(out_f, in_f)
    # Q5_K keeps a byte a code: with a plane of high bits beside its four scale tensors, tinygrad's scheduler splits
    # the product in two kernels (the dequantized matrix realized in float32), which no hand-written kernel replaces
    low_bits = 8 if ggml_type in (Q8_0, Q5_K) else 4
    planes = {"words": _words(codes & ((1 << low_bits) - 1), low_bits)}
    high_bits = {Q5_0: 1, Q5_1: 1, Q6_K: 2}.get(ggml_type, 0)
    if high_bits:
        planes["high"] = _words(codes >> 4, high_bits)
    offset = {Q4_0: 8, Q5_0: 16, Q8_0: 128, Q6_K: 32}.get(ggml_type, 0)
    block = 16 if ggml_type == Q6_K else BLOCK
    tensors = {name: _panels(a.reshape(out_f, -1)) for name, a in fields.items()}
    return PackedWeight(**planes, **tensors, offset=offset, bits=low_bits, high_bits=high_bits, block=block)


def pack_half(bits: np.ndarray, half: str) -> PackedWeight:
    """An [out, in] matrix of bfloat16 or float16 bits (uint16) -> PackedWeight in panels, 2 bytes a weight."""
    if half not in ("bf16", "f16"):
        raise ValueError(f"half-precision weights are bf16 or f16, got {half!r}")
    bits = np.asarray(bits)
    if bits.dtype != np.uint16 or bits.ndim != 2:
        raise ValueError(f"half-precision weights take an [out, in] uint16 matrix, got {bits.dtype} {bits.shape}")
    return PackedWeight(words=_panels(bits), scale=None, bits=16, block=2, half=half)


def _decode_blocks(b: np.ndarray, ggml_type: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Blocks [out, n, bytes] -> (unsigned codes [out, n, weights a block], the scale fields [out, n, k] by PackedWeight
    name: float16 bits as uint16, K-quant sub-block scales as uint8 / int8)."""
    half = lambda at: np.ascontiguousarray(b[..., at:at + 2]).view(np.uint16)          # [out, n, 1]
    nibbles = lambda qs: np.concatenate([qs & 15, qs >> 4], axis=-1)                   # byte j: weights j, j + 16
    if ggml_type == Q8_0:
        return (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), {"scale": half(0)}
    if ggml_type in (Q4_0, Q4_1):
        qs = b[..., 4:] if ggml_type == Q4_1 else b[..., 2:]
        return nibbles(qs), {"scale": half(0), **({"minimum": half(2)} if ggml_type == Q4_1 else {})}
    if ggml_type in (Q5_0, Q5_1):
        at = 4 if ggml_type == Q5_1 else 2
        qh = np.ascontiguousarray(b[..., at:at + 4]).view("<u4")                         # bit j: weight j's 5th bit
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        return nibbles(b[..., at + 4:]) | (high << 4), {"scale": half(0), **({"minimum": half(2)} if ggml_type == Q5_1 else {})}
    out, n = b.shape[:2]
    if ggml_type in (Q4_K, Q5_K):
        s = b[..., 4:16]
        # 8 sub-blocks' 6-bit scales and minimums: the first 4 in bytes 0-3 / 4-7, the last 4 split over bytes 8-11
        # (low 4 bits) and the top 2 bits of bytes 0-3 / 4-7
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
        at = 48 if ggml_type == Q5_K else 16
        qs = b[..., at:at + 128].reshape(out, n, 4, 32)   # 32 bytes: sub-block 2g in low nibbles, 2g + 1 in high
        codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(out, n, 256)
        if ggml_type == Q5_K:   # byte i of qh: bit s is the 5th bit of weight i of sub-block s
            qh = b[..., 16:48]
            codes = codes | ((((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4).reshape(out, n, 256))
        fields = {"scale": sc, "minimum": mn, "super_scale": half(0), "super_minimum": half(2)}
        return codes.astype(np.uint8), fields
    if ggml_type == Q6_K:
        ql, qh = b[..., 0:128].reshape(out, n, 2, 64), b[..., 128:192].reshape(out, n, 2, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=-1)                                 # [.., 2, 128]
        high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)             # [.., 2, 128]
        codes = (low | (high << 4)).reshape(out, n, 256)
        return codes.astype(np.uint8), {"scale": b[..., 192:208].view(np.int8), "super_scale": half(208)}
    raise ValueError(f"GGML type {ggml_type} has no packed form")


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
    """values [out, in] (uint8, each < 2^bits) -> uint32 words [out/P, in * bits / 8, P/4]: output j = 4 * lane + w in
    byte `lane` of word w; the byte of word row i holds rows i * 8 / bits + k in bits k * bits."""
    panels, per = _panel_array(codes.astype(np.uint8)), 8 // bits
    panels = np.bitwise_or.reduce(np.stack([panels[:, k::per] << (k * bits) for k in range(per)]), axis=0).astype(np.uint8)
    n_panels, rows, width = panels.shape
    if width % 4:
        raise ValueError(f"packed panels need a multiple of 4 output columns, got {codes.shape[0]} rows")
    lanes = panels.reshape(n_panels, rows, 4, width // 4).astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))[:, None]
    return Tensor(np.bitwise_or.reduce(lanes, axis=2))


def _codes(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [out/P, in * bits / 8, P/4] -> values [out, in] (the inverse of _words)."""
    panels, rows, quarter = words.shape
    lanes = (words[:, :, None, :] >> (8 * np.arange(4, dtype=np.uint32))[None, None, :, None]) & 0xFF
    per_byte = lanes.reshape(panels, rows, 4 * quarter).astype(np.uint8)
    per = 8 // bits
    parts = [(per_byte >> (k * bits)) & ((1 << bits) - 1) for k in range(per)]
    return _unpanel(np.stack(parts, axis=2).reshape(panels, rows * per, 4 * quarter))
