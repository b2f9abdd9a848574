"""The feature-level draft head: its training-time view of the drafting loop, the replayed acceptance, training."""
import json

import numpy as np
import pytest
from tinygrad import Tensor

from exo_tinygrad_medusa.decoding.draft_head import DraftHead, DraftHeadConfig
from exo_tinygrad_medusa.training.draft_backprop import DraftLayer, losses
from exo_tinygrad_medusa.training.draft_config import DraftTrainConfig
from exo_tinygrad_medusa.training.draft_trainer import Batch, DraftTrainer, chain_acceptance, chain_targets
from exo_tinygrad_medusa.training.features import IGNORE, FeatureStore, FeatureWriter, Sample

TINY = DraftHeadConfig(dim=16, n_heads=4, n_kv_heads=2, head_dim=4, hidden_dim=32, vocab_size=40, rope_theta=10000.0,
                       window=5)


def _random_head(seed: int = 1) -> DraftHead:
    head = DraftHead(TINY, np.arange(TINY.vocab_size), seed=seed)
    rng = np.random.default_rng(seed)
    for name, w in head.weights.items():  # move every weight off its initial value, so each one matters
        head.weights[name] = Tensor(w.numpy() + rng.normal(0, 0.3, w.shape).astype(np.float32))
    return head


def _drafting_loop(head: DraftHead, feats: np.ndarray, embs: np.ndarray, s: int, steps: int) -> list[np.ndarray]:
    """Generation's view, one query at a time: true keys of positions <= s (within the window), then each draft's
    input (the previous guess, the next token's embedding) at the next position, its key kept for the drafts after."""
    c, T = head.config, feats.shape[1]
    cos, sin = (Tensor(a) for a in c.rope(T))
    u_true = head.inputs(Tensor(feats[:, :s + 1]), Tensor(embs[:, :s + 1]))
    _, k_true, v_true = head._qkv(u_true, cos[:s + 1], sin[:s + 1])
    keys, values = [k_true[:, :, j] for j in range(s + 1)], [v_true[:, :, j] for j in range(s + 1)]
    guesses, fed = [], Tensor(feats[:, s:s + 1])
    for m in range(steps):
        p = s + m
        u = head.inputs(fed, Tensor(embs[:, p:p + 1]))
        q, k, v = head._qkv(u, cos[p:p + 1], sin[p:p + 1])
        if m > 0:
            keys.append(k[:, :, 0]), values.append(v[:, :, 0])
        lo = max(0, p - c.window + 1)
        K = Tensor.stack(*keys[lo:p + 1], dim=2)                         # (B, kv, S, hd)
        V = Tensor.stack(*values[lo:p + 1], dim=2)
        probs = ((q @ K.unsqueeze(2).transpose(-1, -2)) / c.head_dim ** 0.5).softmax(-1)
        guess = head._finish(u, probs @ V.unsqueeze(2))
        guesses.append(guess.numpy()[:, 0])
        fed = guess
    return guesses


def test_training_chains_are_the_drafting_loop():
    head, rng, T, steps = _random_head(), np.random.default_rng(0), 10, 3
    feats = rng.normal(0, 1, (2, T, TINY.dim)).astype(np.float32)
    embs = rng.normal(0, 1, (2, T, TINY.dim)).astype(np.float32)
    chains = [g.numpy() for g in head.forward_chains(Tensor(feats), Tensor(embs), steps)]
    for s in (0, 3, 6):  # s = 6: the window (5) hides the first true keys
        loop = _drafting_loop(head, feats, embs, s, steps)
        for k in range(steps):
            np.testing.assert_allclose(chains[k][:, s + k], loop[k], rtol=2e-4, atol=2e-5)
    # and the chains differ from plain teacher forcing past step 1 (the guesses are fed back)
    assert np.abs(chains[1][:, 4] - chains[0][:, 4]).max() > 1e-3


def test_numpy_backprop_is_tinygrads_autograd_of_the_first_chain_step():
    head, rng = _random_head(2), np.random.default_rng(5)
    feats = rng.normal(0, 1, (2, 9, TINY.dim)).astype(np.float32)
    embs = rng.normal(0, 1, (2, 9, TINY.dim)).astype(np.float32)
    d_out = rng.normal(0, 1, (2, 9, TINY.dim)).astype(np.float32)
    layer = DraftLayer(TINY, {k: v.numpy() for k, v in head.weights.items()})
    out = layer.forward(feats, embs)
    grads = layer.backward(d_out)
    for w in head.weights.values():
        w.requires_grad = True
    ref = head.forward_chains(Tensor(feats), Tensor(embs), 1)[0]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5)
    (ref * Tensor(d_out)).sum().backward()
    for name, w in head.weights.items():
        np.testing.assert_allclose(grads[name], w.grad.numpy(), rtol=2e-3, atol=2e-4, err_msg=name)


