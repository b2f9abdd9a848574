"""Attention of a decode or verify step on the CPU, as one hand-written C kernel.

tinygrad renders attention over the cached keys as several kernels whose loops run over the symbolic context length:
the scores as a scalar chain of multiply-adds per key, the weighted values with an integer division by the length in
every load. At 128 tokens of context they took ~1.5 ms of an 8 ms decode step and ~2.4 ms of a 2-token verify step.
Here one kernel does it all per query (a query head at one new token): the scores as 16-wide dot products, the
softmax, and the weighted values as 16-wide multiply-adds. Each query is computed the same way whatever the number
of new tokens, so a token's attention is bit for bit the same in a decode step and in a verify step.

The kernel is requested through Tensor.custom_kernel with a placeholder body; tinygrad_hooks compiles this source in
its place (section 7).
"""
from __future__ import annotations

from dataclasses import dataclass

from tinygrad import Tensor, UOp, dtypes
from tinygrad.uop.ops import KernelInfo

from . import tinygrad_hooks


# e^x for x <= 0 in the kernel itself: a call out to libm's expf goes through the ELF loader's relocations, and one
# 32-bit call displacement cannot reach libm from wherever the kernel's code was mapped (it jumped into nowhere).
# 2^(x log2 e) = 2^n 2^f with n the nearest integer and |f| <= 1/2; 2^f from its Taylor series to degree 7 (relative
# error < 1e-8, below float32's rounding); 2^n written into the exponent bits.
EXP_NEG = r"""static inline float exp_neg(float x) {
  if (x < -87.0f) return 0.0f;
  const float t = x * 1.4426950408889634f;
  const int n = -(int)(0.5f - t);
  const float f = (t - (float)n) * 0.6931471805599453f;
  const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720 + f * (1.0f / 5040)))))));
  union { float f; int i; } scale = { .i = (n + 127) << 23 };
  return p * scale.f;
}"""


# the kernel keeps a unit's scores on its thread's stack (G x (C + T) floats); longer contexts keep tinygrad's attention
MAX_SCORES_BYTES = 1 << 20


