"""Constrained decoding (decoding/constraints.py): response formats as OpenAI writes them, the grammar's masks on the
tiny byte-level tokenizer, forced tokens filling a drafted tree, and whole generations on a tiny random model: every
reply parses and validates against its schema (jsonschema), and greedy constrained Medusa emits exactly what greedy
constrained plain decoding does."""
from __future__ import annotations

import json

import numpy as np
import pytest

from exo_tinygrad_medusa.decoding.constraints import Constraint, ResponseFormat, vocabulary
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.heads import load_heads, random_heads
from exo_tinygrad_medusa.decoding.lookup import LookupConfig
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions, default_tree_spec, resolve_heads_path
from exo_tinygrad_medusa.decoding.tree import PLAIN, MedusaTree, chain, load_tree
from exo_tinygrad_medusa.model.tokenizer import Tokenizer
from helpers_tokenizer import BYTE_OFFSET, write_tiny_tokenizer

jsonschema = pytest.importorskip("jsonschema")

# schemas whose replies are bounded (short strings, ranges, enums, few items), so that even a random model closes
# them well within the token budget: what they exercise is the grammar, not the model's taste
SCHEMAS = {
    "scalars": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": -5, "maximum": 999}},
        "required": ["name", "ok", "n"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
              "maxItems": 4},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
            "required": ["id", "tags"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 4}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "rating": {"type": "number", "minimum": 0, "maximum": 5}},
        "required": ["title"], "additionalProperties": False},
    "boolean": {"type": "boolean"},
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), 320))


def byte_id(char: str) -> int:
    return BYTE_OFFSET + ord(char)


# -- response_format as OpenAI writes it ----------------------------------------------------------------------------
def test_openai_response_formats():
    assert ResponseFormat.from_openai(None) is None and ResponseFormat.from_openai({"type": "text"}) is None
    assert ResponseFormat.from_openai({"type": "json_object"}) == ResponseFormat.json_object()
    fmt = ResponseFormat.from_openai({"type": "json_schema", "json_schema": {
        "name": "point", "strict": True, "schema": {"type": "object", "properties": {"y": {}, "x": {}}}}})
    assert fmt.kind == "json_schema" and fmt.name == "point"
    assert list(json.loads(fmt.schema)["properties"]) == ["y", "x"]  # the schema's order is the reply's order
    # no schema: any JSON object, as OpenAI's
    assert json.loads(ResponseFormat.from_openai({"type": "json_schema", "json_schema": {"name": "x"}}).schema) == \
        {"type": "object"}


