"""C source of the packed product with int8 activations (`--activations q8`): llama.cpp's numerics on AVX512-VNNI.

The exact kernel (products.py) widens every code to float32 and spends one 16-wide multiply-add per token per 16
weights: on a Zen 4 core a decode step is bound by arithmetic, not by the bytes it reads. Here each token's input row
is quantized to int8 per 32-row block (scale sx = max|x| / 127, round to nearest even), and the codes multiply the
int8 activations with vpdpbusd (unsigned codes x signed activations, 4 rows per 32-bit lane, summed exactly in
int32): 64 code-activation products an instruction instead of 16. Per block and token, in float32:

    out += (D * sx) * (sum q * xq - offset * sum xq)          (Q4_0, Q8_0: w = D * (q - offset))
    out += (D * sx) * sum q * xq + M * (sx * sum xq)          (Q4_1, Q4_K, Q5_K: w = q * D + M)
    out += (d * sx) * sum_h s_h * (sum_h q * xq - 32 * sum_h xq)   (Q6_K: w = d * s_h * (q - 32), h: 16-row halves)

Layout: today's PackedWeight panels, unchanged. A panel row is 16 bytes, byte k the code of output BYTE_OUTPUT[k];
one 64-byte load holds 4 rows of 8-bit codes (or 8 rows of 4-bit codes, rows 2i / 2i + 1 in the low / high nibble of
row-pair i), and one byte permutation (vpermb) turns it into vpdpbusd's operand: lane j = output j's 4 bytes (in
output order, the scales' order). Q6_K's top 2 bits of a code sit in a plane of their own, 4 rows to a byte: two 16-byte
rows of it hold the same 8 rows, and one permutation plus one multishift (vpmultishiftqb) lays each row's 2 bits
beside its nibble. For 4-bit codes the lane then holds rows r, r+2, r+4, r+6 (low nibbles) and r+1, r+3, r+5, r+7 (high nibbles), so the
quantized row is stored in that order (even rows, then odd rows, of every 8) and one 32-bit broadcast feeds a lane.

Numerics: a token's quantized row, its block scales and sums depend on that token alone, and its outputs accumulate in
the same order whatever the number of tokens in the step: bit for bit the same outputs in a one-token decode step and
in a many-token verify step (Medusa's greedy output stays plain greedy's). They are not the exact product's outputs:
the activations carry ~0.4% rounding per block (llama.cpp's trade, see docs/design.md).
"""
from __future__ import annotations

import dataclasses
import functools

from .products import BUFFERS, C_PARAMS, OUTPUT_BYTE, PREFETCH, SUPER, WIDTH, PackedProduct

BLOCK = 32            # rows sharing an activation scale (and the formats' weight block)
CHUNK_BYTES = 1 << 16  # stack bytes of quantized activations a kernel call holds at once (tokens are chunked)
MODES = ("float32", "q8")

_mode = ["float32"]


def set_activations(mode: str) -> None:
    """The activations of packed products compiled from now on in this process: "float32" (exact) or "q8"."""
    if mode not in MODES:
        raise ValueError(f"unknown activations {mode!r}: choose one of {', '.join(MODES)}")
    _mode[0] = mode


def activations() -> str:
    return _mode[0]


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU runs the q8 kernel: AVX512-VNNI (vpdpbusd) and AVX512-VBMI (vpermb)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512_vnni", "avx512vbmi", "avx512bw"))


def chosen(spec: PackedProduct) -> PackedProduct:
    """`spec` with the process's activations where its format has a q8 kernel (others keep the exact one)."""
    return dataclasses.replace(spec, activations="q8") if activations() == "q8" and supports(spec) else spec


def kernel_source(spec: PackedProduct, name: str, params: list[str]) -> str:
    """The C of the kernel `name` for `spec`, exact or with int8 activations as spec says."""
    return source(spec, name, params) if spec.activations == "q8" else spec.source(name, params)


