"""Constrained decoding: OpenAI's `response_format` (JSON mode, a JSON schema) as a mask over the vocabulary at each
generated position, from llguidance's grammar engine (the one llama.cpp and vLLM use) over the tokenizer's token
strings.

A `ResponseFormat` is what a request asks for, checked and compiled to an llguidance grammar before any generation
(a schema llguidance cannot compile is the client's error). A `Constraint` follows one generation: the grammar's
state after the tokens emitted so far, the tokens it allows next, and, for a Medusa step, the mask at every node of
the drafted tree (`tree_masks`). The base model's choice at each node is then made among the allowed tokens only
(argmax or sampling over the masked logits), so greedy constrained Medusa emits what greedy constrained plain
decoding does, and sampling is exact with respect to the masked distribution where the acceptance rule is.

Before verification the tree is walked from the root with the grammar: a node whose token the grammar forbids can
never be accepted, so its subtree is dead (no masks computed there); where the grammar forces what comes next (a
schema's property names, punctuation: llguidance's fast-forward tokens), the forced token takes the place of a
forbidden one, so constraints add accepted tokens instead of costing them. The tree keeps its captured shape.

JSON is written without free whitespace (", " and ": " as separators, as Python's json.dumps writes them): a model
cannot spend its token budget on blank lines, and the reply closes as soon as its value does. EOS is allowed only
where the grammar accepts; once the value is complete, EOS is the only token left, so the reply ends by itself.
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import numpy as np
from llguidance import LLMatcher, LLTokenizer

from .tree import MedusaTree

# llguidance's JSON compile options: no free whitespace, the separators of json.dumps (what models most often write)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_object", "json_schema")
MAX_NAME_CHARS = 64  # as OpenAI


@dataclass(frozen=True)
class ResponseFormat:
    """JSON mode ("json_object": any JSON object) or a JSON schema ("json_schema"); schema is its JSON text, so that
    the format is hashable like the GenerationConfig that carries it."""
    kind: str
    schema: str = ""
    name: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"response_format type must be one of text, {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "json_schema" and not isinstance(json.loads(self.schema or "null"), dict):
            raise ValueError("a json_schema response format needs a schema object")

    @classmethod
    def json_object(cls) -> "ResponseFormat":
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict, name: str = "schema") -> "ResponseFormat":
        if not isinstance(schema, dict):
            raise ValueError(f"the JSON schema must be an object, got {type(schema).__name__}")
        # property order is kept: llguidance writes the properties in the order the schema lists them
        return cls("json_schema", json.dumps(schema), name)

    @classmethod
    def from_openai(cls, value) -> "ResponseFormat | None":
        """An OpenAI request's `response_format`: None for text, else the format; ValueError names what is wrong."""
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise ValueError('response_format must be an object like {"type": "json_object"}')
        kind = value["type"]
        extra = set(value) - {"type", "json_schema"}
        if kind == "text" or kind == "json_object":
            if extra or "json_schema" in value:
                raise ValueError(f'response_format of type "{kind}" takes no other field, got '
                                 f'{", ".join(sorted(set(value) - {"type"}))}')
            return None if kind == "text" else cls.json_object()
        if kind != "json_schema":
            raise ValueError(f"response_format type must be one of text, {', '.join(KINDS)}, got {kind!r}")
        spec = value.get("json_schema")
        if extra or not isinstance(spec, dict):
            raise ValueError('response_format of type "json_schema" needs "json_schema": {"name": ..., "schema": '
                             '{...}} and nothing else')
        unknown = set(spec) - {"name", "schema", "strict", "description"}
        if unknown:
            raise ValueError(f"response_format.json_schema has unknown fields: {', '.join(sorted(unknown))}")
        name = spec.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or \
                not all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
            raise ValueError(f"response_format.json_schema.name must be 1 to {MAX_NAME_CHARS} characters of a-z, "
                             "A-Z, 0-9, _ and -")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise ValueError("response_format.json_schema.strict must be true or false")
        if not isinstance(spec.get("description", ""), str):
            raise ValueError("response_format.json_schema.description must be a string")
        # without a schema, OpenAI's json_schema format allows any JSON object: so does this one
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return cls.json_schema(schema, name)

    def grammar(self) -> str:
        """The llguidance grammar (not yet checked: `check` does)."""
        schema = json.loads(self.schema) if self.kind == "json_schema" else {"type": "object"}
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)

    def check(self, vocabulary: LLTokenizer | None = None) -> str:
        """The grammar, or ValueError with llguidance's reason when it cannot compile (an unknown type or format, a
        bad pattern, a dangling $ref, an unsupported keyword)."""
        grammar = self.grammar()
        error = LLMatcher.validate_grammar(grammar, vocabulary)
        if error:
            what = "JSON schema" if self.kind == "json_schema" else "JSON grammar"
            # one line: llguidance's messages may span several (a regex error draws a caret under the pattern)
            raise ValueError(f"the {what} cannot be compiled for constrained decoding: {' '.join(error.split())}")
        return grammar


