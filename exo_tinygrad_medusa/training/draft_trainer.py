"""Training the feature-level draft head (decoding/draft_head.py) on stored hidden states, and scoring it offline.

A batch is whole answers (padded to the longest allowed), so the head's causal attention sees each answer as
generation will. Training is teacher-forced (EAGLE-1): at position i the head reads the true f_i, with a little
uniform noise so that it learns to continue from its own imperfect guesses, and is trained to guess f_{i+1}: a
smooth-L1 regression onto it plus `token_weight` times the cross-entropy of t_{i+1} over the proposal vocabulary
(through the frozen base lm_head rows). The step runs in numpy (training/draft_backprop.py); the base model never
runs here.

Scoring replays greedy chain drafting exactly, with tinygrad's forward of the drafting loop
(DraftHead.forward_chains): with teacher-forced tokens, chain step k's argmax at position i is the draft generation
would make there as long as the chain's earlier drafts were right, and that is all acceptance depends on.
`chain_acceptance` walks each answer as a decoder would: draft `depth` tokens from position s, accept the longest
right prefix, emit it and the bonus token, continue from there."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit, dtypes

from ..decoding.draft_head import DraftHead, DraftHeadConfig
from .draft_backprop import Adam, DraftLayer, losses
from .draft_config import DraftTrainConfig
from .features import IGNORE, FeatureStore
from .progress import Progress, resume_progress
from .trainer import lr_at, proposal_vocab

log = logging.getLogger(__name__)
STATE_DIR = "train-state"


@dataclass
class Batch:
    features: np.ndarray     # (B, T, D) f_i
    tokens: np.ndarray       # (B, T) t_i (0 past an answer's end)
    lengths: np.ndarray      # (B,)


def answer_batch(store: FeatureStore, ids: np.ndarray, batch_size: int, max_len: int) -> Batch:
    """The answers `ids` (at most batch_size), each cut to max_len positions, zero-padded."""
    D = store.meta["dim"]
    feats = np.zeros((batch_size, max_len, D), dtype=np.float32)
    tokens = np.zeros((batch_size, max_len), dtype=np.int32)
    lengths = np.zeros(batch_size, dtype=np.int32)
    for b, s in enumerate(ids):
        answer = store.samples[s].answer_ids[:max_len]
        n = len(answer)
        feats[b, :n] = store.hidden[store.offsets[s]:store.offsets[s] + n]
        tokens[b, :n], lengths[b] = answer, n
    return Batch(feats, tokens, lengths)


def chain_targets(batch: Batch, steps: int, remap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels (steps, B, T): t_{i+1} as an index into the proposal vocabulary, IGNORE where step k at position i
    belongs to no chain or has no target, or the token is outside the vocabulary; valid (steps, B, T): rows whose
    feature target f_{i+1} exists)."""
    B, T = batch.tokens.shape
    i = np.arange(T)[None, :]
    nxt = np.zeros_like(batch.tokens)
    nxt[:, :-1] = batch.tokens[:, 1:]
    has_next = i + 1 < batch.lengths[:, None]
    labels = np.full((steps, B, T), IGNORE, dtype=np.int32)
    valid = np.zeros((steps, B, T), dtype=bool)
    for k in range(1, steps + 1):
        ok = has_next & (i >= k - 1)
        valid[k - 1] = ok
        labels[k - 1] = np.where(ok, remap[nxt], IGNORE)
    return labels, valid


def chain_acceptance(correct: np.ndarray, lengths: np.ndarray, depth: int) -> tuple[float, int]:
    """Greedy chain drafting replayed: correct (steps, B, T) says whether step k's draft at position i is right.
    Each answer is walked from position 0 (the first token came from the prefill): a step drafts `depth` tokens from
    s, accepts the longest right prefix, emits it and the bonus token. Returns (mean tokens a step, steps)."""
    emitted = steps = 0
    for b, n in enumerate(lengths):
        s = 0
        while s < n - 1:                  # t_{s+1} .. t_{n-1} are left to emit
            accepted = 0
            while accepted < depth and s + accepted < correct.shape[2] and correct[accepted, b, s + accepted]:  # draft k sits at position s + k - 1
                accepted += 1
            produced = min(accepted + 1, n - 1 - s)
            emitted, steps, s = emitted + produced, steps + 1, s + produced
    return (emitted / steps if steps else 1.0), steps


