"""JSON mode and JSON schemas, measured: plain greedy and Medusa greedy (shipped heads, drafts planned) under the same
constraint, on the same prompts, in one process on one model (the decoders alternate per prompt, so load changes
hit them alike); plain greedy without a constraint on the same prompts gives the cost of a free-text step. A small
model loops inside unbounded strings and arrays until its budget runs out: the schemas bound them, as schemas for
small models should.

    python examples/json_mode.py [--model smollm2-135m] [--tokens 160] [--tree cpu-4]

Prints one JSON line per (prompt, decoder): the reply, whether it parses and validates, decode tokens/s, tokens
per verify step, where the steps' drafts came from; then a summary per decoder, and whether Medusa's tokens equal
plain decoding's on every prompt."""
from __future__ import annotations

import argparse
import json
import logging

import numpy as np

from exo_tinygrad_medusa.decoding.constraints import ResponseFormat
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions, open_session
from exo_tinygrad_medusa.decoding.tree import PLAIN

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}},
    "required": ["name", "age", "email", "hobbies"], "additionalProperties": False}
CASES = [
    ("Describe a fictional person as JSON with name, age, email and hobbies.", PERSON),
    ("Give three cities in France with their population, as JSON.", {"type": "object", "properties": {
        "cities": {"type": "array", "items": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
            "required": ["city", "population"], "additionalProperties": False}, "maxItems": 3}},
        "required": ["cities"], "additionalProperties": False}),
    ("Is the sky blue? Answer as JSON with a boolean and a short reason.", {"type": "object", "properties": {
        "answer": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 80}},
        "required": ["answer", "reason"], "additionalProperties": False}),
    ("Classify the sentiment of 'I love this phone' as JSON.", {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number"}},
        "required": ["sentiment", "confidence"], "additionalProperties": False}),
    ("A recipe for pancakes as JSON: title, servings and ingredients with amounts.", {"type": "object", "properties": {
        "title": {"type": "string"}, "servings": {"type": "integer"},
        "ingredients": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "amount": {"type": "string"}},
            "required": ["name", "amount"], "additionalProperties": False}, "maxItems": 5}},
        "required": ["title", "servings", "ingredients"], "additionalProperties": False}),
    ("List two programming languages and their creators as a JSON object.", None),  # JSON mode
]


def valid(text: str, schema: dict | None) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    try:
        import jsonschema
    except ImportError:  # a test dependency: without it, parsing is what is checked
        return True
    return isinstance(value, dict) if schema is None else jsonschema.Draft202012Validator(schema).is_valid(value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--tree", default=None, help="Medusa tree (default: the session's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    session = open_session(args.model, max_context=2048, medusa=MedusaOptions(True, choices=args.tree))
    loaded, tok = session.loaded, session.tokenizer
    decoders = {"plain": Generator(loaded.model, tok.eos_token_ids, PLAIN, tokenizer=tok), "medusa": session.generator}
    for gen in decoders.values():  # capture every step kind (each draft size's host-logits step) outside the timings
        for prompt, schema in CASES[:2] * 2:
            fmt = ResponseFormat.json_object() if schema is None else ResponseFormat.json_schema(schema)
            gen.generate(session.prompt_ids(prompt), GenerationConfig(48, response_format=fmt))
    free_tok_s = []
    for prompt, _ in CASES[:1] + CASES:  # free text: the first run captures
        free_tok_s.append(decoders["plain"].generate(session.prompt_ids(prompt),
                                                     GenerationConfig(args.tokens)).decode_tokens_per_s)
    stats = {name: {"tok_s": [], "accepted": [], "valid": 0, "sources": {}} for name in decoders}
    identical = 0
    for prompt, schema in CASES:
        fmt = ResponseFormat.json_object() if schema is None else ResponseFormat.json_schema(schema)
        ids = session.prompt_ids(prompt)
        outputs = {}
        for name, gen in decoders.items():
            r = gen.generate(ids, GenerationConfig(args.tokens, response_format=fmt))
            text = tok.decode([t for t in r.generated_ids if t not in tok.eos_token_ids], skip_special_tokens=True)
            outputs[name] = r.generated_ids
            s = stats[name]
            s["tok_s"].append(r.decode_tokens_per_s)
            s["accepted"] += r.accept_lengths
            s["valid"] += valid(text, schema)
            for source, n in r.source_steps.items():
                s["sources"][source] = s["sources"].get(source, 0) + n
            print(json.dumps({"decoder": name, "prompt": prompt[:40], "finish": r.finish_reason,
                              "valid": valid(text, schema), "tokens": len(r.generated_ids),
                              "tok_s": round(r.decode_tokens_per_s, 1), "accepted": round(r.mean_accepted, 2),
                              "sources": r.source_steps, "text": text}), flush=True)
        identical += outputs["medusa"] == outputs["plain"]
    for name, s in stats.items():
        print(json.dumps({"decoder": name, "tree": getattr(decoders[name].tree, "name", ""),
                          "mean_tok_s": round(float(np.mean(s["tok_s"])), 1),
                          "accepted_per_step": round(float(np.mean(s["accepted"])), 2),
                          "valid": f"{s['valid']}/{len(CASES)}", "step_sources": s["sources"]}))
    print(json.dumps({"decoder": "plain, free text", "mean_tok_s": round(float(np.mean(free_tok_s[1:])), 1)}))
    print(json.dumps({"medusa_equals_plain": f"{identical}/{len(CASES)}"}))


if __name__ == "__main__":
    main()