# one llguidance vocabulary per tokenizer (building it reads every token's bytes: 0.3 s for 49k tokens)
_vocabularies: "weakref.WeakKeyDictionary[object, dict[int, LLTokenizer]]" = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer, vocab_size: int | None = None) -> LLTokenizer:
    """llguidance's view of `tokenizer` (model/tokenizer.Tokenizer): every token's bytes and the EOS ids, over
    vocab_size ids (the model's logits; at least the tokenizer's), made once per tokenizer and size."""
    n_vocab = max(vocab_size or 0, tokenizer.vocab_size)
    with _vocabularies_lock:
        built = _vocabularies.setdefault(tokenizer, {})
        if n_vocab not in built:
            built[n_vocab] = LLTokenizer(tokenizer.tok.to_str(), n_vocab=n_vocab,
                                         eos_token=list(tokenizer.eos_token_ids))
        return built[n_vocab]


class Constraint:
    """One generation under a grammar: the tokens allowed next (`allowed`), the emitted tokens (`advance`), and the
    masks over a drafted tree (`tree_masks`). vocab_size: the model's logits, which the masks cover."""

    def __init__(self, fmt: ResponseFormat, tokenizer, vocab_size: int):
        self.vocabulary = vocabulary(tokenizer, vocab_size)
        self.matcher = LLMatcher(self.vocabulary, fmt.check(self.vocabulary), log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"constrained decoding cannot start: {self.matcher.get_error()}")
        self.vocab_size, self.eos_ids = vocab_size, set(tokenizer.eos_token_ids)

    @property
    def accepting(self) -> bool:
        """The tokens so far are a complete value (EOS may end the reply here)."""
        return self.matcher.is_accepting()

    def allowed(self) -> np.ndarray:
        """(vocab_size,) bool: the tokens the grammar allows after what was emitted so far (EOS once it accepts)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        if len(mask) < self.vocab_size:  # ids past the tokenizer's (padding rows of the logits) are never allowed
            mask = np.concatenate([mask, np.zeros(self.vocab_size - len(mask), dtype=bool)])
        if not mask.any():
            raise RuntimeError(f"the grammar allows no token here ({self.matcher.get_error() or 'no error reported'})")
        return mask

    def forced(self) -> list[int]:
        """The tokens the grammar forces next (a schema's property name, punctuation), canonically tokenised."""
        return self.matcher.compute_ff_tokens()

    def advance(self, tokens) -> None:
        """Emitted tokens, up to and including the first EOS (nothing after it is emitted)."""
        for t in tokens:
            if not self.matcher.consume_token(int(t)):
                raise RuntimeError(f"token {int(t)} was emitted against the grammar: {self.matcher.get_error()}")
            if int(t) in self.eos_ids:
                return

    def tree_masks(self, tree: MedusaTree, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The drafted tree's tokens (tokens[0], its root, already emitted and advanced past) with forced tokens put
        in the place of forbidden ones, and the (T, vocab_size) bool masks: row i, the tokens allowed after node i.
        Rows of dead nodes (under a forbidden token, or past an EOS) are all True: acceptance never reaches them,
        and their logits stay finite."""
        tokens = np.array(tokens, copy=True)
        masks = np.ones((tree.size, self.vocab_size), dtype=bool)
        children = _children(tree)

        def visit(node: int) -> None:  # the matcher stands after `node`'s token; it is left there
            masks[node] = mask = self.allowed()
            kids = children[node]
            if not kids:
                return
            forced = self.forced()
            held = {int(tokens[k]) for k in kids}
            if forced and mask[forced[0]] and forced[0] not in held:
                # the lowest-ranked kid holding a forbidden token makes room for the forced one (siblings stay
                # distinct, as exact sampling's acceptance needs)
                spare = next((k for k in kids if not mask[int(tokens[k])]), None)
                if spare is not None:
                    tokens[spare] = forced[0]
            for kid in kids:
                token = int(tokens[kid])
                if not mask[token] or token in self.eos_ids:
                    continue  # forbidden: dead subtree; EOS: nothing after it is emitted
                if not self.matcher.consume_token(token):
                    raise RuntimeError(f"the grammar refused token {token} that its mask allowed: "
                                       f"{self.matcher.get_error()}")
                visit(kid)
                self.matcher.rollback(1)

        visit(0)
        return tokens, masks


_children_of: "weakref.WeakKeyDictionary[MedusaTree, list[list[int]]]" = weakref.WeakKeyDictionary()


def _children(tree: MedusaTree) -> list[list[int]]:
    """Each node's children, lowest rank first (choices are sorted, so node order is rank order among siblings)."""
    if tree not in _children_of:
        kids: list[list[int]] = [[] for _ in range(tree.size)]
        for node in range(1, tree.size):
            kids[int(tree.parents[node])].append(node)
        for k in kids:
            k.sort(key=lambda n: int(tree.node_rank[n]))
        _children_of[tree] = kids
    return _children_of[tree]
