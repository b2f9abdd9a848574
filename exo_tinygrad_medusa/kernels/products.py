"""C source of the CPU kernel for a product with packed weights (packed.PackedWeight), written by hand.

tinygrad renders a product as scalar C over 4-wide loads; clang then vectorises it 4 floats at a time and spends
most of the time unpacking codes (shift, mask, convert, one lane at a time). Here one load of 16 bytes (a panel row of
8-bit codes, or two rows of 4-bit codes, split by a mask and a shift in registers; a Q5/Q6 code's high bits from a
second plane, or'ed in) is widened to 16 floats per row (zero-extend bytes, convert), dequantized with one multiply-add
against the block's scales and minimums (float16 bits, or the K-quants' integer sub-block scales times the super-block's
float16, widened once a block), and then serves every token of a group with one multiply-add each: 16 floats per
instruction where the CPU has them (AVX-512), split by clang into what it has elsewhere (AVX2, NEON).

Numerics: every token accumulates its products in the same order whatever the number of tokens in the step (two
running sums, even and odd rows, added at the end), so a token's outputs are bit for bit the same in a one-token
decode step and in a many-token verify step. The dequantized weight is the loader's float32 value (packed.py says why):
q * D + M with q * D exact, or (q - offset) * D for Q6_K.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

WIDTH = 16          # outputs of one panel: one vector of 16 floats
SUPER = 256         # rows of a K-quant super-block
# byte k of a panel row holds the code of output 4 * (k % 4) + k // 4 (packed._words: output 4 * lane + w sits in
# byte `lane` of word w); the kernel keeps its vectors in byte order and puts outputs back in order once per panel
BYTE_OUTPUT = [4 * (k % 4) + k // 4 for k in range(WIDTH)]
OUTPUT_BYTE = [BYTE_OUTPUT.index(j) for j in range(WIDTH)]
C_PARAMS = {"out": "float* restrict out", "x": "const float* restrict x", "words": "const unsigned int* restrict words",
            "high": "const unsigned int* restrict high", "scale": "const void* restrict scale",
            "minimum": "const void* restrict minimum", "super_scale": "const unsigned short* restrict super_scale",
            "super_minimum": "const unsigned short* restrict super_minimum", "core_id": "const int core_id"}
BUFFERS = ["out", "x", "words", "high", "scale", "minimum", "super_scale", "super_minimum"]


@dataclass(frozen=True)
class PackedProduct:
    """out[n, p * 16 + j] = sum_r x[n, r] * w[p, r, j] for n < tokens, with w dequantized from a PackedWeight."""
    tokens: int             # rows of x (batch x sequence), fixed per captured step
    rows: int               # the input features (the reduction), a multiple of the block
    panels: int             # output features / 16
    minimum: bool           # w = q * D + M; else w = D * (q - offset)
    offset: int = 0
    threads: int = 1        # slices of the panels, one per core (the pool passes the slice as core_id)
    bits: int = 8           # bits of a code in `words`: 4 (rows 2i, 2i + 1 in the low, high nibble) or 8
    high_bits: int = 0      # bits of a code in `high` (Q5: 1, Q6_K: 2)
    block: int = 32         # rows sharing a scale
    scales: str = "f16"     # "f16": float16 bits; "u8" / "i8": a K-quant's sub-block scales (super-block float16s)
    half: str = ""          # "bf16" / "f16": 16-bit float weights (no codes, no scales)
    activations: str = "float32"   # "q8": int8 activations (products_q8.py) where the format has that kernel

    @staticmethod
    def of(weight, tokens: int, threads: int) -> "PackedProduct":
        """The product of `tokens` rows with a PackedWeight."""
        if weight.half:
            return PackedProduct(tokens, weight.shape[1], weight.shape[0] // WIDTH, False, threads=threads, bits=16,
                                 block=weight.block, half=weight.half)
        scales = "f16" if weight.super_scale is None else ("i8" if weight.scale.dtype.name == "signed char" else "u8")
        return PackedProduct(tokens, weight.shape[1], weight.shape[0] // WIDTH, weight.minimum is not None,
                             weight.offset, threads, weight.bits, weight.high_bits, weight.block, scales)

    @property
    def tag(self) -> str:
        """Names the format in the kernel's name: q<bits>, k for K-quants, m (minimum) or o<offset>, then _a8 for
        int8 activations; or the 16-bit float."""
        if self.half:
            return self.half
        return f"q{self.bits + self.high_bits}{'' if self.scales == 'f16' else 'k'}" + \
            ("m" if self.minimum else f"o{self.offset}") + ("_a8" if self.activations == "q8" else "")

    def source(self, name: str, params: list[str]) -> str:
        """The kernel `name`; params: the C parameter list in the order tinygrad passes arguments (BUFFERS' names
        for the buffers, "core_id" for the slice)."""
        if self.activations != "float32":
            raise ValueError(f"{self.activations} activations: the kernel's source is products_q8.source")
        outputs = self.panels * WIDTH
        group = group_size()
        sizes = sorted({min(self.tokens, group), self.tokens % group} - {0})
        full = self.tokens - self.tokens % group
        first, last = ("0", str(self.panels)) if self.threads == 1 else \
            (f"core_id * {self.panels} / {self.threads}", f"(core_id + 1) * {self.panels} / {self.threads}")
        lines = [PRELUDE, *(self._group_function(size, outputs) for size in sizes),
                 f"void {name}({', '.join(C_PARAMS[p] for p in params)}) {{"]
        lines += [f"  const void* {b} = 0;" for b in BUFFERS if b not in params]
        args = ", ".join(BUFFERS)
        lines.append(f"  for (int p = {first}; p < {last}; p++) {{")
        if full:
            lines.append(f"    for (int n = 0; n < {full}; n += {group}) group{group}({args}, p, n);")
        if self.tokens % group:
            lines.append(f"    group{self.tokens % group}({args}, p, {full});")
        return "\n".join([*lines, "  }", "}"])

    def _group_function(self, size: int, outputs: int) -> str:
        """static void group<size>: `size` consecutive tokens from n, one panel p."""
        if self.half:
            return self._half_group_function(size, outputs)
        rows, block, hb = self.rows, self.block, self.high_bits
        blocks, perm, inv = rows // block, ",".join(map(str, BYTE_OUTPUT)), ",".join(map(str, OUTPUT_BYTE))
        row_bytes = 16 * self.bits // 8   # bytes of codes a panel row takes (4-bit: a 16-byte load holds rows r, r + 1)
        params = ", ".join(C_PARAMS[b] for b in BUFFERS)
        lines = [f"static inline __attribute__((always_inline)) void group{size}({params}, int p, int n) {{"]
        for t in range(size):
            lines.append(f"  f16v even{t} = 0, odd{t} = 0;")
        lines.append(f"  const unsigned char* codes = (const unsigned char*)(words + (long)p * {rows * row_bytes // 4});")
        if hb:
            lines.append(f"  const unsigned char* highs = (const unsigned char*)(high + (long)p * {rows * 16 * hb // 8 // 4});")
        lines.append(f"  const float* xs = x + (long)n * {rows};")
        lines.append(f"  for (int b = 0; b < {blocks}; b++) {{")
        lines.append(f"    const int sb = (p * {blocks} + b) * 16;")
        integer_offset = self.scales != "f16" and not self.minimum and self.offset   # Q6_K: (q - offset) * D
        if self.scales == "f16":
            lines.append("    const f16v d0 = widen_half((const unsigned short*)scale + sb);")
        else:
            ss = f"(p * {rows // SUPER} + b / {SUPER // block}) * 16"
            kind = "i8x16" if self.scales == "i8" else "u8x16"
            lines.append(f"    const f16v d0 = widen_half(super_scale + {ss}) * "
                         f"__builtin_convertvector(*(const {kind}*)((const unsigned char*)scale + sb), f16v);")
        lines.append(f"    const f16v d = __builtin_shufflevector(d0, d0, {perm});")
        if self.minimum and self.scales == "f16":
            lines.append("    const f16v m0 = widen_half((const unsigned short*)minimum + sb);")
        elif self.minimum:   # M = -(dmin * mn)
            lines.append(f"    const f16v m0 = -(widen_half(super_minimum + {ss}) * "
                         "__builtin_convertvector(*(const u8x16*)((const unsigned char*)minimum + sb), f16v));")
        if self.minimum:
            lines.append(f"    const f16v m = __builtin_shufflevector(m0, m0, {perm});")
        elif not integer_offset:   # d * (q - offset) as one multiply-add: q * d + (-offset * d), q * d exact
            lines.append(f"    const f16v m = d * (float)-{self.offset};")
        lines.append(f"    for (int i = 0; i < {block}; i += 2) {{")
        lines.append(f"      const int r = b * {block} + i;")
        # one prefetch a cache line of codes (the unrolled loop folds the test away)
        lines.append(f"      if (r % {64 // row_bytes} == 0) __builtin_prefetch(codes + r * {row_bytes} + {PREFETCH}, 0, 0);")
        if self.bits == 4:
            # widened to 32 bits first: x86 has no byte shift, and the mask and shift then take one instruction each
            lines.append(f"      const i32x16 v = __builtin_convertvector(*(const u8x16*)(codes + r * {row_bytes}), i32x16);")
            lines.append("      i32x16 q0 = v & 15, q1 = v >> 4;")
        else:
            lines.append("      i32x16 q0 = __builtin_convertvector(*(const u8x16*)(codes + r * 16), i32x16);")
            lines.append("      i32x16 q1 = __builtin_convertvector(*(const u8x16*)(codes + r * 16 + 16), i32x16);")
        if hb:   # a byte of the high plane holds 8 / hb rows, hb bits each
            per = 8 // hb
            if 64 % per == 0:
                lines.append(f"      if (r % {64 * per // 16} == 0) __builtin_prefetch(highs + r / {per} * 16 + {PREFETCH}, 0, 0);")
            lines.append(f"      const i32x16 h = __builtin_convertvector(*(const u8x16*)(highs + r / {per} * 16), i32x16) >> (i % {per} * {hb});")
            lines.append(f"      q0 |= (h & {(1 << hb) - 1}) << {self.bits};")
            lines.append(f"      q1 |= ((h >> {hb}) & {(1 << hb) - 1}) << {self.bits};")
        if integer_offset:
            lines.append(f"      const f16v w0 = __builtin_convertvector(q0 - {self.offset}, f16v) * d;")
            lines.append(f"      const f16v w1 = __builtin_convertvector(q1 - {self.offset}, f16v) * d;")
        else:
            lines.append("      const f16v w0 = __builtin_convertvector(q0, f16v) * d + m;")
            lines.append("      const f16v w1 = __builtin_convertvector(q1, f16v) * d + m;")
        for t in range(size):
            lines.append(f"      even{t} += xs[{t * rows} + r] * w0;")
            lines.append(f"      odd{t} += xs[{t * rows} + r + 1] * w1;")
        lines.append("    }")
        lines.append("  }")
        for t in range(size):
            lines.append(f"  {{ const f16v s = even{t} + odd{t}; *(f16v*)(out + (long)(n + {t}) * {outputs} + p * 16) = "
                         f"__builtin_shufflevector(s, s, {inv}); }}")
        lines.append("}")
        return "\n".join(lines)


    def _half_group_function(self, size: int, outputs: int) -> str:
        """group<size> for 16-bit float weights: each panel row (16 outputs in order, 32 bytes) widened exactly to
        float32 (bfloat16: the upper half of a float32; float16: widen_half), then one multiply-add per token, with
        the same two running sums (even, odd rows) as the codes' kernel."""
        rows = self.rows
        params = ", ".join(C_PARAMS[b] for b in BUFFERS)
        widen = (lambda at: f"(f16v)(__builtin_convertvector(*(const u16x16*)({at}), u32x16) << 16)") \
            if self.half == "bf16" else (lambda at: f"widen_half({at})")
        lines = [f"static inline __attribute__((always_inline)) void group{size}({params}, int p, int n) {{"]
        lines += [f"  f16v even{t} = 0, odd{t} = 0;" for t in range(size)]
        lines.append(f"  const unsigned short* ws = (const unsigned short*)words + (long)p * {rows * 16};")
        lines.append(f"  const float* xs = x + (long)n * {rows};")
        lines.append(f"  for (int r = 0; r < {rows}; r += 2) {{")
        lines.append(f"    __builtin_prefetch(ws + r * 16 + {PREFETCH // 2}, 0, 0);")   # a cache line: the two rows
        lines.append(f"    const f16v w0 = {widen('ws + r * 16')};")
        lines.append(f"    const f16v w1 = {widen('ws + r * 16 + 16')};")
        for t in range(size):
            lines.append(f"    even{t} += xs[{t * rows} + r] * w0;")
            lines.append(f"    odd{t} += xs[{t * rows} + r + 1] * w1;")
        lines.append("  }")
        for t in range(size):
            lines.append(f"  *(f16v*)(out + (long)(n + {t}) * {outputs} + p * 16) = even{t} + odd{t};")
        lines.append("}")
        return "\n".join(lines)


