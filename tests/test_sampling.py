"""Sampling: the distribution helpers, typical acceptance, and exact acceptance preserving the model's distribution
(chi-square goodness of fit against the exact joint distribution of the first two tokens, with a deliberately broken
acceptance rule rejected by the same test)."""
import math
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tinygrad import Tensor

import exo_tinygrad_medusa.decoding.steps as steps_module
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.decoding.heads import MedusaConfig, MedusaHeads
from exo_tinygrad_medusa.decoding.tree import PLAIN, MedusaTree, load_tree
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig, exact_accept, probabilities, sample, typical_accept
from helpers_models import reference_logits, write_tiny_checkpoint

SIGNIFICANCE = 1e-3


# -- statistics ------------------------------------------------------------------------------------------------------
def chi2_sf_even(x: float, df: int) -> float:
    """P(chi2_df > x) for even df, in closed form: exp(-x/2) * sum_{i < df/2} (x/2)^i / i!, summed in log space."""
    assert df % 2 == 0 and df > 0
    z = x / 2
    if z == 0:
        return 1.0
    return min(1.0, sum(math.exp(i * math.log(z) - math.lgamma(i + 1) - z) for i in range(df // 2)))


def test_chi2_sf_even_known_values():
    assert chi2_sf_even(5.991464547107979, 2) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf_even(13.276704135987622, 4) == pytest.approx(0.01, rel=1e-9)  # tabulated 0.99 quantile
    assert chi2_sf_even(1e6, 24) == 0.0


def goodness_of_fit(samples: list, expected: dict, n_min: float = 5.0) -> float:
    """p-value of Pearson's chi-square test of `samples` against `expected` (outcome -> probability; outcomes it
    leaves out share the remaining mass). Outcomes expected fewer than n_min times are pooled into one bin, and
    pooling keeps the degrees of freedom even so that chi2_sf_even applies. An outcome of probability 0 that occurs
    fails the test outright."""
    n, counts = len(samples), Counter(samples)
    if any(expected.get(s) == 0.0 for s in counts):
        return 0.0
    cells = sorted((o for o, p in expected.items() if p * n >= n_min), key=lambda o: -expected[o])
    # df = (cells + the pooled bin) - 1 must be even, and the pooled bin must hold some probability
    while cells and (len(cells) % 2 or 1.0 - sum(expected[o] for o in cells) < 1e-9):
        cells.pop()
    pooled_p = 1.0 - sum(expected[o] for o in cells)
    pooled_n = n - sum(counts[o] for o in cells)
    stat = sum((counts[o] - n * expected[o]) ** 2 / (n * expected[o]) for o in cells)
    stat += (pooled_n - n * pooled_p) ** 2 / (n * pooled_p)
    return chi2_sf_even(stat, len(cells))


# -- distribution helpers --------------------------------------------------------------------------------------------
def test_probabilities_temperature_top_k_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    np.testing.assert_allclose(probabilities(logits, GenerationConfig(temperature=1.0)), [0.5, 0.2, 0.15, 0.1, 0.05])
    hot = probabilities(logits, GenerationConfig(temperature=2.0))
    np.testing.assert_allclose(hot, np.sqrt([0.5, 0.2, 0.15, 0.1, 0.05]) / np.sqrt([0.5, 0.2, 0.15, 0.1, 0.05]).sum())
    np.testing.assert_allclose(probabilities(logits, GenerationConfig(temperature=1.0, top_k=2)),
                               [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    # top-p keeps the smallest prefix whose mass reaches p: 0.5 + 0.2 = 0.7 < 0.75, so 0.15 is kept too
    np.testing.assert_allclose(probabilities(logits, GenerationConfig(temperature=1.0, top_p=0.75)),
                               np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    np.testing.assert_allclose(probabilities(logits, GenerationConfig(temperature=1.0, top_p=0.7)),
                               [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    batch = probabilities(np.stack([logits, logits[::-1]]), GenerationConfig(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(batch, [[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(medusa_sampling="greedy"), "medusa_sampling"),
    (dict(posterior_threshold=0.0), "posterior_threshold"), (dict(posterior_alpha=0.0), "posterior_alpha"),
])
def test_generation_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


# -- typical acceptance ----------------------------------------------------------------------------------------------
def cutoff(p: np.ndarray, cfg: GenerationConfig) -> float:
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    return min(cfg.posterior_threshold, cfg.posterior_alpha * math.exp(-entropy))


def test_typical_accept_threshold_and_entropy_cutoffs():
    cfg = GenerationConfig(temperature=1.0, posterior_threshold=0.09, posterior_alpha=0.3)
    # a confident distribution: the cutoff is the threshold 0.09, so 0.1 passes and 0.08 does not
    confident = np.array([0.8, 0.1, 0.08, 0.02])
    assert cutoff(confident, cfg) == 0.09
    # a spread one: the cutoff is alpha * exp(-H) ~ 0.036, so 0.06 passes although it is below the threshold
    spread = np.array([0.06, 0.03] + [0.91 / 7] * 7)
    assert 0.03 < cutoff(spread, cfg) < 0.06 < cfg.posterior_threshold
    tree = MedusaTree(((0,), (1,), (0, 0), (1, 0)))  # nodes: 1=[0] 2=[1] 3=[0,0] 4=[1,0]
    peaked = np.eye(16)[11]  # the distribution after nodes 3 and 4: their bonus is token 11 whatever the rng does
    rng = np.random.default_rng(0)

    def run(tokens):
        p = np.stack([np.pad(confident, (0, 12)), np.pad(spread, (0, 7)), np.pad(spread, (0, 7)), peaked, peaked])
        return typical_accept(tree, np.array(tokens), np.log(p + 1e-30), cfg, rng)

    assert run([5, 1, 2, 0, 0]) == ([0, 1, 3], 11)   # 0.1 > 0.09 at the root, 0.06 > 0.036 below it
    assert run([5, 1, 2, 1, 1])[0] == [0, 1]          # 0.03 < 0.036: the path stops at node 1
    assert run([5, 2, 1, 1, 0]) == ([0, 2, 4], 11)   # the longest passing path wins even when it starts at rank 1
    assert run([5, 3, 2, 0, 0])[0] == [0]             # both root children fail; node 3 passes but its parent did not


def test_typical_accept_bonus_follows_the_last_accepted_node():
    cfg = GenerationConfig(temperature=1.0)
    tree = MedusaTree(((0,),))
    logits = np.array([[5.0, 0, 0, 0], [0, 0, 0, 9.0]])
    rng = np.random.default_rng(1)
    draws = [typical_accept(tree, np.array([2, 0]), logits, cfg, rng) for _ in range(200)]
    assert {tuple(n) for n, _ in draws} == {(0, 1)}
    assert Counter(b for _, b in draws)[3] > 190  # sampled from node 1's distribution
    draws = [typical_accept(tree, np.array([2, 1]), logits, cfg, rng) for _ in range(200)]
    assert {tuple(n) for n, _ in draws} == {(0,)}
    assert Counter(b for _, b in draws)[0] > 180  # rejected: sampled from the root's distribution


# -- exact acceptance on a toy Markov model -------------------------------------------------------------------------
def greedy_accept(tree, tree_tokens, logits, cfg, rng):
    """Deliberately wrong: accept a child only if it is the argmax, and take the argmax as the bonus."""
    nodes = [0]
    while True:
        best = int(np.argmax(probabilities(logits[nodes[-1]], cfg)))
        children = [i for i in range(1, tree.size) if tree.parents[i] == nodes[-1] and tree_tokens[i] == best]
        if not children:
            return nodes, best
        nodes.append(children[0])


def accept_without_residual(tree, tree_tokens, logits, cfg, rng):
    """Deliberately wrong: accept child c with probability p(c) but never renormalise after a rejection."""
    nodes = [0]
    while True:
        p = probabilities(logits[nodes[-1]], cfg)
        children = [i for i in range(1, tree.size) if tree.parents[i] == nodes[-1]]
        accepted = next((c for c in children if rng.random() < p[tree_tokens[c]]), None)
        if accepted is None:
            return nodes, sample(p, rng)
        nodes.append(accepted)


class ToyModel:
    """Next-token logits depend on the last token only; drafts are fixed top-k lists per head, as Medusa's are."""
    V = 5

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.logits = rng.standard_normal((self.V, self.V)) * 1.5
        self.root = 0
        self.tree = MedusaTree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
        # head 0 proposes the root's two likeliest successors and its least likely one; heads 1, 2 are plausible
        order = np.argsort(-self.logits[self.root])
        drafts = [[order[0], order[1], order[-1]], list(np.argsort(-self.logits[order[0]])[:2]),
                  list(np.argsort(-self.logits[order[1]])[:1])]
        self.tree_tokens = np.array([self.root] + [drafts[len(c) - 1][c[-1]] for c in self.tree.choices])

    def draw(self, accept, cfg, rng) -> tuple[int, int]:
        logits = self.logits[self.tree_tokens]  # each node's distribution of the token after it
        nodes, bonus = accept(self.tree, self.tree_tokens, logits, cfg, rng)
        emitted = [int(self.tree_tokens[n]) for n in nodes[1:]] + [bonus]
        if len(emitted) == 1:  # the next step would start from the bonus: sample its successor directly
            emitted.append(sample(probabilities(self.logits[emitted[0]], cfg), rng))
        return emitted[0], emitted[1]

    def joint(self, cfg) -> dict:
        first = probabilities(self.logits[self.root], cfg)
        return {(a, b): first[a] * probabilities(self.logits[a], cfg)[b] for a in range(self.V) for b in range(self.V)}


CONFIGS = [GenerationConfig(temperature=1.0), GenerationConfig(temperature=0.7, top_k=3),
           GenerationConfig(temperature=1.3, top_p=0.8)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["t1", "t0.7-topk3", "t1.3-topp0.8"])
def test_exact_accept_preserves_the_distribution(cfg):
    toy, rng, n = ToyModel(seed=3), np.random.default_rng(123), 6000
    samples = [toy.draw(exact_accept, cfg, rng) for _ in range(n)]
    assert goodness_of_fit(samples, toy.joint(cfg)) > SIGNIFICANCE
    # drafts do get accepted (else this would only test plain sampling)
    accepted = sum(len(exact_accept(toy.tree, toy.tree_tokens, toy.logits[toy.tree_tokens], cfg, rng)[0]) > 1
                   for _ in range(500))
    assert accepted > 200


@pytest.mark.parametrize("broken", [greedy_accept, accept_without_residual])
def test_the_same_check_rejects_broken_acceptance(broken):
    cfg, toy, rng = GenerationConfig(temperature=1.0), ToyModel(seed=3), np.random.default_rng(123)
    samples = [toy.draw(broken, cfg, rng) for _ in range(6000)]
    assert goodness_of_fit(samples, toy.joint(cfg)) < SIGNIFICANCE


def test_exact_accept_on_root_only_tree_is_plain_sampling():
    cfg, rng = GenerationConfig(temperature=1.0), np.random.default_rng(5)
    logits = np.log(np.array([[0.6, 0.3, 0.1]]))
    draws = [exact_accept(PLAIN, np.array([0]), logits, cfg, rng) for _ in range(3000)]
    assert {tuple(n) for n, _ in draws} == {(0,)}
    assert goodness_of_fit([b for _, b in draws], {0: 0.6, 1: 0.3, 2: 0.1}) > SIGNIFICANCE


# -- end to end: exact Medusa sampling on a tiny model ---------------------------------------------------------------
PROMPT = [int(t) for t in np.random.default_rng(0).integers(3, 320, 20)]
RUNS = 240


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """A tiny llama whose lm_head is scaled up, so that a few continuations carry most of the mass at T=1."""
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("peaked"), "llama", seed=3)
    weights = load_file(str(directory / "model.safetensors"))
    save_file({**weights, "lm_head.weight": weights["lm_head.weight"] * 5}, str(directory / "model.safetensors"))
    return directory, load_model(str(directory), dtype="float32", max_context=64).model


@pytest.fixture(scope="module")
def two_token_joint(peaked_model) -> dict:
    """Exact P(first two tokens) from an independent numpy forward (first tokens below 1e-4 are left out: the
    goodness-of-fit test pools their mass)."""
    directory, _ = peaked_model
    cfg = GenerationConfig(temperature=1.0)
    first = probabilities(reference_logits(directory, PROMPT)[-1], cfg)
    joint = {}
    for a in np.flatnonzero(first > 1e-4):
        second = probabilities(reference_logits(directory, PROMPT + [int(a)])[-1], cfg)
        joint.update({(int(a), b): first[a] * second[b] for b in range(len(second))})
    return joint


@pytest.fixture(scope="module")
def exact_generator(peaked_model, two_token_joint):
    """cpu-8 tree whose head 0 proposes the two likeliest successors of the likeliest first token."""
    _, model = peaked_model
    config = model.config
    heads = MedusaHeads(MedusaConfig(4, 1, config.dim, config.vocab_size, "v1"), model.lm_head)
    generator = Generator(model, [], load_tree("cpu-8"), heads)
    hidden, row = generator.prefill(PROMPT)
    h = hidden.numpy()[0, row]
    best_first = max(two_token_joint, key=two_token_joint.get)[0]
    successors = sorted((o for o in two_token_joint if o[0] == best_first), key=lambda o: -two_token_joint[o])
    score = np.zeros(config.vocab_size, dtype=np.float32)
    score[successors[0][1]], score[successors[1][1]] = 2.0, 1.0
    heads.lm_heads[0] = Tensor(np.outer(score, h / (h @ h)).astype(np.float32)).realize()  # head 0(h) == score
    return generator


def _first_two_tokens(generator, runs: int, seed0: int) -> tuple[list, list]:
    samples, accept_lengths = [], []
    for seed in range(seed0, seed0 + runs):
        cfg = GenerationConfig(max_new_tokens=2, temperature=1.0, seed=seed, medusa_sampling="exact")
        result = generator.generate(PROMPT, cfg)
        assert len(result.generated_ids) == 2 and result.finish_reason == "length"
        samples.append(tuple(result.generated_ids))
        accept_lengths += result.accept_lengths
    return samples, accept_lengths


def test_exact_medusa_sampling_matches_the_model(exact_generator, two_token_joint):
    samples, accept_lengths = _first_two_tokens(exact_generator, RUNS, seed0=1000)
    assert goodness_of_fit(samples, two_token_joint) > SIGNIFICANCE
    assert sum(n > 1 for n in accept_lengths) > RUNS // 10  # the proposals were accepted, not just resampled


def test_end_to_end_check_rejects_greedy_acceptance(exact_generator, two_token_joint, monkeypatch):
    monkeypatch.setattr(steps_module, "exact_accept", greedy_accept)
    samples, _ = _first_two_tokens(exact_generator, RUNS // 3, seed0=1000)
    assert goodness_of_fit(samples, two_token_joint) < SIGNIFICANCE