def test_the_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(7)
    out = rng.normal(0, 1, (1, 5, 6)).astype(np.float64)
    target = out + rng.normal(0, 1.2, out.shape)          # some errors past the smooth-L1 knee at 1
    valid = np.array([[True, True, False, True, True]])
    rows = rng.normal(0, 1, (7, 6))
    labels = np.array([[3, IGNORE, 1, 6, 0]])
    _, _, grad = losses(out, target, valid, rows, labels, 0.3, IGNORE)
    def total(o):
        reg, ce, _ = losses(o, target, valid, rows, labels, 0.3, IGNORE)
        return reg + 0.3 * ce
    eps = 1e-6
    for idx in [(0, 0, 0), (0, 1, 3), (0, 2, 5), (0, 4, 2)]:
        up, down = out.copy(), out.copy()
        up[idx] += eps
        down[idx] -= eps
        assert grad[idx] == pytest.approx((total(up) - total(down)) / (2 * eps), rel=1e-3, abs=1e-7)


def test_chain_acceptance_walks_answers_like_a_decoder():
    # one answer of 8 tokens: t_1..t_7 to emit. Drafts right: step 1 everywhere but position 3, step 2 at 1 and 5.
    correct = np.zeros((2, 1, 8), dtype=bool)
    correct[0, 0, :] = True
    correct[0, 0, 3] = False
    correct[1, 0, [1, 5]] = True
    # depth 1: s=0 takes t1,t2 (2) -> s=2: t3,t4 (2) -> s=4: t5,t6 -> s=6: t7 (cut at the end): 7 tokens, 4 steps
    assert chain_acceptance(correct, np.array([8]), 1) == (7 / 4, 4)
    # depth 2: s=0: step 1 right at 0, step 2 right at 1 -> t1..t3 (3) -> s=3: step 1 wrong -> 1 -> s=4: right at 4,
    # step 2 at 5 right -> 3 (t5..t7): 7 tokens in 3 steps
    assert chain_acceptance(correct, np.array([8]), 2) == (7 / 3, 3)


def test_chain_targets_mask_rows_outside_chains_and_answers():
    batch = Batch(np.zeros((1, 6, 4), np.float32), np.array([[5, 6, 7, 8, 0, 0]], np.int32), np.array([4]))
    remap = np.full(10, IGNORE, np.int32)
    remap[[6, 7]] = [0, 1]                         # token 8 is outside the proposal vocabulary
    labels, valid = chain_targets(batch, 2, remap)
    assert labels[0, 0].tolist() == [0, 1, IGNORE, IGNORE, IGNORE, IGNORE]
    assert labels[1, 0].tolist() == [IGNORE, 1, IGNORE, IGNORE, IGNORE, IGNORE]
    assert valid[0, 0].tolist() == [True, True, True, False, False, False]
    assert valid[1, 0].tolist() == [False, True, True, False, False, False]


def _store(tmp_path, n_answers=24, length=12, dim=16, vocab=40):
    """Answers that count up modulo the vocabulary, features a fixed random code of the next token: a head can
    learn to draft them exactly."""
    rng = np.random.default_rng(3)
    code = rng.normal(0, 1, (vocab, dim)).astype(np.float32)
    writer = FeatureWriter(tmp_path / "store", dim, n_answers * length)
    for a in range(n_answers):
        answer = [(a + i) % vocab for i in range(length)]
        writer.add(Sample(f"p{a}", [1, 2], answer), code[answer].astype(np.float16))
    writer.close()
    return FeatureStore.open(tmp_path / "store"), code


def test_the_trainer_learns_saves_and_resumes(tmp_path):
    store, code = _store(tmp_path)
    cfg = DraftTrainConfig(steps=2, epochs=30, lr=3e-3, batch_size=4, max_len=12, window=4, train_vocab=40,
                           token_weight=1.0, noise=0.05, eval_answers=4, eval_every=1000, warmup_frac=0.02)
    trainer = DraftTrainer(store, code, np.ones(16, np.float32), TINY, cfg)
    before = trainer.score(store, trainer.held_ids)
    trainer.train(tmp_path / "out", stop_after=60)
    assert (tmp_path / "out" / "train-state" / "progress.json").is_file()
    resumed = DraftTrainer(store, code, np.ones(16, np.float32), TINY, cfg)
    resumed.train(tmp_path / "out", resume=True)
    assert resumed.step == resumed.total_steps
    after = resumed.score(store, resumed.held_ids)
    assert after["top1"][0] > 0.9 > before["top1"][0]
    assert after["chain-2"] > 2.5
    resumed.head.save(tmp_path / "head")
    loaded = DraftHead.load(tmp_path / "head")
    assert np.array_equal(loaded.vocab_ids, resumed.vocab_ids)
    assert json.loads((tmp_path / "head" / "draft_config.json").read_text())["window"] == TINY.window
    for name, w in resumed.head.weights.items():
        np.testing.assert_array_equal(loaded.weights[name].numpy(), w.numpy())


