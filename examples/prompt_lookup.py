"""Prompt lookup, measured: plain greedy, plain + lookup chain, Medusa, Medusa + lookup on the same prompts, in one
process on one model (the decoders alternate per prompt, so load changes hit them alike).

    python examples/prompt_lookup.py [--prompts examples/summary_prompts.jsonl] [--tokens 96] [--tree cpu-4] [--limit N]

Prints one JSON line per (prompt, decoder) and a summary per decoder: mean accepted tokens per verify step, decode
tokens/s, and whether the text equals plain greedy."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.heads import load_heads
from exo_tinygrad_medusa.decoding.tree import load_tree
from exo_tinygrad_medusa.prompts import load_prompts
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions, open_session, resolve_heads_path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", default=str(HERE / "summary_prompts.jsonl"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--tree", default="cpu-4")
    ap.add_argument("--decoders", default="plain,plain+lookup,medusa,medusa+lookup")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    session = open_session(args.model, max_context=2048)
    loaded, model = session.loaded, session.loaded.model
    heads = load_heads(resolve_heads_path(loaded, MedusaOptions(True)), loaded.config, model.lm_head)
    tree, eos = load_tree(args.tree), loaded.tokenizer.eos_token_ids
    plain, medusa = session.generator, Generator(model, eos, tree, heads)
    decoders = {"plain": (plain, False), "plain+lookup": (plain, True), "medusa": (medusa, False),
                "medusa+lookup": (medusa, True)}
    chosen = [d for d in args.decoders.split(",") if d]
    for name in chosen:  # warm-up: capture every step kind outside the timings
        gen, lookup = decoders[name]
        gen.generate(session.prompt_ids("Repeat: a b c a b c a b"), GenerationConfig(12, prompt_lookup=lookup))
    stats = {name: {"accepted": [], "tok_s": [], "identical": 0, "lookup_steps": 0, "steps": 0} for name in chosen}
    for prompt in load_prompts(args.prompts, args.limit):
        ids = session.prompt_ids(prompt.text)
        reference = None
        for name in chosen:
            gen, lookup = decoders[name]
            r = gen.generate(ids, GenerationConfig(args.tokens, prompt_lookup=lookup))
            reference = reference if reference is not None else r.generated_ids
            s = stats[name]
            s["accepted"] += r.accept_lengths
            s["tok_s"].append(r.decode_tokens_per_s)
            s["identical"] += r.generated_ids == reference
            s["lookup_steps"] += r.lookup_steps
            s["steps"] += r.steps
            print(json.dumps({"prompt": prompt.id, "decoder": name, "prompt_tokens": len(ids),
                              "new_tokens": len(r.generated_ids), "mean_accepted": round(r.mean_accepted, 3),
                              "lookup_steps": r.lookup_steps, "steps": r.steps,
                              "decode_tok_s": round(r.decode_tokens_per_s, 2),
                              "identical_to_first_decoder": r.generated_ids == reference}), flush=True)
    for name, s in stats.items():
        print(json.dumps({"decoder": name, "tree": args.tree if "medusa" in name else "chain-4" if "lookup" in name
                          else "plain", "mean_accepted": round(float(np.mean(s["accepted"])), 3),
                          "decode_tok_s_mean": round(float(np.mean(s["tok_s"])), 2),
                          "lookup_steps": s["lookup_steps"], "steps": s["steps"], "identical": s["identical"]}))


if __name__ == "__main__":
    main()
