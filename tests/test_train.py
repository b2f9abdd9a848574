"""Self-distilled Medusa head training: data, features, loss, checkpoints, evaluation, CLI errors, shipped heads."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tinygrad import Tensor
from tinygrad.helpers import Context

from exo_tinygrad_medusa.cli import main
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.decoding.heads import load_heads
from exo_tinygrad_medusa.decoding.tree import chain, load_tree
from exo_tinygrad_medusa.model.registry import cards
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.training.batched import BatchedDecoder
from exo_tinygrad_medusa.training.data import (ModelSpec, decode_batch, generate, generate_from_ids,
                                                   generate_in_workers, load_prompts)
from exo_tinygrad_medusa.training.evaluate import head_accuracy, measure_acceptance, replay_acceptance
from exo_tinygrad_medusa.training.features import IGNORE, FeatureStore, FeatureWriter, Sample, merge_stores
from exo_tinygrad_medusa.training.trainer import INFO_FILE, STATE_DIR, HeadTrainer, TrainConfig, lr_at, proposal_vocab, write_heads
from helpers_models import write_tiny_checkpoint

CYCLE_TOKENS = list(range(40, 48))


def _prompts(n: int, seed: int) -> list[tuple[str, list[int]]]:
    rng = np.random.default_rng(seed)
    return [(f"p{i}", [int(t) for t in rng.integers(3, 320, int(rng.integers(3, 20)))]) for i in range(n)]


@pytest.fixture(scope="module")
def random_data(tiny_model, tmp_path_factory):
    """A random tiny llama and its own greedy answers to 16 random prompts."""
    loaded = tiny_model("llama", max_context=128)
    out = tmp_path_factory.mktemp("random_feats")
    generate_from_ids(loaded.model, [2], _prompts(16, 0), out, batch_size=8, max_new_tokens=32)
    return loaded, FeatureStore.open(out)


@pytest.fixture(scope="module")
def cyclic_data(tmp_path_factory):
    """A tiny model whose lm_head can only emit 8 tokens: its greedy answers fall into short cycles, so what
    comes next is predictable from the hidden state and trained heads must find it."""
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("cyclic"), "llama", seed=3, tie=False)
    weights = load_file(str(d / "model.safetensors"))
    silent = np.setdiff1d(np.arange(weights["lm_head.weight"].shape[0]), CYCLE_TOKENS)
    weights["lm_head.weight"][silent] = 0
    save_file(weights, str(d / "model.safetensors"))
    loaded = load_model(str(d), dtype="float32", max_context=128)
    out = tmp_path_factory.mktemp("cyclic_feats")
    generate_from_ids(loaded.model, [2], _prompts(24, 1), out, batch_size=8, max_new_tokens=32)
    return loaded, FeatureStore.open(out)


# -- data ------------------------------------------------------------------------------------------------------
def test_batched_decoding_matches_plain_greedy(tiny_model):
    loaded = tiny_model("llama", max_context=128)
    prompts = [ids for _, ids in _prompts(3, 5)]
    answers, rows = decode_batch(BatchedDecoder(loaded.model, 4), prompts, 12, {2})
    gen = Generator(loaded.model, [2])
    for ids, answer, hidden in zip(prompts, answers, rows):
        assert answer == gen.generate(ids, GenerationConfig(max_new_tokens=12)).generated_ids
        assert hidden.shape == (len(answer), loaded.config.dim)
        # row 0 is the hidden state at the last prompt token: the base lm_head maps it to the first answer token
        logits = hidden @ loaded.model.lm_head.numpy().T
        assert logits.argmax(-1).tolist() == answer


def test_labels_stay_inside_each_sample(tmp_path):
    writer = FeatureWriter(tmp_path, dim=2, capacity=8)
    writer.add(Sample("a", [1], [10, 11, 12]), np.zeros((3, 2)))
    writer.add(Sample("b", [1], [20, 21]), np.ones((2, 2)))
    writer.close()
    store = FeatureStore.open(tmp_path)
    rows, labels = store.labels(2)
    assert rows.tolist() == [0, 1, 2, 3, 4]
    assert labels.tolist() == [[10, 11, 12], [11, 12, IGNORE], [12, IGNORE, IGNORE], [20, 21, IGNORE], [21, IGNORE, IGNORE]]
    # more heads than an answer has tokens: the missing targets are ignored (a 2-token answer used to fail here)
    _, labels = store.labels(4)
    assert labels[3:].tolist() == [[20, 21] + [IGNORE] * 3, [21] + [IGNORE] * 4]


def test_merged_stores_keep_every_sample_with_its_rows(tmp_path):
    for name, base in (("a", 0), ("b", 10)):
        writer = FeatureWriter(tmp_path / name, dim=2, capacity=8)
        writer.add(Sample(f"{name}1", [1], [base + 1, base + 2]), np.full((2, 2), base + 1))
        writer.add(Sample(f"{name}2", [1], [base + 3]), np.full((1, 2), base + 3))
        writer.close()
    merged = merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert [s.prompt for s in merged.samples] == ["a1", "a2", "b1", "b2"]
    assert merged.offsets.tolist() == [0, 2, 3, 5, 6]
    assert np.asarray(merged.hidden)[:, 0].tolist() == [1, 1, 3, 11, 11, 13]
    assert merged.labels(1)[1][:, 0].tolist() == [1, 2, 3, 11, 12, 13]


def test_worker_processes_write_what_one_process_writes(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llama"))
    prompts = [f"say {w}" for w in ["hi", "yes", "no", "maybe", "ok"]]
    loaded = load_model(model, dtype="float32", max_context=128)
    kwargs = dict(batch_size=2, max_new_tokens=10)
    generate(loaded, prompts[0::2] + prompts[1::2], tmp_path / "one", **kwargs)
    generate_in_workers(ModelSpec(model, dtype="float32", max_context=128), prompts, tmp_path / "two", 2, **kwargs)
    one, two = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    # each worker sorts its own slice by prompt length, so compare sample by sample
    by_prompt = {s.prompt: (s, np.asarray(one.hidden[one.offsets[i]:one.offsets[i + 1]])) for i, s in enumerate(one.samples)}
    assert sorted(by_prompt) == sorted(s.prompt for s in two.samples) and two.meta["workers"] == 2
    for i, sample in enumerate(two.samples):
        expected, hidden = by_prompt[sample.prompt]
        assert sample.answer_ids == expected.answer_ids
        np.testing.assert_allclose(np.asarray(two.hidden[two.offsets[i]:two.offsets[i + 1]], dtype=np.float32),
                                   hidden.astype(np.float32), atol=2e-3)
    assert not any(p.name.startswith("part-") for p in (tmp_path / "two").iterdir())


def test_unfinished_store_is_refused(tmp_path):
    writer = FeatureWriter(tmp_path, dim=2, capacity=4)
    writer.add(Sample("a", [1], [10]), np.zeros((1, 2)))
    with pytest.raises(FileNotFoundError, match="not a finished feature store"):
        FeatureStore.open(tmp_path)


def test_load_prompts_reads_turns_and_prompt(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"turns": ["first", "second"]}\n\n{"prompt": "third"}\n')
    assert load_prompts(f) == ["first", "third"]
    f.write_text('{"prompt": "ok"}\n{"question": "no"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected a JSON object"):
        load_prompts(f)
    f.write_text('{"prompt": "ok"\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: not valid JSON"):
        load_prompts(f)


def test_shipped_prompt_set_loads():
    from exo_tinygrad_medusa.training.data import BUILTIN_PROMPTS
    prompts = load_prompts(BUILTIN_PROMPTS)
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)


# -- training --------------------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, warmup_frac=0.1, min_lr_frac=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_training_lowers_the_loss_and_checkpoints_reload(random_data, tmp_path):
    loaded, store = random_data
    cfg = TrainConfig(num_heads=2, epochs=12, batch_size=64, lr=1e-2, eval_every=1, heldout_frac=0.2)
    trainer = HeadTrainer(store, loaded.model.lm_head, cfg)
    result = trainer.train(tmp_path)
    losses = [h["loss"] for h in result.history]
    assert result.steps == trainer.total_steps >= 40
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:3])
    write_heads(trainer, tmp_path, {"note": "test"})
    assert not (tmp_path / STATE_DIR).exists()
    heads = load_heads(str(tmp_path), loaded.config, loaded.model.lm_head)
    x = Tensor(np.asarray(store.hidden[:16], dtype=np.float32))
    np.testing.assert_allclose(heads(x).numpy(), trainer.heads(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab,fmt,soft", [("full", "v2", 0.0), ("seen", "v2", 0.0), ("seen", "hydra", 0.0),
                                            ("seen", "hydra", 0.5)])
def test_hand_written_vocabulary_backward_equals_autograd(random_data, vocab, fmt, soft):
    loaded, store = random_data
    trainer = HeadTrainer(store, loaded.model.lm_head, TrainConfig(num_heads=3, batch_size=32, train_vocab=vocab,
                                                                   fmt=fmt, soft_labels=soft))
    for p in trainer.params:  # away from the zero start, so every term of the gradient is exercised
        p.assign(Tensor(np.random.default_rng(1).standard_normal(p.shape).astype(np.float32) * 0.05)).realize()
    x, y, tokens, *x_next = trainer._batch(0)
    assert len(x_next) == (1 if soft else 0)
    y = Tensor(np.where(np.arange(32)[:, None] % 5 == 0, IGNORE, y.numpy()).astype(np.int32))  # some rows masked

    def grads(fn):
        trainer.opt.zero_grad()
        with Context(TRAINING=1):
            per_head = fn(x, y, tokens, *x_next)
            if fn == trainer._losses:
                (per_head * trainer.weights).sum().backward()
            return per_head.numpy(), [p.grad.numpy() for p in trainer.params]

    loss_auto, grad_auto = grads(trainer._losses)
    loss_hand, grad_hand = grads(trainer._frozen_vocab_backward)
    np.testing.assert_allclose(loss_hand, loss_auto, rtol=1e-4)
    assert np.abs(grad_auto[0]).max() > 1e-4
    for a, b in zip(grad_auto, grad_hand):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)


def test_soft_labels_mix_the_base_distribution_at_the_target_row(random_data):
    """Head k's soft target at row r is the base model's distribution at row r + k + 1 (whose greedy token is the
    hard label), over the proposal vocabulary, mixed with the one-hot label."""
    loaded, store = random_data
    trainer = HeadTrainer(store, loaded.model.lm_head, TrainConfig(num_heads=2, batch_size=16, train_vocab="seen",
                                                                   soft_labels=0.3))
    x, y, tokens, x_next = trainer._batch(0)
    y_np = y.numpy()
    target = trainer._targets(y.T, y.T != IGNORE, len(trainer.vocab_ids), x_next).numpy()   # (H, R, V')
    rows = trainer.train_split.rows[np.random.default_rng([0, 0]).permutation(len(trainer.train_split.rows))[:16]]
    base = loaded.model.lm_head.numpy()[trainer.vocab_ids]
    for k in range(2):
        for r in range(16):
            if y_np[r, k] == IGNORE:
                continue
            logits = np.asarray(store.hidden[rows[r] + k + 1], dtype=np.float64) @ base.T.astype(np.float64)
            teacher = np.exp(logits - logits.max())
            expected = 0.3 * teacher / teacher.sum()
            expected[y_np[r, k]] += 0.7
            np.testing.assert_allclose(target[k, r], expected, atol=1e-5)
            assert target[k, r].argmax() == y_np[r, k]
    with pytest.raises(ValueError, match="--soft-labels needs heads that share the base lm_head"):
        TrainConfig(fmt="v1", soft_labels=0.5)
    with pytest.raises(ValueError, match="--soft-labels must be between 0 and 1, got 1.5"):
        TrainConfig(soft_labels=1.5)


def test_seen_vocabulary_training_covers_every_target(random_data, tmp_path):
    loaded, store = random_data
    trainer = HeadTrainer(store, loaded.model.lm_head, TrainConfig(num_heads=2, epochs=6, batch_size=64, lr=1e-2,
                                                                   eval_every=1, train_vocab="seen"))
    targets = trainer.train_split.labels[:, 1:]
    assert trainer.vocab_ids.tolist() == sorted(set(targets[targets != IGNORE].tolist()))
    losses = [h["loss"] for h in trainer.train(tmp_path).history]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])


def test_proposal_vocab_keeps_the_most_frequent_targets():
    labels = np.array([[5, 7], [5, IGNORE], [9, 5], [7, 2]])
    assert proposal_vocab(labels, 12, "full") is None
    assert proposal_vocab(labels, 12, "seen").tolist() == [2, 5, 7, 9]
    assert proposal_vocab(labels, 12, "2").tolist() == [5, 7]        # 5 thrice, 7 twice
    assert proposal_vocab(labels, 12, "10").tolist() == [2, 5, 7, 9]
    with pytest.raises(ValueError, match="--train-vocab must be full, seen or a positive number"):
        TrainConfig(train_vocab="0")


def test_top_n_vocabulary_heads_propose_only_from_it(random_data, tmp_path):
    loaded, store = random_data
    trainer = HeadTrainer(store, loaded.model.lm_head, TrainConfig(num_heads=2, epochs=2, batch_size=64, lr=1e-2,
                                                                   train_vocab="8"))
    assert len(trainer.vocab_ids) == 8
    trainer.train(tmp_path)
    write_heads(trainer, tmp_path, {"note": "test"})
    heads = load_heads(str(tmp_path), loaded.config, loaded.model.lm_head)
    x = Tensor(np.asarray(store.hidden[:32], dtype=np.float32))
    proposed = heads.propose(x, 3).numpy()
    assert set(proposed.ravel().tolist()) <= set(trainer.vocab_ids.tolist())
    np.testing.assert_array_equal(proposed, trainer.heads.propose(x, 3).numpy())


def test_same_seed_same_heads_and_resume_continues_exactly(random_data, tmp_path):
    loaded, store = random_data
    cfg = TrainConfig(num_heads=2, epochs=2, batch_size=64, lr=3e-3, seed=7)

    def heads_of(trainer):
        return {k: v.numpy() for k, v in trainer.heads.state_dict().items()}

    whole = HeadTrainer(store, loaded.model.lm_head, cfg)
    whole.train(tmp_path / "a")
    first = HeadTrainer(store, loaded.model.lm_head, cfg)
    first.train(tmp_path / "b", stop_after=3)
    assert (tmp_path / "b" / STATE_DIR / "progress.json").is_file()
    resumed = HeadTrainer(store, loaded.model.lm_head, cfg)
    resumed.train(tmp_path / "b", resume=True)
    assert resumed.step == whole.step
    a, b = heads_of(whole), heads_of(resumed)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ValueError, match="different settings"):
        HeadTrainer(store, loaded.model.lm_head, TrainConfig(num_heads=2, epochs=3, batch_size=64, seed=7)).load_state(
            tmp_path / "b")


@pytest.mark.parametrize("fmt", ["v2", "hydra"])
def test_heads_learn_a_predictable_continuation(cyclic_data, tmp_path, fmt):
    loaded, store = cyclic_data
    cfg = TrainConfig(num_heads=2, epochs=30, batch_size=128, lr=1e-2, heldout_frac=0.25, eval_every=1000, fmt=fmt)
    trainer = HeadTrainer(store, loaded.model.lm_head, cfg)
    untrained = trainer.heldout_accuracy()  # zero ResBlocks: each head repeats the base model's next-token guess
    result = trainer.train(tmp_path)
    assert result.heldout_top1[0] > untrained[0] + 0.1, (untrained, result.heldout_top1)
    write_heads(trainer, tmp_path, {})
    heads = load_heads(str(tmp_path), loaded.config, loaded.model.lm_head)
    tree = chain(2)
    held = result.heldout_samples
    mean, outputs = measure_acceptance(loaded.model, [2], heads, tree, [store.samples[i].prompt_ids for i in held], 32)
    assert mean > 1.5
    # Medusa greedy never changes the text, and replaying the stored continuation predicts every step (the last
    # one aside: there the real tree may also accept tokens past the answer's end)
    medusa = Generator(loaded.model, [2], tree, heads)
    for i, out in zip(held, outputs):
        sample = store.samples[i]
        assert out == sample.answer_ids
        steps = medusa.generate(sample.prompt_ids, GenerationConfig(max_new_tokens=32, prompt_lookup=False)).accept_lengths
        rows = np.arange(store.offsets[i], store.offsets[i + 1])
        replayed = replay_acceptance(tree, trainer.predict(rows, np.array(sample.answer_ids)), sample.answer_ids)
        assert len(replayed) == len(steps) and replayed[:-1] == steps[:-1]


def test_head_accuracy_counts_only_real_targets():
    preds = np.array([[[5, 1, 2, 3, 4], [7, 6, 0, 0, 0], [9, 9, 9, 9, 9]]])  # (H=1, R=3, 5)
    labels = np.array([[5], [6], [IGNORE]])
    acc = head_accuracy(preds, labels)
    assert acc.top1 == [0.5] and acc.top5 == [1.0] and acc.rows == [2]


def test_replay_acceptance_follows_the_tree():
    answer = [1, 2, 3, 4, 5, 6]
    preds = np.zeros((2, 6, 2), dtype=np.int32)
    preds[0, :, 1] = [2, 3, 4, 5, 6, 0]  # head 0 rank 1 always right: row i guesses answer[i + 1]
    preds[1, :, 0] = [3, 0, 0, 0, 0, 0]  # head 1 rank 0 right only at row 0 (answer[2])
    tree = load_tree("chain-2")                               # ranks (0,), (0, 0): head 0 rank 0 is always wrong
    assert replay_acceptance(tree, preds, answer) == [1, 1, 1, 1, 1]
    from exo_tinygrad_medusa.decoding.tree import MedusaTree
    tree = MedusaTree(((1,), (1, 0)))
    # root 1: accepts 2 (head 0) and 3 (head 1): 3 tokens; then root 4: accepts 5 only; then root 6 ends
    assert replay_acceptance(tree, preds, answer) == [3, 2]


# -- command line ----------------------------------------------------------------------------------------------
def _no_checkpoint(out: Path) -> bool:
    return not (out / "config.json").exists()


def test_cli_rejects_missing_prompts_file(tmp_path, capsys):
    assert main(["train-heads", "--out", str(tmp_path / "h"), "--prompts", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err and _no_checkpoint(tmp_path / "h")


def test_cli_rejects_malformed_prompts(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["train-heads", "--out", str(tmp_path / "h"), "--prompts", str(bad)]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err and _no_checkpoint(tmp_path / "h")


def test_cli_rejects_zero_heads(tmp_path, capsys):
    assert main(["train-heads", "--out", str(tmp_path / "h"), "--num-heads", "0"]) == 2
    assert "--num-heads must be >= 1" in capsys.readouterr().err and _no_checkpoint(tmp_path / "h")


def test_cli_rejects_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train-heads", "--out", str(blocker / "heads")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_cli_trains_and_evaluates_a_tiny_model(tiny_checkpoint, tmp_path, capsys):
    model = str(tiny_checkpoint("llama"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ["hi", "yes", "no", "maybe", "ok", "go"]))
    out = tmp_path / "heads"
    assert main(["train-heads", model, "--out", str(out), "--prompts", str(prompts), "--num-samples", "6",
                 "--max-new-tokens", "12", "--gen-batch-size", "4", "--gen-workers", "1", "--num-heads", "4", "--epochs", "2",
                 "--batch-size", "32", "--max-context", "128"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] >= 1
    config = json.loads((out / "config.json").read_text())
    assert config["medusa_num_heads"] == 4 and config["hidden_size"] == 64 and config["vocab_size"] == 320
    assert (tmp_path / "heads-data" / "meta.json").is_file()
    assert main(["eval-heads", model, "--medusa-heads", str(out), "--prompts", str(prompts), "--num-samples", "4",
                 "--max-new-tokens", "12", "--gen-batch-size", "4", "--gen-workers", "1", "--trees", "chain-2,mc_sim_7b_63", "--measure", "1",
                 "--max-context", "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # mc_sim_7b_63 replays candidates up to rank 10, deeper than the top-5 the scores use
    assert len(report["top1"]) == 4 and report["trees"]["chain-2"]["mean_accepted"] >= 1.0
    assert report["trees"]["mc_sim_7b_63"]["mean_accepted"] >= 1.0
    assert report["trees"]["chain-2"]["measured_mean_accepted"] >= 1.0


# -- shipped heads ---------------------------------------------------------------------------------------------
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m" / "medusa-heads"


@pytest.mark.slow
def test_shipped_heads_match_the_default_model(default_model):
    """The card points at trained heads that fit the model; test_medusa runs them against the oracle."""
    path = cards()["smollm2-135m"].heads_path()
    assert path is not None and Path(path).resolve() == SHIPPED_HEADS
    config = json.loads((SHIPPED_HEADS / "config.json").read_text())
    assert config["hidden_size"] == default_model.config.dim and config["vocab_size"] == default_model.config.vocab_size
    heads = load_heads(path, default_model.config, default_model.model.lm_head)
    info = json.loads((SHIPPED_HEADS / INFO_FILE).read_text())
    assert len(info["heldout_top1"]) == heads.num_heads == config["medusa_num_heads"]
    x = Tensor(np.random.default_rng(0).standard_normal((3, default_model.config.dim)).astype(np.float32))
    root = Tensor(np.array([17, 404, 9000], dtype=np.int32))  # sequential heads continue a root token
    proposed = heads.propose(x, 2, root=root).numpy()
    assert proposed.shape == (heads.num_heads, 3, 2) and proposed.min() >= 0
    assert set(proposed.ravel().tolist()) <= set(heads.vocab_ids.numpy().tolist())


# -- prompt sources, the resumable answer corpus, teacher-forced features ------------------------------------------
from exo_tinygrad_medusa.training import corpus as corpus_mod  # noqa: E402
from exo_tinygrad_medusa.training.corpus import (AnswerCorpus, DistillConfig, RunConfig, corpus_features,  # noqa: E402
                                                 distill)
from exo_tinygrad_medusa.training.sources import (EXCLUSION_FILE, Exclusion, PromptFilter, SourcePrompt,  # noqa: E402
                                                  build_exclusion, read_sharegpt, select_prompts)

MT_BENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mt_bench.jsonl"


def test_decode_batch_stops_every_answer_at_the_budget(tiny_model):
    loaded = tiny_model("llama", max_context=128)
    prompts = [ids for _, ids in _prompts(2, 5)]
    free, _ = decode_batch(BatchedDecoder(loaded.model, 2), prompts, 10, set())
    eos = free[0][1]  # the first answer ends after two tokens; the second must still stop at 10
    assert eos not in free[1]
    answers, rows = decode_batch(BatchedDecoder(loaded.model, 2), prompts, 10, {eos})
    assert answers[0] == free[0][:2] and answers[1] == free[1] and len(answers[1]) == 10 and len(rows[1]) == 10


def test_sharegpt_reader_keeps_complete_conversations(tmp_path):
    records = [{"id": "a", "conversations": [{"from": "human", "value": " Hi there "}, {"from": "gpt", "value": "x"}]},
               {"id": "b", "conversations": [{"from": "gpt", "value": "no user"}]},
               {"id": "c", "conversations": [{"from": "gpt", "value": "y"}, {"from": "human", "value": "Second"}]}]
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in records) + ',\n  {"id": "d", "conversations": [{"fr'
    f = tmp_path / "sharegpt.json"
    f.write_text(text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    prompts, info = read_sharegpt(f)
    assert [(p.id, p.text) for p in prompts] == [("sharegpt:a", "Hi there"), ("sharegpt:c", "Second")]
    assert info == {"conversations": 3, "truncated_tail": True, "without_user_turn": 1}
    f.write_text("[" + json.dumps(records[0]) + "]")
    assert read_sharegpt(f)[1]["truncated_tail"] is False


def test_benchmark_turns_and_their_phrases_are_excluded(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"turns": ["Compose an engaging travel blog post about a recent trip to Hawaii.",
                                           "Short one."]}) + "\n")
    ex = Exclusion(build_exclusion(bench))
    assert ex.hits("compose an ENGAGING travel blog post, about a recent trip to Hawaii")  # case and punctuation
    assert ex.hits("Please: an engaging travel blog post about a recent trip to Paris")    # 8 words shared
    assert ex.hits("short one") and not ex.hits("a short one here")
    assert not ex.hits("Write a travel blog post about Hawaii.")
    prompts = [SourcePrompt("1", "s", t) for t in ["Short one.", "What is a prime?", "what is a PRIME", "ab",
                                                   "Qu'est-ce que c'est ? " * 2, "Объясни, что такое простое число"]]
    kept, counts = select_prompts(prompts, ex, PromptFilter())
    assert [p.text for p in kept] == ["What is a prime?", "Qu'est-ce que c'est ? " * 2]
    assert counts == {"read": 6, "benchmark": 1, "filtered": 2, "duplicate": 1, "kept": 2}


def test_committed_benchmark_exclusion_is_current():
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} is absent (the committed hashes are used as they are)")
    assert json.loads(EXCLUSION_FILE.read_text()) == build_exclusion(MT_BENCH)
    ex = Exclusion.load()
    assert all(ex.hits(row["turns"][0]) for row in map(json.loads, MT_BENCH.read_text().splitlines()))


def _source_prompts(n: int) -> list[SourcePrompt]:
    words = ["hi", "yes", "no", "maybe", "ok", "go", "stop", "wait", "run", "jump", "sing"]
    return [SourcePrompt(f"t:{i}", "test", f"say {w} " * (1 + i % 3)) for i, w in enumerate(words[:n])]


@pytest.fixture(scope="module")
def distill_model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint("llama")), dtype="float32", max_context=128)


def _distill(loaded, prompts, out, run=RunConfig(batch_size=2, chunk_prompts=2), **kwargs):
    settings = DistillConfig(model="tiny", max_new_tokens=10, max_context=128, **kwargs)
    return distill(ModelSpec("tiny"), prompts, out, settings, run, loaded=loaded)


def _answers(directory) -> dict[str, list[int]]:
    return {r["key"]: r["answer_ids"] for r in AnswerCorpus.open(directory).records()}


def test_distillation_resumes_after_a_stop_and_matches_one_run(distill_model, tmp_path, monkeypatch):
    prompts = _source_prompts(9)
    info = _distill(distill_model, prompts, tmp_path / "one")
    assert info["answers"] == 9 and info["chunks"] == 5 and info["answered"] == 9
    one = _answers(tmp_path / "one")
    # stop in the middle of the third chunk: two whole chunks survive, nothing half-written
    calls, real = {"n": 0}, corpus_mod.decode_batch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_mod, "decode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _distill(distill_model, prompts, tmp_path / "two")
    monkeypatch.setattr(corpus_mod, "decode_batch", real)
    files = sorted(p.name for p in (tmp_path / "two" / "chunks").iterdir())
    assert len(files) == 2 and not any(f.startswith(".tmp") for f in files)
    assert len(_answers(tmp_path / "two")) == 4
    info = _distill(distill_model, prompts, tmp_path / "two")
    assert info["answered"] == 5 and info["answers"] == 9
    assert _answers(tmp_path / "two") == one          # same answers, no duplicates
    assert _distill(distill_model, prompts, tmp_path / "two")["answered"] == 0   # nothing left to do
    records = AnswerCorpus.open(tmp_path / "one").records()
    assert all(len(r["answer_ids"]) <= 10 and r["finish"] in ("stop", "length") and r["prompt"] for r in records)


def test_shards_and_limits_split_the_work(distill_model, tmp_path):
    prompts = _source_prompts(7)
    run = RunConfig(batch_size=2, chunk_prompts=3)
    _distill(distill_model, prompts, tmp_path / "all", run)
    parts = [tmp_path / "a", tmp_path / "b"]
    for i, d in enumerate(parts):
        _distill(distill_model, prompts, d, RunConfig(batch_size=2, chunk_prompts=3, shard=(i, 2)))
    merged = tmp_path / "merged"
    AnswerCorpus.open(merged, DistillConfig(model="tiny", max_new_tokens=10, max_context=128))
    for d in parts:  # machines merge by copying chunk files
        for f in (d / "chunks").iterdir():
            (merged / "chunks" / f.name).write_bytes(f.read_bytes())
    assert _answers(merged) == _answers(tmp_path / "all")
    assert _distill(distill_model, prompts, tmp_path / "lim", RunConfig(batch_size=2, limit=3))["answers"] == 3


def test_corpus_settings_must_match(distill_model, tmp_path):
    _distill(distill_model, _source_prompts(2), tmp_path)
    with pytest.raises(ValueError, match=r"other settings .*'max_new_tokens': \(10, 12\)"):
        distill(ModelSpec("tiny"), _source_prompts(2), tmp_path, DistillConfig(model="tiny", max_new_tokens=12,
                                                                                max_context=128), loaded=distill_model)
    with pytest.raises(FileNotFoundError, match="is not an answer corpus"):
        AnswerCorpus.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="--shard must be I/N"):
        RunConfig(shard=(2, 2))


def test_teacher_forced_features_equal_the_generated_ones(distill_model, tmp_path):
    prompts = _source_prompts(5)
    _distill(distill_model, prompts, tmp_path / "corpus")
    corpus = AnswerCorpus.open(tmp_path / "corpus")
    # the hidden states generation left in the local cache, then (cache gone) one teacher-forced pass
    cached = corpus_features(distill_model.model, corpus, tmp_path / "cached", batch_size=3)
    shutil.rmtree(tmp_path / "corpus" / "hidden")
    forced = corpus_features(distill_model.model, corpus, tmp_path / "feats", batch_size=3)
    assert (cached["recomputed_samples"], forced["recomputed_samples"]) == (0, 5)
    generate(distill_model, [p.text for p in prompts], tmp_path / "gen", batch_size=2, max_new_tokens=10)
    gen = FeatureStore.open(tmp_path / "gen")
    by_prompt = {s.prompt: (s, np.asarray(gen.hidden[gen.offsets[i]:gen.offsets[i + 1]])) for i, s in enumerate(gen.samples)}
    lm_head = distill_model.model.lm_head.numpy()
    for store in (FeatureStore.open(tmp_path / "cached"), FeatureStore.open(tmp_path / "feats")):
        assert sorted(by_prompt) == sorted(s.prompt for s in store.samples)
        for i, sample in enumerate(store.samples):
            expected, hidden = by_prompt[sample.prompt]
            rows = np.asarray(store.hidden[store.offsets[i]:store.offsets[i + 1]], dtype=np.float32)
            assert sample.answer_ids == expected.answer_ids and sample.prompt_ids == expected.prompt_ids
            np.testing.assert_allclose(rows, hidden.astype(np.float32), atol=2e-3)
            assert (rows @ lm_head.T).argmax(-1).tolist() == sample.answer_ids


def test_a_cut_off_feature_pass_continues_where_it_stopped(distill_model, tmp_path, caplog):
    _distill(distill_model, _source_prompts(5), tmp_path / "corpus")
    shutil.rmtree(tmp_path / "corpus" / "hidden")  # every sample teacher-forced, in batches of 2
    corpus = AnswerCorpus.open(tmp_path / "corpus")
    corpus_features(distill_model.model, corpus, tmp_path / "full", batch_size=2, show_progress=False)
    full = FeatureStore.open(tmp_path / "full")

    def cut(name: str, lines: list[str]) -> Path:
        """A copy of the full store as a kill leaves it: no meta.json, 3 whole sample lines and half of the 4th;
        rows from the 3rd sample on zeroed (the 3rd is recomputed: its batch was cut)."""
        d = tmp_path / name
        shutil.copytree(tmp_path / "full", d)
        (d / "meta.json").unlink()
        (d / "samples.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
        hidden = np.load(d / "hidden.npy", mmap_mode="r+")
        hidden[full.offsets[2]:] = 0
        hidden.flush()
        return d

    lines = (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    with caplog.at_level(logging.INFO, logger="exo_tinygrad_medusa.training.corpus"):
        info = corpus_features(distill_model.model, corpus, cut("cut", lines), batch_size=2, show_progress=False,
                               resume=True)
    assert "after 2 of 5 samples" in caplog.text  # back to the batch boundary before the cut
    resumed = FeatureStore.open(tmp_path / "cut")
    assert info["samples"] == 5 and resumed.samples == full.samples
    assert np.array_equal(np.asarray(resumed.hidden), np.asarray(full.hidden))
    # a store left by other answers is not continued: it starts over and still ends equal to an unbroken run
    other = json.loads(lines[0])
    other["answer_ids"] = other["answer_ids"][::-1] + [7]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="exo_tinygrad_medusa.training.corpus"):
        corpus_features(distill_model.model, corpus, cut("other", [json.dumps(other)] + lines[1:]), batch_size=2,
                        show_progress=False, resume=True)
    assert "starting over" in caplog.text
    again = FeatureStore.open(tmp_path / "other")
    assert again.samples == full.samples and np.array_equal(np.asarray(again.hidden), np.asarray(full.hidden))


def test_cli_build_prompts_drops_the_benchmark_and_duplicates(tmp_path, capsys):
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in [
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences and "
        "must-see attractions.", "Name three rivers.", "name three rivers", "Line\u2028separated text"]))
    out = tmp_path / "prompts.jsonl"
    assert main(["build-prompts", "--prompts", str(src), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"read": 4, "benchmark": 1, "filtered": 0, "duplicate": 1, "kept": 2}
    assert sorted(load_prompts(out)) == ["Line\u2028separated text", "Name three rivers."]
    assert main(["build-prompts", "--out", str(out)]) == 2
    assert "needs --sharegpt and/or --prompts" in capsys.readouterr().err
    assert main(["distill", "--prompts", str(out), "--corpus", str(tmp_path / "c"), "--shard", "1-2"]) == 2
    assert "--shard must be I/N" in capsys.readouterr().err


# -- held-out data from elsewhere, early stopping ---------------------------------------------------------------
def scripted_accuracy(trainer, scores):
    """Replace the held-out scoring with a script of head-0 scores, recording the heads at every evaluation."""
    seen = {}

    def score():
        seen[trainer.step] = {k: v.numpy().copy() for k, v in trainer.heads.state_dict().items()}
        return [scores[len(seen) - 1]] * trainer.cfg.num_heads
    trainer.heldout_accuracy = score
    return seen


def test_early_stopping_keeps_the_best_heads_and_survives_a_resume(random_data, tmp_path):
    loaded, store = random_data
    cfg = TrainConfig(num_heads=2, epochs=40, batch_size=16, lr=1e-2, eval_every=2, patience=2)
    scores = [0.1, 0.3, 0.2, 0.25, 0.5, 0.6]   # best at the 2nd evaluation (step 4), patience runs out at the 4th
    first = HeadTrainer(store, loaded.model.lm_head, cfg)
    scripted_accuracy(first, scores)
    first.train(tmp_path, stop_after=5)         # after the best, before the stop: the state must carry the best
    resumed = HeadTrainer(store, loaded.model.lm_head, cfg)
    seen = scripted_accuracy(resumed, scores[2:])
    result = resumed.train(tmp_path, resume=True)
    assert result.steps == 8 < resumed.total_steps and result.best_step == 4
    assert result.heldout_top1 == [0.3, 0.3] and [h["step"] for h in result.history] == [6, 8]
    # the kept heads are those of step 4 (an uninterrupted run's, evaluated there), not the step-8 ones
    reference = HeadTrainer(store, loaded.model.lm_head, cfg)
    ref_seen = scripted_accuracy(reference, [0.1] * 10)
    reference.train(tmp_path / "ref", stop_after=4)
    kept = {name: t.numpy() for name, t in resumed.heads.state_dict().items()}
    for name in kept:
        np.testing.assert_array_equal(kept[name], ref_seen[4][name])
    assert any(not np.array_equal(kept[name], seen[8][name]) for name in kept)
    with pytest.raises(ValueError, match="--patience must be >= 0"):
        TrainConfig(patience=-1)


def test_heldout_store_from_another_source(random_data, cyclic_data):
    loaded, store = random_data
    _, other = cyclic_data  # another model's answers: only the held-out scoring reads them
    trainer = HeadTrainer(store, loaded.model.lm_head, TrainConfig(num_heads=2, batch_size=32), heldout=other)
    assert trainer.train_split.samples.tolist() == list(range(len(store.samples)))
    assert trainer.held_split.store is other and len(trainer.held_split.samples) == len(other.samples)
    acc = trainer.heldout_accuracy()
    # zero-initialised heads repeat the base model's guess for the next token, scored on the other store's rows
    rows, labels = trainer.held_split.rows[:trainer.cfg.eval_rows], trainer.held_split.labels[:trainer.cfg.eval_rows]
    base = np.asarray(other.hidden[rows], dtype=np.float32) @ loaded.model.lm_head.numpy().T
    expected = (base.argmax(-1) == labels[:, 1])[labels[:, 1] != IGNORE].mean()
    assert acc[0] == pytest.approx(expected, abs=1e-6)