@dataclass(frozen=True)
class DecodeAttention:
    """out[b, t, h * D + d] = softmax_s(q[b, h, t] . K[b, h // G, s] / sqrt(D) + bias[t, s]) V[b, h // G, s, d] over
    s < start_pos + T, where bias is 0 on the cached prefix and mask[t, s - start_pos] on the new tokens."""
    batch: int
    tokens: int         # T, new tokens of the step
    kv_heads: int
    group: int          # query heads per key/value head
    head_dim: int       # a multiple of 16
    max_context: int    # the cache's length (its row stride)
    threads: int

    @property
    def name(self) -> str:
        return f"exo_attention_{self.batch}_{self.tokens}_{self.kv_heads}x{self.group}_{self.head_dim}_{self.max_context}_{self.threads}"

    def source(self, name: str) -> str:
        """One unit of work is the G query heads of one key/value head at one new token: each key and value row is
        loaded once for the G of them. Units are split over the cores (core_id)."""
        B, T, KVH, G, D, C = self.batch, self.tokens, self.kv_heads, self.group, self.head_dim, self.max_context
        H, V = KVH * G, D // 16
        units = B * KVH * T
        core = "core_id" if self.threads > 1 else "0"
        scale = 1.0 / D ** 0.5
        return "\n".join([
            "typedef float f16v __attribute__((aligned(4), ext_vector_type(16)));",
            "typedef float f8v __attribute__((ext_vector_type(8)));",
            "typedef float f4v __attribute__((ext_vector_type(4)));",
            EXP_NEG,
            f"void {name}(float* restrict out, const float* restrict q, const float* restrict cache, "
            f"const float* restrict mask, const int* restrict position{', const int core_id' if self.threads > 1 else ''}) {{",
            "  const int start_pos = position[0];",
            f"  const int S = start_pos + {T};",
            f"  float scores[{G}][{C + T}];",
            f"  for (int u = {core} * {units} / {self.threads}; u < ({core} + 1) * {units} / {self.threads}; u++) {{",
            f"    const int t = u % {T}, kv = (u / {T}) % {KVH}, b = u / {T * KVH};",
            f"    const float* keys = cache + ((long)b * {KVH} + kv) * {C * D};",
            f"    const float* values = cache + ((long)({B} + b) * {KVH} + kv) * {C * D};",
            f"    f16v qs[{G}][{V}];",
            f"    float top[{G}], total[{G}];",
            f"    for (int g = 0; g < {G}; g++) {{",
            f"      const float* qv = q + (((long)b * {H} + kv * {G} + g) * {T} + t) * {D};",
            f"      for (int i = 0; i < {V}; i++) qs[g][i] = *(const f16v*)(qv + 16 * i);",
            "      top[g] = -__builtin_inff(); total[g] = 0;",
            "    }",
            "    for (int s = 0; s < S; s++) {",
            f"      const float bias = s >= start_pos ? mask[t * {T} + s - start_pos] : 0.0f;",
            f"      f16v k[{V}];",
            f"      for (int i = 0; i < {V}; i++) k[i] = *(const f16v*)(keys + (long)s * {D} + 16 * i);",
            f"      for (int g = 0; g < {G}; g++) {{",
            "        f16v acc = 0;",
            f"        for (int i = 0; i < {V}; i++) acc += qs[g][i] * k[i];",
            # a tree of halvings, not 16 dependent adds
            "        const f8v h8 = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) + "
            "__builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);",
            "        const f4v h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);",
            "        const float dot = (h4[0] + h4[2]) + (h4[1] + h4[3]);",
            f"        const float x = dot * {scale!r}f + bias;",
            "        scores[g][s] = x;",
            "        top[g] = x > top[g] ? x : top[g];",
            "      }",
            "    }",
            f"    for (int g = 0; g < {G}; g++)",
            "      for (int s = 0; s < S; s++) { scores[g][s] = exp_neg(scores[g][s] - top[g]); total[g] += scores[g][s]; }",
            f"    f16v o[{G}][{V}];",
            f"    for (int g = 0; g < {G}; g++) for (int i = 0; i < {V}; i++) o[g][i] = 0;",
            "    for (int s = 0; s < S; s++) {",
            f"      f16v v[{V}];",
            f"      for (int i = 0; i < {V}; i++) v[i] = *(const f16v*)(values + (long)s * {D} + 16 * i);",
            f"      for (int g = 0; g < {G}; g++) for (int i = 0; i < {V}; i++) o[g][i] += scores[g][s] * v[i];",
            "    }",
            f"    for (int g = 0; g < {G}; g++) {{",
            "      const float inv = 1.0f / total[g];",
            f"      float* dst = out + (((long)b * {T} + t) * {H} + kv * {G} + g) * {D};",
            f"      for (int i = 0; i < {V}; i++) *(f16v*)(dst + 16 * i) = o[g][i] * inv;",
            "    }",
            "  }",
            "}",
        ])


def decode_attention(q: Tensor, cache_kv: Tensor, start_pos: UOp, mask: Tensor, group: int) -> Tensor | None:
    """Attention of a step's T new tokens, [B, T, H * D], or None where the hand-written kernel does not apply (the
    caller keeps tinygrad's). q: [B, H, T, D] contiguous; cache_kv: the layer's [2, B, KVH, C, D] cache, the new keys
    and values already written; start_pos: the bound position variable (captured steps; an int position keeps
    tinygrad's kernels); mask: the (T, T) additive mask."""
    _, B, KVH, C, D = cache_kv.shape
    T = q.shape[2]
    if not isinstance(start_pos, UOp) or D % 16 or not isinstance(q.device, str) or not tinygrad_hooks.hand_kernels(q.device) \
            or q.dtype != dtypes.float32 or cache_kv.dtype != dtypes.float32 or mask.dtype != dtypes.float32:
        return None
    if group * (C + T) * 4 > MAX_SCORES_BYTES:
        return None
    spec = DecodeAttention(B, T, KVH, group, D, C, tinygrad_hooks.NUM_THREADS())
    tinygrad_hooks.expect_hand_kernel(spec.name, spec.source, spec.threads)

    def placeholder_body(out: UOp, qs: UOp, cache: UOp, masks: UOp, position: UOp) -> UOp:
        # never compiled: the hooks swap in spec.source; it names the buffers the kernel reads
        value = qs.flatten()[0] + cache.flatten()[0] + masks.flatten()[0] + position.flatten()[0].cast(dtypes.float)
        return out.flatten()[0].store(value).sink(arg=KernelInfo(name=spec.name, opts_to_apply=()))

    # the position as a one-element buffer: a step's kernels then need no variable of their own
    position = Tensor(start_pos).cast(dtypes.int32).reshape(1).contiguous()
    out = Tensor.empty(B, T, KVH * group * D, dtype=dtypes.float32, device=q.device)
    return out.custom_kernel(q, cache_kv, mask.contiguous(), position, fxn=placeholder_body)[0]
