"""`exo-medusa`: run, serve, train-heads, eval-heads, bench, tune-tree; Exo's own flags start Exo with our engine."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .registry import DEFAULT_MODEL, ModelNotFound
from .sampling import GenerationConfig
from .session import MedusaOptions, Session, open_session
from .tokenizer import StreamDecoder

USER_ERRORS = (ValueError, FileNotFoundError, ModelNotFound, PermissionError, NotADirectoryError)


def model_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model card id, HF directory, .gguf file or HF repo id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="tinygrad device, e.g. CPU, CUDA, METAL (default: tinygrad's default)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weights and activations (default float32 on CPU, float16 elsewhere)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache length in tokens (default 2048)")
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
    return p


def medusa_options(args) -> MedusaOptions:
    return MedusaOptions(args.medusa_enabled, args.medusa_heads, args.medusa_num_heads, args.medusa_num_layers,
                         args.medusa_choices)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_generate_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, medusa_sampling=args.medusa_sampling,
                            posterior_threshold=args.posterior_threshold, posterior_alpha=args.posterior_alpha)


def session_from_args(args) -> Session:
    return open_session(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                        medusa=medusa_options(args))


def cmd_run(args) -> int:
    cfg = generation_config(args)
    session = session_from_args(args)
    prompt_ids = session.prompt_ids(args.prompt, chat_template=not args.no_chat_template)
    stream = StreamDecoder(session.tokenizer, skip_special_tokens=True)
    on_tokens = None if args.json else (lambda ids: print(stream.feed(ids), end="", flush=True))
    result = session.generator.generate(prompt_ids, cfg, on_tokens)
    text_ids = [t for t in result.generated_ids if t not in session.tokenizer.eos_token_ids]
    report = {
        "model": session.loaded.resolved.model_id, "device": session.loaded.device, "dtype": session.loaded.dtype,
        "medusa": session.heads is not None, "tree": session.tree.name, "tree_size": session.tree.size,
        "prompt_ids": prompt_ids, "generated_ids": result.generated_ids,
        "text": session.tokenizer.decode(text_ids, skip_special_tokens=True),
        "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        "steps": result.steps, "mean_accepted": round(result.mean_accepted, 3),
        "accept_histogram": result.accept_histogram, "finish_reason": result.finish_reason,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(stream.flush())
        print(f"{len(result.generated_ids)} tokens, prefill {report['prefill_tokens_per_s']} tok/s, decode "
              f"{report['decode_tokens_per_s']} tok/s, mean accepted {report['mean_accepted']} tokens/step "
              f"({result.steps} steps, tree {session.tree.name}, {result.finish_reason})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-medusa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[model_args(), generation_args()], help="generate text for one prompt")
    run.add_argument("--prompt", default="Who are you?")
    run.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.set_defaults(func=cmd_run)
    for module in _subcommand_modules():
        module.register(sub, model_args, generation_args)
    return parser


def _subcommand_modules() -> list:
    from . import bench, server, train_cli
    return [server, train_cli, bench]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--inference-engine" or a.startswith("--inference-engine=") for a in argv):  # Exo's own command line
        from .exo_patch import run_exo
        return run_exo(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"exo-medusa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