class DraftTrainer:
    def __init__(self, store: FeatureStore, base_lm_head: np.ndarray, out_norm: np.ndarray, head_config: DraftHeadConfig,
                 cfg: DraftTrainConfig, heldout: FeatureStore | None = None):
        """base_lm_head: the model's [vocab, dim] lm_head rows (float32; tied models: the embedding table, which is
        also what the head reads its token embeddings from); out_norm: the model's final norm weight."""
        self.store, self.cfg = store, cfg
        if store.meta["dim"] != head_config.dim:
            raise ValueError(f"features have hidden size {store.meta['dim']} but the model's is {head_config.dim}")
        n = len(store.samples)
        order = np.random.default_rng(cfg.seed).permutation(n)
        n_held = 0 if heldout is not None else min(n - 1, max(1, round(n * cfg.heldout_frac)))
        self.held_ids, self.train_ids = np.sort(order[:n_held]), np.sort(order[n_held:])
        self.held_store = heldout or store
        if heldout is not None:
            self.held_ids = np.arange(len(heldout.samples))
        targets = np.concatenate([np.array(store.samples[s].answer_ids[1:cfg.max_len], dtype=np.int32)
                                  for s in self.train_ids]) if len(self.train_ids) else np.zeros(0, np.int32)
        vocab = base_lm_head.shape[0]
        self.vocab_ids = proposal_vocab(targets, vocab, str(cfg.train_vocab))
        if self.vocab_ids is None:
            self.vocab_ids = np.arange(vocab, dtype=np.int32)
        self.remap = np.full(vocab, IGNORE, np.int32)
        self.remap[self.vocab_ids] = np.arange(len(self.vocab_ids), dtype=np.int32)
        self.embeddings = np.ascontiguousarray(base_lm_head, dtype=np.float32)
        self.rows_np = np.ascontiguousarray(self.embeddings[self.vocab_ids])              # (V', D), frozen
        self.rows = Tensor(self.rows_np).contiguous().realize()
        self.head = DraftHead(head_config, self.vocab_ids, out_norm, seed=cfg.seed)
        self.layer = DraftLayer(head_config, {k: v.numpy() for k, v in self.head.weights.items()})
        self.opt = Adam(self.layer.w, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_ids) / cfg.batch_size))
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.step = 0
        self._predict = TinyJit(self._argmax)

    def _argmax(self, feats: Tensor, embs: Tensor) -> Tensor:
        guesses = self.head.forward_chains(feats, embs, self.cfg.steps)
        return Tensor.stack(*[(g @ self.rows.T).argmax(-1) for g in guesses]).cast(dtypes.int32).realize()

    # -- a step (numpy) ------------------------------------------------------------------------------------------
    def _embeddings(self, batch: Batch) -> np.ndarray:
        inside = np.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
        return self.embeddings[batch.tokens] * inside[..., None]

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step on the batch of `step`: (regression loss, cross-entropy, gradient norm before
        clipping). Batches and noise are fixed by (seed, step), so a resumed run repeats an uninterrupted one."""
        cfg = self.cfg
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.train_ids))
        ids = self.train_ids[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
        batch = answer_batch(self.store, ids, cfg.batch_size, cfg.max_len)
        labels, valid = chain_targets(batch, 1, self.remap)
        noise = np.random.default_rng([cfg.seed, 1 << 20, step]).uniform(-cfg.noise, cfg.noise, batch.features.shape)
        out = self.layer.forward((batch.features + noise).astype(np.float32), self._embeddings(batch))
        target = np.zeros_like(batch.features)
        target[:, :-1] = batch.features[:, 1:]
        reg, ce, d_out = losses(out, target, valid[0], self.rows_np, labels[0], cfg.token_weight, IGNORE)
        grads = self.layer.backward(d_out)
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))
        scale = min(1.0, cfg.clip_norm / (norm + 1e-6))
        self.opt.step(self.layer.w, {k: g * scale for k, g in grads.items()}, lr_at(step, self.total_steps, cfg))
        return reg, ce, norm

    def sync_head(self) -> None:
        """Copy the trained weights into the tinygrad head (in place: the scoring capture keeps its buffers)."""
        for name, t in self.head.weights.items():
            t.assign(Tensor(self.layer.w[name])).realize()

    # -- scoring -----------------------------------------------------------------------------------------------
    def score(self, store: FeatureStore, ids: np.ndarray) -> dict:
        """Per chain step k, top-1 of t_{i+1} over the chains' rows; per chain depth, the replayed tokens a step."""
        self.sync_head()
        hits, counts = np.zeros(self.cfg.steps), np.zeros(self.cfg.steps)
        corrects, lengths = [], []
        B, T = self.cfg.batch_size, self.cfg.max_len
        for start in range(0, len(ids), B):
            batch = answer_batch(store, ids[start:start + B], B, T)
            drafted = self.vocab_ids[self._predict(Tensor(batch.features), Tensor(self._embeddings(batch))).numpy()]
            nxt = np.zeros_like(batch.tokens)
            nxt[:, :-1] = batch.tokens[:, 1:]
            labels, _ = chain_targets(batch, self.cfg.steps, np.arange(len(self.remap), dtype=np.int32))
            correct = (drafted == nxt[None]) & (labels != IGNORE)
            hits += correct.sum((1, 2))
            counts += (labels != IGNORE).sum((1, 2))
            n = len(ids[start:start + B])
            corrects.append(correct[:, :n]), lengths.append(batch.lengths[:n])
        correct_all = np.concatenate(corrects, axis=1) if corrects else np.zeros((self.cfg.steps, 0, T), bool)
        lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        out = {"top1": [round(float(h / max(c, 1)), 4) for h, c in zip(hits, counts)]}
        for d in range(1, self.cfg.steps + 1):
            out[f"chain-{d}"] = round(chain_acceptance(correct_all, lengths_all, d)[0], 4)
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_state(self, out: Path) -> None:
        d = out / STATE_DIR
        d.mkdir(parents=True, exist_ok=True)
        (d / "progress.json").unlink(missing_ok=True)
        np.savez(d / "state.npz", **{f"w.{k}": v for k, v in self.layer.w.items()},
                 **{f"opt.{k}": v for k, v in self.opt.state().items()})
        (d / "progress.json").write_text(json.dumps({"step": self.step, "config": asdict(self.cfg)}))

    def load_state(self, out: Path) -> bool:
        d = out / STATE_DIR
        if (progress := resume_progress(d, asdict(self.cfg))) is None:
            return False
        with np.load(d / "state.npz") as saved:
            for name in self.layer.w:
                self.layer.w[name][...] = saved[f"w.{name}"]
            self.opt.load({k[4:]: saved[k] for k in saved.files if k.startswith("opt.")})
        self.step = int(progress["step"])
        log.info("resumed at step %d of %d", self.step, self.total_steps)
        return True

    # -- loop ------------------------------------------------------------------------------------------------------
    def train(self, out: Path, resume: bool = False, stop_after: int | None = None) -> list[dict]:
        """Train to the end of the schedule (or to step stop_after, saving the state to resume); returns the
        evaluations made on the way."""
        if resume:
            self.load_state(out)
        history, last_ckpt = [], time.perf_counter()
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        bar = Progress(self.total_steps, "train draft head", "steps")
        bar.done = self.step
        scores: dict = {}
        while self.step < end:
            reg, ce, norm = self.train_step(self.step)
            self.step += 1
            if self.step % self.cfg.eval_every == 0 or self.step == self.total_steps:
                scores = self.score(self.held_store, self.held_ids[:self.cfg.eval_answers])
                history.append({"step": self.step, "reg": round(reg, 4), "ce": round(ce, 4), **scores})
                log.info("step %d: %s", self.step, history[-1])
            bar.update(1, reg=reg, ce=ce, **{k: v for k, v in scores.items() if k.startswith("chain")})
            if time.perf_counter() - last_ckpt > self.cfg.checkpoint_every_s and self.step < end:
                self.save_state(out)
                last_ckpt = time.perf_counter()
        bar.close()
        if self.step < self.total_steps:
            self.save_state(out)
        self.sync_head()
        return history
