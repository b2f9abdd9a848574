"""The official `openai` Python client (a test-only dependency) against `exo-medusa serve` on a tiny model with
random Medusa heads: chat and completions, log-probabilities, streamed and not, through the client's own parsing."""
from __future__ import annotations

import math

import pytest

# the fixtures (gen, make_server, scripted, scripted_session, server) are imported by name: pytest finds them here
from helpers_server import call, server

openai = pytest.importorskip("openai")


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
