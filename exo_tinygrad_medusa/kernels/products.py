"""C source of the CPU kernel for a product with packed weights (packed.PackedWeight), written by hand.

tinygrad renders a product as scalar C over 4-wide loads; clang then vectorises it 4 floats at a time and spends
most of the time unpacking codes (shift, mask, convert, one lane at a time). Here one load of 16 bytes (a panel row of
8-bit codes, or two rows of 4-bit codes, split by a mask and a shift in registers) is widened to 16 floats per row in
two instructions (zero-extend bytes, convert), dequantized with one multiply-add against the block's scales and
minimums (float16 bits, widened once a block), and then serves every token of a group with one multiply-add each: 16
floats per instruction where the CPU has them (AVX-512), split by clang into what it has elsewhere (AVX2, NEON).

Numerics: every token accumulates its products in the same order whatever the number of tokens in the step (two
running sums, even and odd rows, added at the end), so a token's outputs are bit for bit the same in a one-token
decode step and in a many-token verify step. The dequantized weight q * d + m is the loader's float32 value: q * d is
exact (a code of at most 8 bits times a float16), so the one rounding of the sum is the loader's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

BLOCK = 32          # rows sharing one scale and minimum (a GGML block)
WIDTH = 16          # outputs of one panel: one vector of 16 floats
# byte k of a panel row holds the code of output 4 * (k % 4) + k // 4 (packed._words: output 4 * lane + w sits in
# byte `lane` of word w); the kernel keeps its vectors in byte order and puts outputs back in order once per panel
BYTE_OUTPUT = [4 * (k % 4) + k // 4 for k in range(WIDTH)]
OUTPUT_BYTE = [BYTE_OUTPUT.index(j) for j in range(WIDTH)]


@dataclass(frozen=True)
class PackedProduct:
    """out[n, p * 16 + j] = sum_r x[n, r] * w[p, r, j] for n < tokens, with w dequantized from a PackedWeight."""
    tokens: int             # rows of x (batch x sequence), fixed per captured step
    rows: int               # the input features (the reduction), a multiple of 32
    panels: int             # output features / 16
    minimum: bool           # Q4_1: w = q * d + m; else Q4_0, Q8_0: w = d * (q - offset)
    offset: int = 0
    threads: int = 1        # slices of the panels, one per core (the pool passes the slice as core_id)
    bits: int = 8           # 4: two codes to a byte (rows 2i, 2i + 1 in the low, high nibble)

    def source(self, name: str, params: list[str]) -> str:
        """The kernel `name`; params: the C parameter list in the order tinygrad passes arguments ("out", "x",
        "words", "scale", "minimum" for the buffers, "core_id" for the slice)."""
        c_params = {"out": "float* restrict out", "x": "const float* restrict x", "words": "const unsigned int* restrict words",
                    "scale": "const unsigned short* restrict scale", "minimum": "const unsigned short* restrict minimum",
                    "core_id": "const int core_id"}
        outputs = self.panels * WIDTH
        perm, inv = ",".join(map(str, BYTE_OUTPUT)), ",".join(map(str, OUTPUT_BYTE))
        if self.minimum:
            minimum_line = f"const f16v m0 = widen_half(minimum + sb), m = __builtin_shufflevector(m0, m0, {perm});"
        else:  # d * (q - offset) as one multiply-add: q * d + (-offset * d)
            minimum_line = f"const f16v m = d * (float)-{self.offset};"
        group = group_size()
        sizes = sorted({min(self.tokens, group), self.tokens % group} - {0})
        full = self.tokens - self.tokens % group
        first, last = ("0", str(self.panels)) if self.threads == 1 else \
            (f"core_id * {self.panels} / {self.threads}", f"(core_id + 1) * {self.panels} / {self.threads}")
        lines = [PRELUDE, *(_group_function(size, self.rows, outputs, perm, inv, minimum_line, self.bits) for size in sizes),
                 f"void {name}({', '.join(c_params[p] for p in params)}) {{"]
        if "minimum" not in params:
            lines.append("  const unsigned short* minimum = 0;")
        lines.append(f"  for (int p = {first}; p < {last}; p++) {{")
        if full:
            lines.append(f"    for (int n = 0; n < {full}; n += {group}) group{group}(out, x, words, scale, minimum, p, n);")
        if self.tokens % group:
            lines.append(f"    group{self.tokens % group}(out, x, words, scale, minimum, p, {full});")
        return "\n".join([*lines, "  }", "}"])


@functools.cache
def group_size() -> int:
    """Tokens sharing each dequantized row: 4 keeps their 8 vectors of sums in registers where the CPU has 32 of 16
    floats (AVX-512); 2 elsewhere. A token's sums do not depend on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return 4 if " avx512f" in f.read() else 2
    except OSError:
        return 2


# codes are read this many bytes ahead (128 rows): the hardware prefetcher alone left a 1-token step ~20% slower
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


def _group_function(size: int, rows: int, outputs: int, perm: str, inv: str, minimum_line: str, bits: int) -> str:
    """static void group<size>: `size` consecutive tokens from n, one panel p."""
    blocks = rows // BLOCK
    row_bytes = 16 * bits // 8   # bytes of codes a panel row takes (4-bit: a 16-byte load holds rows r and r + 1)
    lines = [f"static inline __attribute__((always_inline)) void group{size}(float* restrict out, const float* restrict x, "
             "const unsigned int* restrict words, const unsigned short* restrict scale, const unsigned short* restrict minimum, "
             "int p, int n) {"]
    for t in range(size):
        lines.append(f"  f16v even{t} = 0, odd{t} = 0;")
    lines.append(f"  const unsigned char* codes = (const unsigned char*)(words + (long)p * {rows * row_bytes // 4});")
    lines.append(f"  const float* xs = x + (long)n * {rows};")
    lines.append(f"  for (int b = 0; b < {blocks}; b++) {{")
    lines.append(f"    const int sb = (p * {blocks} + b) * 16;")
    lines.append(f"    const f16v d0 = widen_half(scale + sb), d = __builtin_shufflevector(d0, d0, {perm});")
    lines.append(f"    {minimum_line}")
    lines.append(f"    for (int r = b * {BLOCK}; r < b * {BLOCK} + {BLOCK}; r += 2) {{")
    # one prefetch a cache line of codes (the unrolled loop folds the test away)
    lines.append(f"      if (r % {64 // row_bytes} == 0) __builtin_prefetch(codes + r * {row_bytes} + {PREFETCH}, 0, 0);")
    if bits == 4:
        # widened to 32 bits first: x86 has no byte shift, and the mask and shift then take one instruction each
        lines.append(f"      const u32x16 v = __builtin_convertvector(*(const u8x16*)(codes + r * {row_bytes}), u32x16);")
        lines.append("      const f16v w0 = __builtin_convertvector(v & 15, f16v) * d + m;")
        lines.append("      const f16v w1 = __builtin_convertvector(v >> 4, f16v) * d + m;")
    else:
        lines.append("      const f16v w0 = __builtin_convertvector(*(const u8x16*)(codes + r * 16), f16v) * d + m;")
        lines.append("      const f16v w1 = __builtin_convertvector(*(const u8x16*)(codes + r * 16 + 16), f16v) * d + m;")
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
