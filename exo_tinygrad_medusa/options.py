"""Command-line options every subcommand shares, and opening a Session from them.

It sits below every command module (cli, server, bench, tune, train_cli): they all import it and it imports none
of them, so `cli.py` only dispatches.
"""
from __future__ import annotations

import argparse
import sys

from .model.registry import DEFAULT_MODEL, ModelNotFound
from .decoding.sampling import GenerationConfig
from .decoding.session import MedusaOptions, Session, open_session

USER_ERRORS = (ValueError, FileNotFoundError, ModelNotFound, PermissionError, NotADirectoryError)
# below this, sampling is the argmax in all but float ties, and logits / temperature overflows float64 near 1e-306
# (NaN probabilities): such temperatures decode greedily
MIN_TEMPERATURE = 1e-6
FIRST_RUN_NOTICE = "compiling kernels and capturing steps (30-60 s on a first run; cached after)"


def model_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model card id, HF directory, .gguf file or HF repo id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="tinygrad device, e.g. CPU, CUDA, METAL (default: tinygrad's default)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weights and activations (default float32 on CPU, float16 elsewhere)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache length in tokens (default 2048)")
    p.add_argument("--weights", choices=["compact", "float32"], default=None,
                   help="compact: a GGUF's Q4_1/Q8_0 codes stay packed and are dequantized inside each product (the same "
                        "float32 values, ~3x fewer bytes read; default for GGUF in float32); float32: dequantized on load")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    m = p.add_argument_group("Medusa")
    m.add_argument("--medusa-enabled", "--medusa", dest="medusa_enabled", action="store_true",
                   help="speculative decoding with Medusa heads")
    m.add_argument("--medusa-heads", default=None, help="heads directory or HF repo id (default: the model card's)")
    m.add_argument("--medusa-num-heads", type=int, default=None, help="use only the first N heads")
    m.add_argument("--medusa-num-layers", type=int, default=None, help="ResBlocks per head (must match the checkpoint)")
    m.add_argument("--medusa-choices", default=None,
                   help="tree: chain-N, cpu-4/8/12/16, mc_sim_7b_63, or a JSON file (default: tuned tree or per device)")
    return p


def generation_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-generate-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--medusa-sampling", choices=["typical", "exact"], default="typical",
                   help="acceptance when temperature > 0: typical (Medusa paper, fast, approximate) or exact (lossless)")
    p.add_argument("--posterior-threshold", type=float, default=0.09)
    p.add_argument("--posterior-alpha", type=float, default=0.3)
    p.add_argument("--prompt-lookup", action=argparse.BooleanOptionalAction, default=None,
                   help="drafts from the context (n-gram lookup in prompt and output): grafted into the Medusa tree, or "
                        "verified as a 4-token chain without heads (default: on with Medusa, off without)")
    return p


def medusa_options(args) -> MedusaOptions:
    return MedusaOptions(args.medusa_enabled, args.medusa_heads, args.medusa_num_heads, args.medusa_num_layers,
                         args.medusa_choices)


def effective_temperature(temperature: float) -> float:
    """The temperature generation runs at: too small to sample (see MIN_TEMPERATURE) is greedy."""
    return 0.0 if 0 <= temperature < MIN_TEMPERATURE else temperature


def check_seed(seed: int | None) -> int | None:
    # numpy's generators take non-negative integers only (a negative seed raised deep inside generation)
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def generation_config(args) -> GenerationConfig:
    if args.temperature != args.temperature or args.temperature in (float("inf"), float("-inf")):
        raise ValueError(f"temperature must be a finite number, got {args.temperature}")
    return GenerationConfig(max_new_tokens=args.max_generate_tokens, temperature=effective_temperature(args.temperature),
                            top_k=args.top_k, top_p=args.top_p, seed=check_seed(args.seed),
                            medusa_sampling=args.medusa_sampling, posterior_threshold=args.posterior_threshold,
                            posterior_alpha=args.posterior_alpha, prompt_lookup=args.prompt_lookup)


def session_from_args(args) -> Session:
    return open_session(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                        medusa=medusa_options(args), weights=args.weights)


def first_run_notice(file=None) -> None:
    """One stderr line before the first generation of a process: kernel compilation and step capture are silent
    for 30-60 s on a 2-core CPU, which otherwise looks like a hang."""
    print(f"exo-medusa: {FIRST_RUN_NOTICE}", file=file or sys.stderr, flush=True)