@pytest.mark.parametrize("value, message", [
    ("json", "response_format must be an object"),
    ({"type": "xml"}, "response_format type must be one of text, json_object, json_schema, got 'xml'"),
    ({"type": "json_object", "schema": {}}, 'of type "json_object" takes no other field, got schema'),
    ({"type": "json_schema"}, 'needs "json_schema"'),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name must be 1 to 64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "json_schema.name must be"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "json_schema.schema must be a JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, "strict must be true or false"),
    ({"type": "json_schema", "json_schema": {"name": "x", "shema": {}}}, "unknown fields: shema"),
])
def test_bad_response_formats(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ResponseFormat.from_openai(value)


@pytest.mark.parametrize("schema, reason", [
    ({"type": "objekt"}, "Invalid type: objekt"),
    ({"type": "string", "pattern": "(("}, "unclosed group"),
    ({"$ref": "#/definitions/missing"}, "does not exist"),
    ({"type": "string", "format": "no-such-format"}, "Unknown format"),
])
def test_schemas_llguidance_cannot_compile(tokenizer, schema, reason):
    fmt = ResponseFormat.json_schema(schema)
    for vocab in (None, vocabulary(tokenizer)):
        with pytest.raises(ValueError, match=f"the JSON schema cannot be compiled for constrained decoding: .*{reason}"):
            fmt.check(vocab)


# -- masks, forced tokens, trees --------------------------------------------------------------------------------------
def test_masks_follow_the_grammar_and_eos_waits_for_a_complete_value(tokenizer):
    c = Constraint(ResponseFormat.json_schema(SCHEMAS["boolean"]), tokenizer, 330)
    allowed = c.allowed()
    assert allowed.shape == (330,) and not allowed[320:].any()  # padding rows of the logits: never
    assert allowed[byte_id("t")] and allowed[byte_id("f")] and not allowed[byte_id("x")]
    assert not allowed[tokenizer.eos_token_id] and not c.accepting
    assert c.forced() == []  # true or false: nothing forced yet
    c.advance([byte_id("t")])
    assert [tokenizer.decode([t]) for t in c.forced()] and tokenizer.decode(c.forced()) == "rue"
    c.advance(c.forced())
    assert c.accepting and np.flatnonzero(c.allowed()).tolist() == [tokenizer.eos_token_id]  # the value is complete
    with pytest.raises(RuntimeError, match="emitted against the grammar"):
        c.advance([byte_id("x")])


def test_tree_masks_prune_forbidden_nodes_and_fill_forced_tokens(tokenizer):
    schema = {"type": "object", "properties": {"ab": {"type": "boolean"}}, "required": ["ab"],
              "additionalProperties": False}
    c = Constraint(ResponseFormat.json_schema(schema), tokenizer, 320)
    c.advance([byte_id("{")])
    forced = c.forced()
    assert tokenizer.decode(forced) == '"ab":' and len(forced) >= 2  # the space may join the value's token
    # nodes: 0 the root "{" (already emitted); 1 and 2 its children (ranks 0 and 1); 3 under 1, 4 under 2
    tree = MedusaTree(((0,), (1,), (0, 0), (1, 0)))
    tokens = np.array([byte_id("{"), byte_id("x"), forced[0], byte_id("y"), byte_id("z")])
    filled, masks = c.tree_masks(tree, tokens)
    # node 2 already holds the forced token: node 1 ("x", forbidden) keeps its token and is dead, with its subtree;
    # under node 2 the forbidden "z" makes room for the next forced token
    assert filled.tolist() == [*tokens[:4], forced[1]]
    assert masks[0].tolist() == c.allowed().tolist() and not masks[0][byte_id("x")]
    assert masks[1].all() and masks[3].all()  # dead rows stay unmasked: acceptance never reaches them
    assert masks[2][forced[1]] and not masks[2].all() and not masks[4].all()
    filled, masks = c.tree_masks(tree, np.array([byte_id("{"), byte_id("x"), byte_id("q"), byte_id("y"), byte_id("z")]))
    # both children forbidden: the lowest-ranked takes the forced token, and its child the next forced one
    assert filled.tolist() == [byte_id("{"), forced[0], byte_id("q"), forced[1], byte_id("z")]
    assert masks[2].all() and masks[4].all() and not masks[3].all()
    assert c.forced() == forced  # the walk leaves the grammar where it was


def test_forced_chain_on_a_chain_tree(tokenizer):
    c = Constraint(ResponseFormat.json_schema({"enum": ["alpha"]}), tokenizer, 320)
    forced = c.forced()
    c.advance(forced[:1])
    filled, masks = c.tree_masks(chain(4), np.array([forced[0], 0, 0, 0, 0]))
    rest = forced[1:]
    assert filled[1:1 + len(rest)].tolist() == rest[:4]
    if len(rest) < 4:  # past the value's end only EOS is left: the next placeholder becomes nothing useful
        assert masks[len(rest)][tokenizer.eos_token_id]


# -- generation on a tiny random model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gens(tiny_model):
    loaded = tiny_model("llama", max_context=256)
    heads = random_heads(loaded.config, loaded.model.lm_head, num_heads=4, num_layers=1, seed=0)
    tok = loaded.tokenizer
    plain = Generator(loaded.model, tok.eos_token_ids, PLAIN, tokenizer=tok)
    medusa = Generator(loaded.model, tok.eos_token_ids, load_tree("cpu-8"), heads, tokenizer=tok)
    prompt = tok.encode_chat([{"role": "user", "content": "Answer in JSON."}])
    return plain, medusa, tok, prompt


def reply(tok, result) -> str:
    return tok.decode([t for t in result.generated_ids if t not in tok.eos_token_ids], skip_special_tokens=True)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_greedy_medusa_equals_plain_under_a_schema_and_replies_validate(gens, name):
    plain, medusa, tok, prompt = gens
    fmt = ResponseFormat.json_schema(SCHEMAS[name], name)
    want = plain.generate(prompt, GenerationConfig(max_new_tokens=80, response_format=fmt))
    assert want.finish_reason == "stop" and want.generated_ids[-1] in tok.eos_token_ids  # ended by itself
    jsonschema.validate(json.loads(reply(tok, want)), SCHEMAS[name])
    # the heads' tree every step (forced tokens fill it), and the planner's choice of drafts
    for lookup in (False, None):
        got = medusa.generate(prompt, GenerationConfig(max_new_tokens=80, response_format=fmt, prompt_lookup=lookup))
        assert got.generated_ids == want.generated_ids, lookup


def test_forced_tokens_are_accepted_even_from_random_heads(gens):
    plain, medusa, tok, prompt = gens
    schema = {"type": "object", "properties": {"first_property": {"type": "boolean"},
                                               "second_property": {"enum": ["yes", "no"]}},
              "required": ["first_property", "second_property"], "additionalProperties": False}
    cfg = GenerationConfig(max_new_tokens=80, response_format=ResponseFormat.json_schema(schema), prompt_lookup=False)
    got = medusa.generate(prompt, cfg)
    jsonschema.validate(json.loads(reply(tok, got)), schema)
    # random heads propose nothing useful, yet the property names come several tokens a step
    assert got.mean_accepted > 1.5 and max(got.accept_lengths) >= 4
    assert got.generated_ids == plain.generate(prompt, cfg).generated_ids
    # with drafts planned (the default for greedy Medusa), forced tokens are a draft source of their own
    planned = medusa.generate(prompt, GenerationConfig(max_new_tokens=80, response_format=cfg.response_format))
    assert planned.generated_ids == got.generated_ids
    assert planned.source_steps.get("grammar", 0) > 0 and planned.source_tokens["grammar"] > planned.source_steps["grammar"]


def test_json_object_mode(gens):
    plain, medusa, tok, prompt = gens
    cfg = GenerationConfig(max_new_tokens=60, response_format=ResponseFormat.json_object())
    want = plain.generate(prompt, cfg)
    assert isinstance(json.loads(reply(tok, want)), dict) and want.finish_reason == "stop"
    assert medusa.generate(prompt, cfg).generated_ids == want.generated_ids


@pytest.mark.parametrize("mode", ["typical", "exact"])
def test_sampled_replies_parse_and_validate(gens, mode):
    plain, medusa, tok, prompt = gens
    for name in ("nested", "scalars", "enums"):
        fmt = ResponseFormat.json_schema(SCHEMAS[name], name)
        for seed in range(2):
            for gen in (plain, medusa):
                got = gen.generate(prompt, GenerationConfig(max_new_tokens=80, temperature=1.0, seed=seed,
                                                            medusa_sampling=mode, response_format=fmt))
                assert got.finish_reason == "stop"
                jsonschema.validate(json.loads(reply(tok, got)), SCHEMAS[name])


def test_running_out_of_tokens_says_length(gens):
    plain, medusa, tok, prompt = gens
    fmt = ResponseFormat.json_schema(SCHEMAS["nested"], "nested")
    for gen in (plain, medusa):
        got = gen.generate(prompt, GenerationConfig(max_new_tokens=5, response_format=fmt, prompt_lookup=False))
        assert got.finish_reason == "length" and len(got.generated_ids) == 5
        with pytest.raises(json.JSONDecodeError):
            json.loads(reply(tok, got))


def test_logprobs_under_a_grammar_are_the_models_own(gens):
    """The grammar picks among the allowed tokens; the log-probabilities reported are still the base model's."""
    plain, medusa, tok, prompt = gens
    fmt = ResponseFormat.json_schema(SCHEMAS["enums"], "enums")
    got = medusa.generate(prompt, GenerationConfig(max_new_tokens=40, response_format=fmt, logprobs=2))
    assert [lp.token for lp in got.logprobs] == got.generated_ids
    # "{" is forced first; a random model prefers other tokens there: its own distribution says so
    assert got.logprobs[0].top[0][0] != got.generated_ids[0] and got.logprobs[0].logprob < got.logprobs[0].top[0][1]


def test_a_generator_without_tokenizer_refuses_a_format(tiny_model):
    loaded = tiny_model("llama", max_context=256)
    gen = Generator(loaded.model, loaded.tokenizer.eos_token_ids, PLAIN)
    with pytest.raises(ValueError, match="response_format needs the generator's tokenizer"):
        gen.generate([5, 6], GenerationConfig(max_new_tokens=2, response_format=ResponseFormat.json_object()))


def test_the_exo_engine_refuses_a_format_by_name():
    from exo_tinygrad_medusa.serving.engine import MedusaInferenceEngine
    with pytest.raises(ValueError, match="response_format .* is not supported by the Exo engine"):
        MedusaInferenceEngine(generation=GenerationConfig(response_format=ResponseFormat.json_object()))


# -- the default model ------------------------------------------------------------------------------------------------
REAL_CASES = [  # (prompt, schema): bounded where a 135M model would loop in an unbounded string or array
    ("Describe a fictional person as JSON.", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
        "required": ["name", "age", "hobbies"], "additionalProperties": False}),
    ("Classify the sentiment of 'I love this phone' as JSON.", {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number"}},
        "required": ["sentiment", "confidence"], "additionalProperties": False}),
    ("Give two cities in France with their population, as JSON.", {"type": "object", "properties": {
        "cities": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
            "required": ["city", "population"], "additionalProperties": False}}},
        "required": ["cities"], "additionalProperties": False}),
    ("Is the sky blue? Answer as JSON.", {"type": "object", "properties": {
        "answer": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 60}},
        "required": ["answer", "reason"], "additionalProperties": False}),
    ("Name a colour as JSON.", {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
                                "required": ["colour"], "additionalProperties": False}),
    ("List two programming languages and their creators as a JSON object.", None),  # JSON mode
]


