"""`exo-medusa`: run, serve, train-heads, eval-heads, bench, tune-tree; Exo's own flags start Exo with our engine.

Only dispatch and `run` live here; shared options and session opening are in options.py, which every command imports.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .options import USER_ERRORS, first_run_notice, generation_args, generation_config, model_args, session_from_args
from .model.tokenizer import StreamDecoder


def cmd_run(args) -> int:
    cfg = generation_config(args)
    session = session_from_args(args)
    prompt_ids = session.prompt_ids(args.prompt, chat_template=not args.no_chat_template)
    stream = StreamDecoder(session.tokenizer, skip_special_tokens=True)
    on_tokens = None if args.json else (lambda ids: print(stream.feed(ids), end="", flush=True))
    if not args.json:
        session.generator.check_prompt(prompt_ids)  # a bad prompt is one error line, not the notice and then an error
        first_run_notice()
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
    from .bench import bench, bench_ring, tune
    from .serving import server
    from .training import cli as train_cli
    return [server, train_cli, bench, tune, bench_ring]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--inference-engine" or a.startswith("--inference-engine=") for a in argv):  # Exo's own command line
        from .serving.exo_patch import run_exo
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
