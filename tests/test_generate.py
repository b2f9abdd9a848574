"""Plain generation with Generator on a tiny model: greedy against the numpy reference, every stop condition,
streaming, seeded sampling, and the errors bad prompts and bad sampling settings must give."""
import numpy as np
import pytest

from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.model.shard import Shard
from helpers_models import reference_logits

PROMPT = [5, 17, 200, 33, 9, 100, 250, 3, 64, 120]
N_NEW = 16


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def generator(llama):
    return Generator(llama.model, eos_token_ids=())  # no EOS: a random model may emit the tokenizer's


@pytest.fixture(scope="module")
def greedy_ids(generator) -> list[int]:
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW))
    assert result.finish_reason == "length"
    return result.generated_ids


def _reference_greedy(directory, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference_logits(directory, ids)[-1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_reference_argmax(llama, greedy_ids):
    assert len(greedy_ids) == N_NEW
    assert greedy_ids == _reference_greedy(llama.resolved.path, PROMPT, N_NEW)
    assert len(set(greedy_ids)) > 3  # a real continuation, not one token repeated


def test_generation_is_repeatable(generator, greedy_ids):
    # the same Generator (same captured steps, a reused KV cache) gives the same answer again
    assert generator.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW)).generated_ids == greedy_ids


@pytest.mark.parametrize("budget", [1, 5])
def test_stops_at_max_new_tokens(generator, greedy_ids, budget):
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=budget))
    assert result.generated_ids == greedy_ids[:budget]
    assert result.finish_reason == "length"


def test_stops_right_after_eos(llama, greedy_ids):
    k = next(i for i in range(4, N_NEW) if greedy_ids[i] not in greedy_ids[:i])  # first occurrence at step k
    generator = Generator(llama.model, eos_token_ids=[greedy_ids[k], 319])
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW))
    assert result.generated_ids == greedy_ids[:k + 1]
    assert result.finish_reason == "stop"


def test_streaming_callback_receives_every_token(generator, greedy_ids):
    chunks: list[list[int]] = []
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW), on_tokens=chunks.append)
    assert all(chunks) and all(isinstance(t, int) for chunk in chunks for t in chunk)
    assert [t for chunk in chunks for t in chunk] == result.generated_ids == greedy_ids


# -- the end of the context -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_context(tiny_model):
    loaded = tiny_model("llama", max_context=48)
    assert loaded.model.max_context == 48
    return loaded, Generator(loaded.model, eos_token_ids=())


def _long_prompt(n: int) -> list[int]:
    return np.random.default_rng(n).integers(3, 320, n).tolist()


def test_generation_stops_at_context_end(short_context):
    loaded, generator = short_context
    prompt = _long_prompt(40)
    result = generator.generate(prompt, GenerationConfig(max_new_tokens=100))
    assert len(result.generated_ids) == 8 and result.finish_reason == "length"
    assert result.generated_ids == _reference_greedy(loaded.resolved.path, prompt, 8)
    last = generator.generate(_long_prompt(47), GenerationConfig(max_new_tokens=100))
    assert len(last.generated_ids) == 1 and last.finish_reason == "length"


@pytest.mark.parametrize("length", [48, 60])
def test_prompt_longer_than_context(short_context, length):
    _, generator = short_context
    with pytest.raises(ValueError) as err:
        generator.generate(_long_prompt(length), GenerationConfig(max_new_tokens=4))
    assert f"{length} tokens" in str(err.value) and "48" in str(err.value)


# -- sampling -------------------------------------------------------------------------------------------------------

def _sample(generator, **cfg) -> list[int]:
    return generator.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW, **cfg)).generated_ids


def test_sampling_is_seeded(generator, greedy_ids):
    first = _sample(generator, temperature=1.0, seed=1)
    assert len(first) == N_NEW
    assert _sample(generator, temperature=1.0, seed=1) == first
    others = [_sample(generator, temperature=1.0, seed=seed) for seed in (2, 3)]
    assert any(other != first for other in others)
    assert first != greedy_ids


def test_temperature_zero_and_top_k_one_are_greedy(generator, greedy_ids):
    assert _sample(generator, temperature=0.0, seed=5) == greedy_ids
    assert _sample(generator, temperature=0.7, top_k=1, seed=5) == greedy_ids


# -- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,message", [
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
    (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-2), "top_k must be >= 0, got -2"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(medusa_sampling="greedy"), "medusa_sampling must be 'typical' or 'exact', got 'greedy'"),
])
def test_invalid_sampling_settings(setting, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**setting)


@pytest.mark.parametrize("prompt,message", [([], "the prompt is empty"), ([5, 320], r"token ids must be in \[0, 320\)"),
                                            ([-1, 5], r"token ids must be in \[0, 320\)")])
def test_bad_prompt_ids(generator, prompt, message):
    with pytest.raises(ValueError, match=message):
        generator.generate(prompt)


def test_a_generator_starts_from_a_given_cache_and_step_times(llama, generator, greedy_ids):
    # what a stored session hands over (capture_cache): the cache its captures were made on, the step times measured
    gen = Generator(llama.model, eos_token_ids=(), cache=generator.cache, step_seconds={1: 0.01, 2: 0.025})
    costs = gen.measured_costs()
    assert gen.cache is generator.cache and costs[1] == 1.0 and costs[2] == pytest.approx(2.5)
    assert gen.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW)).generated_ids == greedy_ids
    assert gen.step_kinds() == {"tree": gen.steps}   # plain decoding: no draft chains made


def test_generator_needs_the_whole_model(tiny_model):
    whole = tiny_model("llama")
    part = tiny_model("llama", shard=Shard(str(whole.resolved.path), 0, 1, 4))
    with pytest.raises(ValueError, match="needs the whole model"):
        Generator(part.model, eos_token_ids=[2])