def supports(spec: PackedProduct) -> bool:
    """Whether the product `spec` has a q8 kernel: codes in `words` only (no high plane), blocks of 32 rows with
    float16 scales or a K-quant's 8-bit sub-block scales; or Q6_K. Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K do; Q5_0,
    Q5_1 and 16-bit float weights keep the exact kernel."""
    if spec.half:
        return False
    return _is_q6k(spec) or (not spec.high_bits and spec.block == BLOCK and spec.bits in (4, 8) and
                             (spec.minimum or spec.scales == "f16"))


def _is_q6k(spec: PackedProduct) -> bool:
    """Q6_K: 4-bit low codes, 2 high bits, 16-row sub-blocks with int8 scales, codes stored + 32."""
    return spec.bits == 4 and spec.high_bits == 2 and spec.block == 16 and spec.scales == "i8" and \
        not spec.minimum and spec.offset == 32


def source(spec: PackedProduct, name: str, params: list[str]) -> str:
    """The q8 kernel `name` for `spec` (one that `supports`); params: its C parameters in tinygrad's order."""
    rows, panels, tokens = spec.rows, spec.panels, spec.tokens
    # 8 tokens a group: their int32 and float32 sums take 16 of the 32 vector registers, the operands the rest
    blocks, group = rows // BLOCK, 8
    chunk = min(tokens, max(group, CHUNK_BYTES // rows // group * group))
    first, last = ("0", str(panels)) if spec.threads == 1 else \
        (f"core_id * {panels} / {spec.threads}", f"(core_id + 1) * {panels} / {spec.threads}")
    # vpermb index: operand byte 4j + i <- load byte 16i + OUTPUT_BYTE[j]: lane j holds output j's codes of 4 row
    # slots, so the sums come out in output order, the order of the scales and of `out`
    transpose = [16 * (i % 4) + OUTPUT_BYTE[i // 4] for i in range(64)]
    sizes = sorted({s for n0 in range(0, tokens, chunk) for c in [min(chunk, tokens - n0)]
                    for s in ({min(c, group), c % group} - {0})})
    constant = lambda values: ", ".join(map(str, reversed(values)))   # _mm512_set_*: the last element first
    lines = [PRELUDE, f"#define TRANSPOSE_IDX {constant(transpose)}"]
    halves = 2 if _is_q6k(spec) else 1   # Q6_K needs each 16-row half's code sum (its sub-blocks)
    if _is_q6k(spec):
        # the high plane: 32 loaded bytes (two 16-byte rows, outputs in byte order) -> 64-bit element m holds outputs
        # 2m and 2m + 1's two bytes each; a multishift then picks each row's 2 bits at 4-bit steps (+2 for odd rows)
        high = [0] * 64
        for m in range(8):
            for k, j in enumerate((2 * m, 2 * m + 1)):
                high[8 * m + 2 * k], high[8 * m + 2 * k + 1] = OUTPUT_BYTE[j], 16 + OUTPUT_BYTE[j]
        lines.append(f"#define HIGH_IDX {constant(high)}")
        lines.append(f"#define HIGH_EVEN {constant([4 * (i % 8) for i in range(64)])}")
        lines.append(f"#define HIGH_ODD {constant([4 * (i % 8) + 2 for i in range(64)])}")
    lines.append(_quantize_function(rows, spec.bits, halves))
    for size in sizes:
        lines.append(_group_function(spec, size, SUPER, PREFETCH))
    lines.append(f"void {name}({', '.join(C_PARAMS[p] for p in params)}) {{")
    lines += [f"  const void* {b} = 0;" for b in BUFFERS if b not in params]
    lines.append(f"  signed char xq[{chunk * rows}] __attribute__((aligned(64)));")
    lines.append(f"  float sx[{chunk * blocks}], ss[{chunk * blocks}]; int sq[{chunk * blocks * halves}];")
    lines.append(f"  for (int n0 = 0; n0 < {tokens}; n0 += {chunk}) {{")
    lines.append(f"    const int count = {tokens} - n0 < {chunk} ? {tokens} - n0 : {chunk};")
    lines.append(f"    for (int t = 0; t < count; t++) quantize(x + (long)(n0 + t) * {rows}, xq + t * {rows}, "
                 f"sx + t * {blocks}, sq + t * {blocks * halves}, ss + t * {blocks});")
    lines.append(f"    for (int p = {first}; p < {last}; p++) {{")
    lines.append("      int t = 0;")
    if group in sizes:
        lines.append(f"      for (; t + {group} <= count; t += {group}) group{group}(out, words, high, scale, minimum, "
                     "super_scale, super_minimum, xq, sx, sq, ss, p, n0, t);")
    for size in sizes:
        if size != group:
            lines.append(f"      if (count - t == {size}) group{size}(out, words, high, scale, minimum, super_scale, "
                         "super_minimum, xq, sx, sq, ss, p, n0, t);")
    lines += ["    }", "  }", "}"]
    return "\n".join(lines)


def _quantize_function(rows: int, bits: int, halves: int = 1) -> str:
    """quantize: one token's row -> int8 codes in the kernel's row order, and per block its scale and code sum (with
    halves = 2: the sums of its two 16-row halves)."""
    lines = ["static inline __attribute__((always_inline)) void quantize(const float* restrict x, signed char* restrict q, "
             "float* restrict s, int* restrict sum, float* restrict scaled) {",
             f"  for (int b = 0; b < {rows // BLOCK}; b++) {{",
             "    const __m512 a = _mm512_loadu_ps(x + b * 32), c = _mm512_loadu_ps(x + b * 32 + 16);",
             "    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));",
             # a block too small for 1 / d to be finite reads as zeros (never in practice: |x| < 4e-37)
             "    const float d = amax / 127.0f, id = d >= 1.17549435e-38f ? 1.0f / d : 0.0f;",
             "    s[b] = id == 0.0f ? 0.0f : d;",
             "    const __m512i qa = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)), "
             "_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);",
             "    const __m512i qc = _mm512_cvt_roundps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)), "
             "_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);",
             *(["    sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));",
                "    scaled[b] = s[b] * (float)sum[b];"] if halves == 1 else
               ["    sum[2 * b] = _mm512_reduce_add_epi32(qa); sum[2 * b + 1] = _mm512_reduce_add_epi32(qc);"]),
             "    __m128i lo = _mm512_cvtsepi32_epi8(qa), hi = _mm512_cvtsepi32_epi8(qc);"]
    if bits == 4:   # of every 8 rows: the even ones, then the odd ones (the nibbles' order after the transpose)
        lines += ["    const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);",
                  "    lo = _mm_shuffle_epi8(lo, order); hi = _mm_shuffle_epi8(hi, order);"]
    lines += ["    _mm_storeu_si128((__m128i*)(q + b * 32), lo); _mm_storeu_si128((__m128i*)(q + b * 32 + 16), hi);",
              "  }", "}"]
    return "\n".join(lines)


def _group_function(spec, size: int, super_rows: int, prefetch: int) -> str:
    """group<size>: `size` tokens (t .. of the chunk starting at token n0), one panel p."""
    rows, blocks, bits = spec.rows, spec.rows // BLOCK, spec.bits
    row_bytes = 16 * bits // 8
    lines = [f"static inline __attribute__((always_inline)) void group{size}(float* restrict out, "
             "const unsigned int* restrict words, const unsigned int* restrict high, const void* restrict scale, "
             "const void* restrict minimum, "
             "const unsigned short* restrict super_scale, const unsigned short* restrict super_minimum, "
             "const signed char* restrict xq, const float* restrict sx, const int* restrict sq, const float* restrict ss, "
             "int p, int n0, int t) {",
             "  const __m512i transpose = _mm512_set_epi8(TRANSPOSE_IDX);",
             "  const __m512i nibble = _mm512_set1_epi8(15);"]
    lines += [f"  __m512 acc{i} = _mm512_setzero_ps();" for i in range(size)]
    lines.append(f"  const unsigned char* codes = (const unsigned char*)(words + (long)p * {rows * row_bytes // 4});")
    if _is_q6k(spec):
        return "\n".join(lines + _q6k_blocks(spec, size, super_rows, prefetch))
    lines.append(f"  for (int b = 0; b < {blocks}; b++) {{")
    lines += [f"    __m512i is{i} = _mm512_setzero_si512();" for i in range(size)]
    lines.append(f"    const unsigned char* w = codes + b * {BLOCK * row_bytes};")
    step = 8 if bits == 4 else 4   # rows one 64-byte load holds
    lines.append(f"    for (int g = 0; g < {BLOCK // step}; g++) {{")
    lines.append(f"      __builtin_prefetch(w + g * 64 + {prefetch}, 0, 0);")
    lines.append("      const __m512i v = _mm512_permutexvar_epi8(transpose, _mm512_loadu_si512((const void*)(w + g * 64)));")
    if bits == 4:
        lines.append("      const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);")
    for i in range(size):
        at = f"xq + (t + {i}) * {rows} + b * 32 + g * {step}"
        if bits == 4:
            lines.append(f"      is{i} = _mm512_dpbusd_epi32(is{i}, lo, _mm512_set1_epi32(*(const int*)({at})));")
            lines.append(f"      is{i} = _mm512_dpbusd_epi32(is{i}, hi, _mm512_set1_epi32(*(const int*)({at} + 4)));")
        else:
            lines.append(f"      is{i} = _mm512_dpbusd_epi32(is{i}, v, _mm512_set1_epi32(*(const int*)({at})));")
    lines.append("    }")
    lines.append(f"    const int sb = (p * {blocks} + b) * 16;")
    if spec.scales == "f16":
        lines.append("    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const unsigned short*)scale + sb)));")
    else:
        ss = f"(p * {rows // super_rows} + b / {super_rows // BLOCK}) * 16"
        lines.append(f"    const __m512 d = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(super_scale + {ss}))), "
                     "_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)((const unsigned char*)scale + sb)))));")

    if spec.minimum:
        if spec.scales == "f16":
            lines.append("    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const unsigned short*)minimum + sb)));")
        else:   # M = -(dmin * mn)
            lines.append(f"    const __m512 m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256("
                         f"(const __m256i*)(super_minimum + {ss}))), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128("
                         "(const __m128i*)((const unsigned char*)minimum + sb))))));")

    for i in range(size):
        k = f"(t + {i}) * {blocks} + b"
        if spec.offset and not spec.minimum:
            lines.append(f"    is{i} = _mm512_sub_epi32(is{i}, _mm512_set1_epi32({spec.offset} * sq[{k}]));")
        lines.append(f"    acc{i} = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(sx[{k}])), _mm512_cvtepi32_ps(is{i}), acc{i});")
        if spec.minimum:
            lines.append(f"    acc{i} = _mm512_fmadd_ps(m, _mm512_set1_ps(ss[{k}]), acc{i});")
    return "\n".join(lines + _stores(spec, size))


def _stores(spec, size: int) -> list[str]:
    """The end of group<size>: close the loop over blocks, store each token's 16 sums."""
    outputs = spec.panels * WIDTH
    return ["  }", *(f"  _mm512_storeu_ps(out + (long)(n0 + t + {i}) * {outputs} + p * 16, acc{i});" for i in range(size)),
            "}"]


def _q6k_blocks(spec, size: int, super_rows: int, prefetch: int) -> list[str]:
    """group<size>'s body for Q6_K, after its accumulators: per 32-row block, each 16-row half's int32 sums (codes 0..63
    times the int8 activations, less 32 times the half's activation sum) times the half's int8 scale, added exactly in
    int32 (|sum| < 2^26), then one float multiply-add by the super-block's d times the block's activation scale."""
    rows, blocks = spec.rows, spec.rows // BLOCK
    lines = [f"  const unsigned char* highs = (const unsigned char*)(high + (long)p * {rows * 16 * 2 // 8 // 4});",
             "  const __m512i high_idx = _mm512_set_epi8(HIGH_IDX), high_even = _mm512_set_epi8(HIGH_EVEN), "
             "high_odd = _mm512_set_epi8(HIGH_ODD), three = _mm512_set1_epi8(3);",
             f"  for (int b = 0; b < {blocks}; b++) {{",
             f"    const unsigned char* w = codes + b * {BLOCK * 8};",
             f"    const unsigned char* wh = highs + b * {BLOCK * 4};",
             f"    const int sb = (p * {rows // 16} + 2 * b) * 16;",
             "    const __m512i s0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const signed char*)scale + sb)));",
             "    const __m512i s1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const signed char*)scale + sb + 16)));",
             f"    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(super_scale + "
             f"(p * {rows // super_rows} + b / {super_rows // BLOCK}) * 16)));"]
    for half in range(2):
        lines += [f"    __m512i is{i}_{half} = _mm512_setzero_si512();" for i in range(size)]
        for g in range(2 * half, 2 * half + 2):   # 8 rows a load: rows 8g .. 8g + 7 of the block
            lines.append(f"    {{ __builtin_prefetch(w + {g * 64} + {prefetch}, 0, 0);")
            if g % 2 == 0:
                lines.append(f"      __builtin_prefetch(wh + {g * 32} + {prefetch // 2}, 0, 0);")
            lines.append(f"      const __m512i v = _mm512_permutexvar_epi8(transpose, _mm512_loadu_si512((const void*)(w + {g * 64})));")
            lines.append(f"      const __m512i h = _mm512_permutexvar_epi8(high_idx, _mm512_castsi256_si512("
                         f"_mm256_loadu_si256((const __m256i*)(wh + {g * 32}))));")
            lines.append("      const __m512i lo = _mm512_or_si512(_mm512_and_si512(v, nibble), _mm512_slli_epi16("
                         "_mm512_and_si512(_mm512_multishift_epi64_epi8(high_even, h), three), 4));")
            lines.append("      const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), "
                         "_mm512_slli_epi16(_mm512_and_si512(_mm512_multishift_epi64_epi8(high_odd, h), three), 4));")
            for i in range(size):
                at = f"xq + (t + {i}) * {rows} + b * 32 + {g * 8}"
                lines.append(f"      is{i}_{half} = _mm512_dpbusd_epi32(is{i}_{half}, lo, _mm512_set1_epi32(*(const int*)({at})));")
                lines.append(f"      is{i}_{half} = _mm512_dpbusd_epi32(is{i}_{half}, hi, _mm512_set1_epi32(*(const int*)({at} + 4)));")
            lines.append("    }")
    for i in range(size):
        k = f"(t + {i}) * {blocks} + b"
        lines.append(f"    {{ const __m512i q = _mm512_add_epi32("
                     f"_mm512_mullo_epi32(s0, _mm512_sub_epi32(is{i}_0, _mm512_set1_epi32(32 * sq[2 * ({k})]))), "
                     f"_mm512_mullo_epi32(s1, _mm512_sub_epi32(is{i}_1, _mm512_set1_epi32(32 * sq[2 * ({k}) + 1]))));")
        lines.append(f"      acc{i} = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(sx[{k}])), _mm512_cvtepi32_ps(q), acc{i}); }}")
    return lines + _stores(spec, size)


PRELUDE = r"""#if !defined(__AVX512VNNI__) || !defined(__AVX512VBMI__) || !defined(__AVX512BW__)
#error "--activations q8 needs AVX512-VNNI, AVX512-VBMI and AVX512-BW"
#endif
#include <immintrin.h>"""
