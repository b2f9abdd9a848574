"""exo-medusa: Medusa speculative decoding on tinygrad. Greedy output is token-identical to plain greedy decoding.

  exo-medusa run --medusa-enabled --prompt "Who are you?"     generate with the embedded SmolLM2-135M-Instruct
  exo-medusa serve --medusa-enabled                            OpenAI-compatible server on 127.0.0.1:8000
  exo-medusa bench --medusa-enabled                            plain vs Medusa side by side
  exo --inference-engine tinygrad --medusa-enabled             classic Exo with this engine (Exo's own flags)

Run `exo-medusa COMMAND --help` for a command's options."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace

from .options import (USER_ERRORS, check_model_args, generation_args, generation_config, model_args,
                      read_prompt, response_format, stored_session_from_args)
from .model.tokenizer import StreamDecoder
from .status import Status


def cmd_run(args) -> int:
    started = time.perf_counter()
    cfg = generation_config(args)       # every option is checked before the model loads
    cfg = replace(cfg, response_format=response_format(args))
    check_model_args(args)
    prompt = read_prompt(args)
    status = Status(enabled=not args.json)
    status.show(f"loading {args.model}")
    session, store = stored_session_from_args(args, use_store=not args.no_step_cache)
    prompt_ids = session.prompt_ids(prompt, chat_template=not args.no_chat_template)
    session.generator.check_prompt(prompt_ids)
    if store.hit:  # a stored session's steps replay at once; steps it lacks are captured when first used
        status.show("preparing the stored steps")
        store.prepare(session, prompt_ids, cfg)
    else:
        status.show("compiling kernels and capturing steps (about a minute on a 2-core CPU, more on a first run; "
                    "the next run starts from what this one stores)" if store.path else
                    "compiling kernels and capturing steps (about a minute on a 2-core CPU, more on a first run)")
        session.warm_up(prompt_ids, cfg)
    status.clear()
    stream = StreamDecoder(session.tokenizer, skip_special_tokens=True)
    first_token_at = []

    def on_tokens(ids):
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        if not args.json:
            print(stream.feed(ids), end="", flush=True)

    t0 = time.perf_counter()
    result = session.generator.generate(prompt_ids, cfg, on_tokens)
    text_ids = [t for t in result.generated_ids if t not in session.tokenizer.eos_token_ids]
    report = {
        "model": session.loaded.resolved.model_id, "device": session.loaded.device, "dtype": session.loaded.dtype,
        "medusa": session.heads is not None, "tree": session.tree.name, "tree_size": session.tree.size,
        "prompt_ids": prompt_ids, "generated_ids": result.generated_ids,
        "text": session.tokenizer.decode(text_ids, skip_special_tokens=True),
        "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        "first_token_s": round(first_token_at[0] - t0, 4) if first_token_at else None,
        "startup_s": round(t0 - started, 2), "stored_session": store.hit,
        "steps": result.steps, "mean_accepted": round(result.mean_accepted, 3),
        "accept_histogram": result.accept_histogram, "finish_reason": result.finish_reason,
        "response_format": cfg.response_format.kind if cfg.response_format else "text",
    }
    startup = "a stored session loaded" if store.hit else "loading, compiling, capturing"
    if args.json:
        print(json.dumps(report))
    else:
        print(stream.flush())
        print(f"{len(result.generated_ids)} tokens ({result.finish_reason}): decode {report['decode_tokens_per_s']} tok/s "
              f"with compiled, captured steps; first token {report['first_token_s']} s after the prompt, "
              f"{report['mean_accepted']} tokens a step over {result.steps} steps (tree {session.tree.name}); "
              f"start-up {report['startup_s']} s ({startup})", file=sys.stderr)
        if cfg.response_format and result.finish_reason == "length":
            print("exo-medusa: the token budget ran out before the JSON closed: the reply is cut "
                  "(raise --max-generate-tokens)", file=sys.stderr)
    store.save_if_grown(session)  # after the output: the next run starts from these captures
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-medusa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", parents=[model_args(), generation_args()], help="generate text for one prompt",
                         description="Generate a reply to one prompt and stream it to stdout; a summary goes to stderr.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = run.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="Who are you?", help="the user's message ('-' reads it from stdin)")
    source.add_argument("--prompt-file", default=None, metavar="FILE", help="read the user's message from FILE")
    run.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text, without the chat template")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    fmt = run.add_mutually_exclusive_group()
    fmt.add_argument("--json-object", action="store_true",
                     help="constrained decoding: the reply is a JSON object (JSON mode)")
    fmt.add_argument("--json-schema", default=None, metavar="FILE",
                     help="constrained decoding: the reply is JSON valid against the schema in FILE (a JSON schema, "
                          "or OpenAI's {\"name\": ..., \"schema\": {...}})")
    run.add_argument("--no-step-cache", action="store_true",
                     help="build the session from the checkpoint, without loading or storing its captured steps "
                          "(stored in EXO_MEDUSA_CACHE_DIR, default ~/.cache/exo-tinygrad-medusa)")
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
