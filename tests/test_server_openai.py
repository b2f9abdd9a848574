"""The official `openai` Python client (a test-only dependency) against `exo-medusa serve` on a tiny model with
random Medusa heads: chat and completions, log-probabilities, JSON mode and JSON schemas, streamed and not, through
the client's own parsing; and refused response formats, answered before the request waits for the model."""
from __future__ import annotations

import json
import math
import re

import pytest

# the fixtures (gen, make_server, scripted, scripted_session, server) are imported by name: pytest finds them here
from helpers_server import call, gen, make_server, scripted, scripted_chat, scripted_session, server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
# bounded values (short strings, ranges, enums): the tiny random model closes the JSON well within the budget
ORDER = {"type": "object", "properties": {
    "item": {"type": "string", "maxLength": 5}, "count": {"type": "integer", "minimum": 1, "maximum": 20},
    "express": {"type": "boolean"}, "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "maxItems": 2}},
    "required": ["item", "count", "express", "sizes"], "additionalProperties": False}
ORDER_FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "strict": True, "schema": ORDER}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=600)


def test_chat_streamed_and_not_with_logprobs(client, server):
    ask = dict(model=server["model"], messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10,
               temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**ask)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 10
    content = choice.logprobs.content
    # a token may hold part of a character (the random model emits odd bytes): its bytes spell the text exactly
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == choice.message.content
    for c in content:  # greedy: the emitted token is the most likely one, and the alternatives are ordered
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.logprob <= 0
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert bytes(c.bytes).decode(errors="replace") == c.token
    # probabilities of a real distribution: the alternatives' mass is at most 1
    assert all(sum(math.exp(t.logprob) for t in c.top_logprobs) <= 1 + 1e-6 for c in content)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [c.token for c in content]
    assert [t.logprob for t in tokens] == pytest.approx([c.logprob for c in content], abs=1e-6)
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_streamed_and_not_with_logprobs(client, server):
    ask = dict(model=server["model"], prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**ask)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 8
    offsets = choice.logprobs.text_offset
    assert len(offsets) == 8 and offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(choice.text)
    for token, offset in zip(choice.logprobs.tokens, offsets):  # a token's text starts at or after its offset (a
        # token after a cut-off character starts where that character's replacement does)
        assert "\ufffd" in token or token in choice.text[offset:]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp)
               for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs))
    streamed = list(client.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == choice.logprobs.tokens
    echoed = client.completions.create(**{**ask, "logprobs": None}, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + choice.text
    # the chat route and the completions route generate from the same model: a chat prompt written out by hand
    # (the tiny tokenizer's ChatML) continues as the chat does
    chat = client.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0)
    raw = client.completions.create(model=server["model"], max_tokens=6, temperature=0,
                                    prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert raw.choices[0].text == chat.choices[0].message.content


def test_client_errors_are_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be an integer from 0 to 20"):
        client.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=25)
    with pytest.raises(openai.BadRequestError, match=r"prompt token ids must be in \[0, 320\)"):
        client.completions.create(model=server["model"], prompt=[5, 100_000])
    assert call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_json_schema_round_trips_on_both_routes_streamed_and_not(client, server):
    ask = dict(model=server["model"], messages=[{"role": "user", "content": "An order, as JSON."}], max_tokens=80,
               temperature=0, response_format=ORDER_FORMAT)
    whole = client.chat.completions.create(**ask)
    content = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop"  # the JSON closed, then the end-of-turn token
    jsonschema.validate(json.loads(content), ORDER)
    assert list(json.loads(content)) == list(ORDER["properties"])  # the schema's order
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # sampled replies parse and validate too
    for seed in range(2):
        sampled = client.chat.completions.create(**{**ask, "temperature": 1.0, "seed": seed})
        jsonschema.validate(json.loads(sampled.choices[0].message.content), ORDER)
    # completions: the same constraint on a raw prompt (response_format is an extension there: extra_body)
    raw = dict(model=server["model"], prompt="Order:", max_tokens=80, temperature=0,
               extra_body={"response_format": ORDER_FORMAT})
    text = client.completions.create(**raw).choices[0].text
    jsonschema.validate(json.loads(text), ORDER)
    assert "".join(c.choices[0].text for c in client.completions.create(**raw, stream=True)) == text


def test_json_mode_round_trips_streamed_and_not(client, server):
    ask = dict(model=server["model"], messages=[{"role": "user", "content": "Some JSON, please."}], max_tokens=60,
               temperature=0, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**ask)
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    streamed = client.chat.completions.create(**ask, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content
    text = client.completions.create(model=server["model"], prompt="{", max_tokens=60, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}}).choices[0].text
    assert isinstance(json.loads(text), dict)


def test_the_clients_own_structured_output_parsing(client, server):
    """client.beta.chat.completions.parse turns a pydantic model into a strict JSON schema and parses the reply."""
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=6)
        legs: int = pydantic.Field(ge=0, le=8)
        kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog"]})

    parsed = client.beta.chat.completions.parse(model=server["model"], messages=[{"role": "user", "content": "A pet"}],
                                                max_tokens=60, temperature=0, response_format=Pet)
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8 and pet.kind in ("cat", "dog")


def test_running_out_of_tokens_inside_the_json_says_length(client, server):
    whole = client.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "JSON"}],
                                           max_tokens=4, temperature=0, response_format=ORDER_FORMAT)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(whole.choices[0].message.content)


@pytest.mark.parametrize("options, message", [
    ({"response_format": {"type": "yaml"}}, "response_format type must be one of text, json_object, json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "the JSON schema cannot be compiled for constrained decoding: Invalid type: objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "[a-"}}}}, "cannot be compiled.*regex parse error"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "json_schema.name must be"),
    ({"response_format": {"type": "json_object"}, "stop": "}"}, "stop cannot be combined with response_format"),
])
def test_refused_formats_never_reach_the_model(scripted, gen, options, message):
    _, port = scripted
    status, body = scripted_chat(port, **options)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert re.search(message, body["error"]["message"]), body
    assert gen.configs == []  # refused before it was queued


def test_formats_reach_the_model_on_both_routes(scripted, gen):
    _, port = scripted
    assert scripted_chat(port, response_format={"type": "text"})[0] == 200
    assert scripted_chat(port, response_format=ORDER_FORMAT)[0] == 200
    url = {"url": f"http://127.0.0.1:{port}"}
    assert call(url, "/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}})[0] == 200
    status, body = call(url, "/v1/completions", {"prompt": "x", "echo": True, "response_format": ORDER_FORMAT})
    assert status == 400 and "echo cannot be combined with response_format" in body["error"]["message"]
    formats = [c.response_format for c in gen.configs]
    assert formats[0] is None and json.loads(formats[1].schema) == ORDER and formats[2].kind == "json_object"
    assert len(formats) == 3
