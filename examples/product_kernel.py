"""What one more verified token costs in a product: the hand-written packed product kernel (kernels/products.py) timed
alone on one core for T = 1..8 tokens (the fastest of 400 runs, so a busy machine barely moves it).

    .venv/bin/python examples/product_kernel.py --rows 576 --outputs 1536 --format q4_1 --activations float32,q8

On a 2-core AMD EPYC (Zen 4, AVX-512) a 576 x 1536 Q4_1 product takes ~42 us for one token and ~15 us more for each
token past four: every token costs one 16-wide multiply-add per 16 weights, and the core retires one a cycle, while
the dequantization (convert the codes, one multiply-add against the scales) is paid once per group of tokens. The
product is bound by arithmetic, not by the bytes it reads (~13 GB/s of codes on one core). With --activations q8
(kernels/products_q8.py: int8 activations, AVX512-VNNI) the same product takes ~9 us for one token, ~43 for eight."""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from exo_tinygrad_medusa.kernels import products, products_q8

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
  const long rows = ROWS, outs = OUTS;
  float* out = aligned_alloc(64, 16 * outs * 4); float* x = aligned_alloc(64, 16 * rows * 4);
  unsigned int* w = aligned_alloc(64, rows * outs); unsigned short* sc = aligned_alloc(64, rows / 32 * outs * 2);
  unsigned short* mn = aligned_alloc(64, rows / 32 * outs * 2);
  for (long i = 0; i < rows * outs / 4; i++) w[i] = rand();
  for (long i = 0; i < rows / 32 * outs; i++) { sc[i] = 0x2000 + (rand() & 255); mn[i] = 0xa000 + (rand() & 255); }
  for (long i = 0; i < 16 * rows; i++) x[i] = (rand() % 100) / 100.0f;
BODY
  return 0;
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=576, help="input features (a multiple of 32)")
    p.add_argument("--outputs", type=int, default=1536, help="output features (a multiple of 16)")
    p.add_argument("--format", choices=["q4_1", "q8_0"], default="q4_1")
    p.add_argument("--tokens", default="1,2,3,4,5,6,8", help="comma-separated token counts")
    p.add_argument("--activations", default="float32", help="comma-separated: float32 (exact), q8 (int8, AVX512-VNNI)")
    args = p.parse_args()
    q8 = args.format == "q8_0"
    params = ["out", "x", "words", "scale"] + ([] if q8 else ["minimum"])
    sizes = [int(t) for t in args.tokens.split(",")]
    modes = args.activations.split(",")
    sources, body = [], []
    for mode in modes:
        for T in sizes:
            spec = products.PackedProduct(tokens=T, rows=args.rows, panels=args.outputs // 16, minimum=not q8,
                                          bits=8 if q8 else 4, offset=128 if q8 else 0, activations=mode)
            fn = f"product_{mode}_{T}"
            source = products_q8.kernel_source(spec, fn, params)
            source = re.sub(r"\b(group\d|quantize)\(", f"{mode}_t{T}_\\1(", source)
            sources.append(source if not sources or mode == "q8" else source.split("#endif", 1)[1])   # the prelude once
            call = f"{fn}(out, x, w, sc{'' if q8 else ', mn'})"
            body.append(f'  {{ double best = 1e9; for (int r = 0; r < 400; r++) {{ double t0 = now(); {call}; '
                        f'double t = now() - t0; if (t < best) best = t; }} printf("{mode} {T} %.1f\\n", best * 1e6); }}')
    harness = HARNESS.replace("ROWS", str(args.rows)).replace("OUTS", str(args.outputs)).replace("BODY", "\n".join(body))
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "product.c", Path(tmp) / "product"
        src.write_text("\n".join(sources) + harness)
        subprocess.run(["clang", "-O2", "-march=native", "-o", str(exe), str(src)], check=True)
        lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    times = {(mode, int(t)): float(us) for mode, t, us in (line.split() for line in lines if line)}
    print(f"{args.format} {args.rows} x {args.outputs}, one core, group of {products.group_size()} tokens")
    print("| T | " + " | ".join(f"{m} us | {m} t(T)/t(1)" for m in modes) + " |")
    print("|---:|" + "---:|---:|" * len(modes))
    for T in sizes:
        cells = [f"{times[m, T]:.1f} | {times[m, T] / times[m, min(sizes)]:.2f}" for m in modes]
        print(f"| {T} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