@functools.cache
def group_size() -> int:
    """Tokens sharing each dequantized row. A token costs one multiply-add per weight and the dequantization about
    two, so a step pays the dequantization once per group: 8 tokens keep their 16 vectors of sums in registers where
    the CPU has 32 of 16 floats (AVX-512; against 4, a 5-8-token product is 10-22% faster, a 1-4-token one the
    same); 2 elsewhere. A token's sums do not depend on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return 8 if " avx512f" in f.read() else 2
    except OSError:
        return 2


# codes are read this many bytes ahead: the hardware prefetcher alone left a 1-token step ~20% slower
# (interleaved A/B: 12.7 -> 10.2 ms at position 128; 4 tokens 14.0 -> 13.0)
PREFETCH = 2048
# widen_half: 16 float16 bits -> float32, exactly: the CPU's conversion instruction where it has one (AVX-512, F16C),
# else as packed.widen_half: (mantissa with its implicit bit) * 2^(exponent - 25), the power of two built as float32
# bits, so no float16 type and no subnormal float32. (-Wpsabi: an inlined helper returning 16 floats warns on AVX2.)
PRELUDE = r"""#pragma clang diagnostic ignored "-Wpsabi"
typedef float f16v __attribute__((aligned(4), ext_vector_type(16)));
typedef float f8v __attribute__((aligned(4), ext_vector_type(8)));
typedef unsigned char u8x16 __attribute__((aligned(1), ext_vector_type(16)));
typedef unsigned short u16x16 __attribute__((aligned(2), ext_vector_type(16)));
typedef unsigned int u32x16 __attribute__((aligned(4), ext_vector_type(16)));
typedef signed char i8x16 __attribute__((aligned(1), ext_vector_type(16)));
typedef int i32x16 __attribute__((aligned(4), ext_vector_type(16)));
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __attribute__((always_inline)) f16v widen_half(const unsigned short* p) {
  return (f16v)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
#elif defined(__F16C__)
#include <immintrin.h>
static inline __attribute__((always_inline)) f16v widen_half(const unsigned short* p) {
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)), hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)));
  return __builtin_shufflevector((f8v)lo, (f8v)hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#else
static inline __attribute__((always_inline)) f16v widen_half(const unsigned short* p) {
  const u32x16 b = __builtin_convertvector(*(const u16x16*)p, u32x16);
  const u32x16 e = (b >> 10) & 31;
  const u32x16 mantissa = (b & 1023) | ((u32x16)(e != 0) & 1024);
  const u32x16 power = ((e | ((u32x16)(e == 0) & 1)) + 102) << 23;
  const f16v magnitude = __builtin_convertvector(mantissa, f16v) * (f16v)power;
  return (f16v)((u32x16)magnitude | ((b & 0x8000) << 16));
}
#endif"""