@pytest.mark.slow
def test_default_model_greedy_medusa_equals_plain_under_schemas(default_model):
    model, tok = default_model.model, default_model.tokenizer
    heads_path = resolve_heads_path(default_model, MedusaOptions(True))
    heads = load_heads(heads_path, model.config, model.lm_head)
    tree = load_tree(default_tree_spec(default_model.device, heads_path))
    plain = Generator(model, tok.eos_token_ids, PLAIN, tokenizer=tok)
    # plans from the cost table, not from step times measured under whatever load the machine has: the acceptance
    # asserted below is then the same on every run
    medusa = Generator(model, tok.eos_token_ids, tree, heads, tokenizer=tok, lookup=LookupConfig(measure_costs=False))
    accepted, emitted = 0, 0
    for prompt, schema in REAL_CASES:
        fmt = ResponseFormat.json_object() if schema is None else ResponseFormat.json_schema(schema)
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        cfg = GenerationConfig(max_new_tokens=120, response_format=fmt)
        want = plain.generate(ids, cfg)
        assert want.finish_reason == "stop", reply(tok, want)
        value = json.loads(reply(tok, want))
        jsonschema.validate(value, schema or {"type": "object"})
        got = medusa.generate(ids, cfg)
        assert got.generated_ids == want.generated_ids, prompt
        accepted, emitted = accepted + got.steps, emitted + len(got.generated_ids) - 1
    assert emitted / accepted > 1.3, emitted / accepted  # drafts (forced tokens among them) are accepted under the constraint
