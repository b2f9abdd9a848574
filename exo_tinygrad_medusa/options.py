"""Command-line options every subcommand shares, and opening a Session from them.

It sits below every command module (cli, server, bench, tune, train_cli): they all import it and it imports none
of them, so `cli.py` only dispatches.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .model.registry import DEFAULT_MODEL, ModelNotFound
from .decoding.sampling import GenerationConfig
from .decoding.capture_cache import StoredSession, open_session_stored
from .decoding.constraints import ResponseFormat
from .decoding.session import MedusaOptions, Session, open_session
from .decoding.tree import load_tree

USER_ERRORS = (ValueError, FileNotFoundError, ModelNotFound, PermissionError, NotADirectoryError)

# below this, sampling is the argmax in all but float ties, and logits / temperature overflows float64 near 1e-306
# (NaN probabilities): such temperatures decode greedily
MIN_TEMPERATURE = 1e-6


def model_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model card id, HF directory, .gguf file or HF repo id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None,
                   help="tinygrad device, e.g. CPU, CUDA, METAL, CL (default: DEV if set, else a GPU backend (METAL, AMD, "
                        "NV, CUDA) when one opens, else the CPU; an OpenCL driver alone keeps the CPU; --verbose logs why)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weights and activations (default float32 on CPU, float16 elsewhere)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache length in tokens (default 2048)")
    p.add_argument("--weights", choices=["compact", "float32"], default=None,
                   help="compact: a GGUF's codes (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q4_K/Q5_K/Q6_K) stay packed as stored "
                        "(0.56-1.08 bytes a weight) and a safetensors checkpoint's bfloat16/float16 matrices in 16 bits, "
                        "widened inside each product (the same float32 values, 2-7x fewer bytes read than float32; "
                        "default in float32); float32: widened on load")
    p.add_argument("--activations", choices=["float32", "q8"], default="float32",
                   help="inputs of the packed products: float32 (exact, default) or q8: rounded to int8 per 32 values "
                        "as llama.cpp does and multiplied with AVX512-VNNI (Q4_0/Q4_1/Q8_0/Q4_K/Q5_K codes of a GGUF "
                        "on a CPU that has it; several times less arithmetic, slightly different numbers)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    m = p.add_argument_group("Medusa")
    m.add_argument("--medusa-enabled", "--medusa", dest="medusa_enabled", action="store_true",
                   help="speculative decoding with Medusa heads")
    m.add_argument("--medusa-heads", default=None, help="heads directory or HF repo id (default: the model card's)")
    m.add_argument("--medusa-num-heads", type=int, default=None, help="use only the first N heads")
    m.add_argument("--medusa-num-layers", type=int, default=None, help="ResBlocks per head (must match the checkpoint)")
    m.add_argument("--medusa-choices", default=None,
                   help="tree: chain-N, cpu-4/8/12/16, mc_sim_7b_63, or a JSON file (default: tuned tree or per device)")
    m.add_argument("--draft-head", default=None, metavar="DIR",
                   help="a feature-level draft head (exo-medusa train-draft-head) in place of the Medusa heads: greedy "
                        "decoding only")
    m.add_argument("--draft-depth", type=int, default=None, help="tokens the draft head drafts a step (default 3)")
    return p


def generation_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-generate-tokens", type=int, default=256, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 decodes greedily")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set holding this much probability")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: a fresh one each run)")
    p.add_argument("--medusa-sampling", choices=["typical", "exact"], default="typical",
                   help="acceptance when temperature > 0: typical (Medusa paper, fast, approximate) or exact (lossless)")
    p.add_argument("--posterior-threshold", type=float, default=0.09,
                   help="typical acceptance: accept a draft token whose probability exceeds this")
    p.add_argument("--posterior-alpha", type=float, default=0.3,
                   help="typical acceptance: ... or exceeds alpha * exp(-entropy)")
    p.add_argument("--prompt-lookup", action=argparse.BooleanOptionalAction, default=None,
                   help="drafts from the context (prompt and output) and the model's datastore, verified as chains of "
                        "2-8 tokens sized each step to what they are expected to return (default: on with Medusa, "
                        "off without)")
    return p


def medusa_options(args) -> MedusaOptions:
    return MedusaOptions(args.medusa_enabled, args.medusa_heads, args.medusa_num_heads, args.medusa_num_layers,
                         args.medusa_choices, args.draft_head, args.draft_depth or 3)


def effective_temperature(temperature: float) -> float:
    """The temperature generation runs at: too small to sample (see MIN_TEMPERATURE) is greedy."""
    return 0.0 if 0 <= temperature < MIN_TEMPERATURE else temperature


def check_seed(seed: int | None) -> int | None:
    # numpy's generators take non-negative integers only (a negative seed raised deep inside generation)
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


# GenerationConfig's own checks name its fields; on the command line the same checks name the flags
_FLAG_CHECKS = (
    ("max_generate_tokens", lambda v: v >= 1, "--max-generate-tokens must be >= 1"),
    ("top_k", lambda v: v >= 0, "--top-k must be >= 0"),
    ("top_p", lambda v: 0 < v <= 1, "--top-p must be in (0, 1]"),
    ("posterior_threshold", lambda v: 0 < v <= 1, "--posterior-threshold must be in (0, 1]"),
    ("posterior_alpha", lambda v: v > 0, "--posterior-alpha must be > 0"),
)


def generation_config(args) -> GenerationConfig:
    if args.temperature != args.temperature or args.temperature in (float("inf"), float("-inf")):
        raise ValueError(f"--temperature must be a finite number, got {args.temperature}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    for name, ok, message in _FLAG_CHECKS:
        if not ok(getattr(args, name)):
            raise ValueError(f"{message}, got {getattr(args, name)}")
    return GenerationConfig(max_new_tokens=args.max_generate_tokens, temperature=effective_temperature(args.temperature),
                            top_k=args.top_k, top_p=args.top_p, seed=check_seed(args.seed),
                            medusa_sampling=args.medusa_sampling, posterior_threshold=args.posterior_threshold,
                            posterior_alpha=args.posterior_alpha, prompt_lookup=args.prompt_lookup)


def check_model_args(args) -> None:
    """What can be checked about the model options before loading anything (loading takes seconds)."""
    if args.max_context is not None and args.max_context < 2:
        raise ValueError(f"--max-context must be >= 2, got {args.max_context}")
    medusa_only = {"--medusa-heads": args.medusa_heads, "--medusa-num-heads": args.medusa_num_heads,
                   "--medusa-num-layers": args.medusa_num_layers, "--medusa-choices": args.medusa_choices}
    draft_only = {"--draft-head": args.draft_head, "--draft-depth": args.draft_depth}
    given = [flag for flag, value in {**medusa_only, **draft_only}.items() if value is not None]
    if given and not args.medusa_enabled:
        raise ValueError(f"Medusa options were given without --medusa-enabled: {', '.join(given)}")
    heads_given = [flag for flag, value in medusa_only.items() if value is not None]
    if args.draft_head is not None and heads_given:
        raise ValueError(f"--draft-head replaces the Medusa heads and their tree: drop {', '.join(heads_given)}")
    if args.draft_depth is not None and args.draft_head is None:
        raise ValueError("--draft-depth needs --draft-head")
    if args.draft_depth is not None and not 1 <= args.draft_depth <= 7:
        raise ValueError(f"--draft-depth must be in 1..7 (the longest draft chain verifies 8 tokens), got {args.draft_depth}")
    for flag in ("--medusa-num-heads", "--medusa-num-layers"):
        if medusa_only[flag] is not None and medusa_only[flag] < 1:
            raise ValueError(f"{flag} must be >= 1, got {medusa_only[flag]}")
    if args.medusa_choices is not None:
        try:
            load_tree(args.medusa_choices)
        except ValueError as e:
            raise ValueError(f"--medusa-choices: {e}") from None


# shared model options some commands cannot honour: flag -> (attribute, the value that means "not given")
_LOAD_OPTIONS = {"--weights": ("weights", None), "--activations": ("activations", "float32")}


def refuse_load_options(args, command: str, why: str) -> None:
    """For commands that load the model their own way: --weights/--activations given to them are refused by name,
    never silently ignored."""
    given = [flag for flag, (dest, unset) in _LOAD_OPTIONS.items() if getattr(args, dest, unset) != unset]
    if given:
        raise ValueError(f"{command} does not take {' or '.join(given)}: {why}")


def response_format(args) -> ResponseFormat | None:
    """--json-object or --json-schema FILE (read, parsed and compiled here, before the model loads), else None."""
    if getattr(args, "json_object", False):
        return ResponseFormat.json_object()
    path = getattr(args, "json_schema", None)
    if path is None:
        return None
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema {path}: cannot read it ({type(e).__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--json-schema {path}: not valid JSON ({e})") from None
    # OpenAI's wrapper ({"name": ..., "schema": {...}}) is taken as well as the bare schema
    if isinstance(schema, dict) and isinstance(schema.get("schema"), dict) and "name" in schema:
        schema = schema["schema"]
    try:
        fmt = ResponseFormat.json_schema(schema, Path(path).stem)
        fmt.check()
    except ValueError as e:
        raise ValueError(f"--json-schema {path}: {e}") from None
    return fmt


def read_prompt(args) -> str:
    """--prompt TEXT, --prompt - (stdin) or --prompt-file FILE, read as UTF-8 text."""
    if getattr(args, "prompt_file", None):
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: cannot read it ({type(e).__name__}: {e})") from None
    elif args.prompt == "-":
        text = sys.stdin.read()
    else:
        text = args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


def session_from_args(args) -> Session:
    return open_session(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                        medusa=medusa_options(args), weights=args.weights, activations=args.activations)


def stored_session_from_args(args, use_store: bool = True) -> tuple[Session, StoredSession]:
    """session_from_args, loaded from the session a previous run stored when there is one (capture_cache). Stored
    sessions hold float32-activation kernels only: --activations q8 builds its session every run, as does a draft
    head (its captures are not stored)."""
    if args.activations != "float32" or args.draft_head is not None:
        return session_from_args(args), StoredSession(None)
    return open_session_stored(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                               medusa=medusa_options(args), weights=args.weights, use_store=use_store)