def test_a_resume_with_other_settings_is_refused(tmp_path):
    store, code = _store(tmp_path, n_answers=8)
    cfg = DraftTrainConfig(steps=1, epochs=2, batch_size=4, max_len=12, window=4, train_vocab=40)
    DraftTrainer(store, code, np.ones(16, np.float32), TINY, cfg).train(tmp_path / "out", stop_after=1)
    other = DraftTrainConfig(steps=1, epochs=2, batch_size=4, max_len=12, window=4, train_vocab=40, lr=5e-3)
    with pytest.raises(ValueError, match="different settings"):
        DraftTrainer(store, code, np.ones(16, np.float32), TINY, other).train(tmp_path / "out", resume=True)


def test_captured_drafting_follows_the_heads_loop_across_steps(tiny_model):
    """DraftHeadSteps on a tiny model: after each (simulated) verify step, its drafts are the head's own chain
    drafts (DraftHead.forward_chains) at the chain's start, with each draft fed back, whatever the step sizes, and
    across replays of the captures at other positions."""
    from exo_tinygrad_medusa.decoding.draft_steps import DraftHeadSteps
    model = tiny_model("qwen2").model
    rng = np.random.default_rng(11)
    cfg = DraftHeadConfig.of(model.config, window=5)
    vocab_ids = np.sort(rng.choice(cfg.vocab_size, 200, replace=False)).astype(np.int32)
    head = DraftHead(cfg, vocab_ids, seed=4)
    for name, w in head.weights.items():
        head.weights[name] = Tensor(w.numpy() + rng.normal(0, 0.3, w.shape).astype(np.float32))
    table = model.lm_head.numpy()
    rows = table[vocab_ids]
    depth = 3
    steps = DraftHeadSteps(head, model, depth, packed=False)
    n = 40
    feats = rng.normal(0, 1, (n, cfg.dim)).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, n).astype(np.int32)

    def expected(s: int) -> list[int]:
        t = tokens.copy()
        out = []
        for k in range(1, depth + 1):
            guesses = head.forward_chains(Tensor(feats[None, :s + k]), Tensor(table[t[:s + k]][None]), k)
            pick = int(vocab_ids[int(np.argmax(rows @ guesses[k - 1].numpy()[0, s + k - 1]))])
            out.append(pick)
            t[s + k] = pick           # the next draft continues this one
        return out

    assert steps.start(Tensor(feats[0:1]), int(tokens[0])) == expected(0)
    position = 1
    # (verified rows, accepted): chains of 4 and 2 rows, plain steps; each size captured and replayed
    for T, accepted in [(4, 2), (1, 1), (4, 4), (2, 1), (1, 1), (4, 1)]:
        hidden = np.concatenate([feats[position:position + accepted],
                                 rng.normal(0, 1, (T - accepted, cfg.dim)).astype(np.float32)])  # rows past: junk
        drafts = steps.advance(Tensor(hidden).realize(), tokens[position:position + accepted].tolist())
        position += accepted
        assert drafts == expected(position - 1), (T, accepted, position)


def test_greedy_decoding_with_a_draft_head_is_plain_greedy(tiny_model):
    from exo_tinygrad_medusa.decoding.draft_steps import DraftHeadSteps
    from exo_tinygrad_medusa.decoding.generate import Generator
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
    from exo_tinygrad_medusa.decoding.tree import PLAIN
    loaded = tiny_model("qwen2")
    model, eos = loaded.model, loaded.tokenizer.eos_token_ids
    cfg = DraftHeadConfig.of(model.config, window=8)
    head = DraftHead(cfg, np.arange(cfg.vocab_size, dtype=np.int32), out_norm=model.norm.weight.numpy(), seed=2)
    plain = Generator(model, eos, PLAIN)
    drafted = Generator(model, eos, PLAIN, draft_head=DraftHeadSteps(head, model, 3))
    with pytest.raises(ValueError, match="replaces the Medusa heads"):
        from exo_tinygrad_medusa.decoding.tree import chain
        Generator(model, eos, chain(1), draft_head=drafted.draft_head)
    used = 0
    for prompt in ([5, 17, 42, 8, 99, 3], [11, 12, 13, 11, 12, 13, 11, 12], [250]):
        want = plain.generate(prompt, GenerationConfig(max_new_tokens=40)).generated_ids
        got = drafted.generate(prompt, GenerationConfig(max_new_tokens=40))
        assert got.generated_ids == want
        used += got.source_steps.get("draft head", 0)
    assert used > 0  # the planner verified some of the head's drafts
