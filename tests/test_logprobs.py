"""Log-probabilities of generated tokens (GenerationConfig.logprobs): the base model's, from host logits, equal to an
independent numpy forward's, and the same with Medusa (heads and datastore drafts) as in plain decoding."""
import numpy as np
import pytest

from exo_tinygrad_medusa.decoding.datastore import Datastore
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig, greedy_accept, log_softmax, token_logprobs
from exo_tinygrad_medusa.decoding.tree import chain, load_tree
from helpers_models import reference_logits

PROMPT = [5, 17, 200, 33, 9, 100, 250, 3, 64, 120]
N_NEW = 24
TOP = 5


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plain(llama):
    return Generator(llama.model, eos_token_ids=())


@pytest.fixture(scope="module")
def medusa(llama, plain):
    """Random heads (rarely right) and a datastore holding the greedy continuation: its drafts get accepted, so
    steps emit several tokens whose logprobs all come from one verify step."""
    answer = plain.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW)).generated_ids
    heads = random_heads(llama.config, llama.model.lm_head, 4, 1, seed=11, scale=0.3)
    return Generator(llama.model, [], load_tree("cpu-8"), heads, datastore=Datastore.build([answer], [PROMPT]))


def reference_logprobs(llama, generated: list[int]) -> np.ndarray:
    """log p(generated[i] | prompt + generated[:i]) from the numpy forward, and each position's whole row."""
    rows = log_softmax(reference_logits(llama.resolved.path, PROMPT + generated[:-1])[len(PROMPT) - 1:])
    return rows


def test_greedy_logprobs_equal_plain_decodings_with_medusa(llama, plain, medusa):
    cfg = GenerationConfig(max_new_tokens=N_NEW, logprobs=TOP)
    base = plain.generate(PROMPT, cfg)
    fast = medusa.generate(PROMPT, cfg)
    device = medusa.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW))  # no logprobs: accepted on the device
    assert fast.generated_ids == base.generated_ids == device.generated_ids
    assert max(fast.accept_lengths) > 1, fast.accept_lengths  # some step emitted several tokens
    assert [e.token for e in fast.logprobs] == fast.generated_ids
    np.testing.assert_allclose([e.logprob for e in fast.logprobs], [e.logprob for e in base.logprobs], atol=1e-4)
    for a, b in zip(fast.logprobs, base.logprobs):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        np.testing.assert_allclose([v for _, v in a.top], [v for _, v in b.top], atol=1e-4)
    rows = reference_logprobs(llama, base.generated_ids)
    np.testing.assert_allclose([e.logprob for e in base.logprobs],
                               rows[np.arange(N_NEW), base.generated_ids], atol=1e-4)
    for entry, row in zip(base.logprobs, rows):  # greedy: the emitted token is the best alternative
        assert len(entry.top) == TOP and entry.top[0] == (entry.token, pytest.approx(entry.logprob))
        assert [t for t, _ in entry.top] == list(np.argsort(-row, kind="stable")[:TOP])


def test_sampled_logprobs_are_the_base_models(llama, medusa):
    result = medusa.generate(PROMPT, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3, logprobs=0))
    assert len(result.logprobs) == len(result.generated_ids) == 12
    assert all(e.top == () for e in result.logprobs)
    rows = reference_logprobs(llama, result.generated_ids)
    # temperature 1, no cut: the distribution sampled from is the base model's
    np.testing.assert_allclose([e.logprob for e in result.logprobs], rows[np.arange(12), result.generated_ids],
                               atol=1e-4)


def test_streamed_logprobs_come_before_their_tokens(medusa):
    events = []
    result = medusa.generate(PROMPT, GenerationConfig(max_new_tokens=N_NEW, logprobs=1),
                             on_tokens=lambda ids: events.append(("tokens", ids)),
                             on_logprobs=lambda entries: events.append(("logprobs", [e.token for e in entries])))
    assert [kind for kind, _ in events] == ["logprobs", "tokens"] * (len(events) // 2)
    assert all(events[i][1] == events[i + 1][1] for i in range(0, len(events), 2))
    assert sum((ids for kind, ids in events if kind == "tokens"), []) == result.generated_ids


def test_greedy_accept_follows_the_argmax_path():
    tree = load_tree("cpu-8")  # paths 0-1-4, 0-2-5, 0-1-3-6-7
    logits = np.zeros((tree.size, 10))
    tokens = np.array([0, 4, 5, 7, 1, 2, 8, 9])
    for node, best in [(0, 4), (1, 7), (3, 8), (6, 3), (2, 0), (4, 0), (5, 0), (7, 6)]:
        logits[node, best] = 1.0
    assert greedy_accept(tree, tokens, logits) == ([0, 1, 3, 6], 3)  # node 7 (token 9) is not node 6's argmax 3
    logits[0] = 0
    logits[0, 9] = 1  # nothing drafted matches the root's argmax: the bonus alone
    assert greedy_accept(tree, tokens, logits) == ([0], 9)
    assert greedy_accept(chain(2), np.array([0, 1, 2]), np.eye(3)[[1, 2, 0]]) == ([0, 1, 2], 0)


def test_token_logprobs_rank_and_normalise():
    rows = np.log(np.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]))
    first, second = token_logprobs(rows + 3.0, [2, 3], 3)  # a shift of the logits changes nothing
    assert first.token == 2 and first.logprob == pytest.approx(np.log(0.2))
    assert first.top == ((0, pytest.approx(np.log(0.5))), (1, pytest.approx(np.log(0.2))),
                         (2, pytest.approx(np.log(0.2))))
    assert second.top[0] == (3, pytest.approx(np.log(0.7)))
    assert token_logprobs(rows, [0, 0], 50)[0].top[-1][0] == 3  # more asked than the vocabulary: all of it
    with pytest.raises(ValueError, match="logprobs must be None or 0 to 20"):
        GenerationConfig(logprobs=21)
