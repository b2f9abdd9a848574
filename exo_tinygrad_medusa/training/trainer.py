"""Medusa-1 head training on stored hidden states (the base model stays frozen and never runs here).

Head k at row t predicts token t + k + 2 (a sequential "hydra" head also reads token t + k + 1, the true one:
teacher forcing); the loss is the cross-entropy of each head weighted by decay**k, with
rows past a sample's end masked. AdamW with linear warmup then cosine decay and global-norm gradient clipping.
The whole step (forward, backward, clipping, update) is one TinyJit capture over a fixed batch of rows."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.helpers import Context
from tinygrad.nn.optim import AdamW
from tinygrad.nn.state import get_state_dict, safe_load, safe_save

from ..decoding.heads import FORMATS, MedusaConfig, MedusaHeads
from ..model.transformer import Linear
from .features import IGNORE, FeatureStore
from .progress import Progress, resume_progress

log = logging.getLogger(__name__)
STATE_DIR = "train-state"
INFO_FILE = "train_info.json"


@dataclass(frozen=True)
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    fmt: str = "v2"
    epochs: float = 3.0
    lr: float = 1e-3
    batch_size: int = 256          # rows (token positions) per step
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.05      # the cosine ends at lr * min_lr_frac
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    head_decay: float = 0.8        # loss weight of head k: head_decay ** k
    heldout_frac: float = 0.1      # share of samples (never rows of the same sample) kept for evaluation
    eval_rows: int = 2048          # held-out rows scored at each evaluation
    eval_every: int = 50           # steps
    checkpoint_every_s: float = 180.0
    seed: int = 0
    # "full": softmax over the whole vocabulary. "seen": only over the tokens that occur as training targets; "N":
    # over the N most frequent of them. A restricted vocabulary is ~10x cheaper for 50k-token vocabularies and is
    # saved with the heads, which then propose only from it: logits they never trained cannot win a proposal
    train_vocab: str = "full"
    # weight of the base model's own distribution in each head's target, next to the hard label (its greedy token):
    # head k at row t learns (1 - w) * onehot(token t + k + 2) + w * softmax(lm_head(h_{t+k+1})) over the proposal
    # vocabulary. The base distribution comes from the stored hidden states, so it costs one more vocabulary product
    soft_labels: float = 0.0
    # early stopping: stop after this many evaluations without a better held-out score (the head_decay-weighted mean
    # top-1), then keep the best heads seen; 0 trains the whole schedule and keeps the last
    patience: int = 0

    def __post_init__(self):
        if self.num_heads < 1:
            raise ValueError(f"--num-heads must be >= 1, got {self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {self.num_layers}")
        if self.fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.train_vocab not in ("full", "seen") and not (self.train_vocab.isdigit() and int(self.train_vocab) > 0):
            raise ValueError(f"--train-vocab must be full, seen or a positive number of tokens, got {self.train_vocab!r}")
        if self.patience < 0:
            raise ValueError(f"--patience must be >= 0, got {self.patience}")
        if not 0.0 <= self.soft_labels <= 1.0:
            raise ValueError(f"--soft-labels must be between 0 and 1, got {self.soft_labels}")
        if self.soft_labels and self.fmt == "v1":
            raise ValueError("--soft-labels needs heads that share the base lm_head (--format v2 or hydra)")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("--epochs and --lr must be > 0 and --batch-size >= 1")


def proposal_vocab(labels: np.ndarray, vocab_size: int, mode: str) -> np.ndarray | None:
    """Sorted token ids the heads train on and propose from: None for the full vocabulary, every target token
    for "seen", else the int(mode) most frequent targets."""
    if mode == "full":
        return None
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=vocab_size)
    seen = np.flatnonzero(counts)
    if mode != "seen" and int(mode) < len(seen):
        seen = np.sort(seen[np.argsort(-counts[seen], kind="stable")[:int(mode)]])
    return seen.astype(np.int32)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_frac))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class Split:
    store: FeatureStore
    rows: np.ndarray      # indices into the store's hidden rows
    labels: np.ndarray    # (rows, 1 + num_heads); column 0 is the base model's next token
    samples: np.ndarray   # sample indices

    @classmethod
    def of(cls, store: FeatureStore, num_heads: int, ids: np.ndarray) -> "Split":
        """The samples `ids` of a store, without rows whose first head target is past the sample's end."""
        rows, labels = store.labels(num_heads, ids)
        useful = labels[:, 1] != IGNORE
        return cls(store, rows[useful], labels[useful], ids)


def split_samples(store: FeatureStore, cfg: TrainConfig, heldout: FeatureStore | None = None) -> tuple[Split, Split]:
    """Held-out split by whole samples, or every sample for training when the held-out set is another store."""
    n = len(store.samples)
    if heldout is not None:
        train = Split.of(store, cfg.num_heads, np.arange(n))
        held = Split.of(heldout, cfg.num_heads, np.arange(len(heldout.samples)))
    else:
        order = np.random.default_rng(cfg.seed).permutation(n)
        n_held = min(n - 1, max(1, round(n * cfg.heldout_frac))) if n > 1 else 0
        train, held = (Split.of(store, cfg.num_heads, np.sort(ids)) for ids in (order[n_held:], order[:n_held]))
    if len(train.rows) == 0:
        raise ValueError("no training rows: answers are too short for the requested number of heads")
    return train, held


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    heldout_top1: list[float]
    wall_s: float
    train_rows: int
    heldout_samples: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None   # early stopping: the step whose heads were kept


class HeadTrainer:
    def __init__(self, store: FeatureStore, base_lm_head: Tensor, cfg: TrainConfig, base_model: str = "",
                 heldout: FeatureStore | None = None):
        """heldout: a feature store of answers to prompts from another source, scored instead of a share of `store`."""
        self.store, self.cfg = store, cfg
        dim, vocab = base_lm_head.shape[1], base_lm_head.shape[0]
        for what, s in (("features", store), ("held-out features", heldout)):
            if s is not None and s.meta["dim"] != dim:
                raise ValueError(f"{what} have hidden size {s.meta['dim']} but the model's is {dim}")
        # a detached, float32 lm_head: never updated (v2) and only a starting point for v1's own copies
        self.base = base_lm_head.cast(dtypes.float32).contiguous().realize().detach()
        self.heads = MedusaHeads(MedusaConfig(cfg.num_heads, cfg.num_layers, dim, vocab, cfg.fmt, base_model), self.base)
        self.params = self.heads.trainable()
        for p in self.params:
            p.replace(p.contiguous().realize())
        self.opt = AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.train_split, self.held_split = split_samples(store, cfg, heldout)
        self.best: dict | None = None  # early stopping: {"score", "step", "bad", "heads": {name: array}}
        # training logits cover `vocab_ids`; labels are remapped to positions in it (IGNORE outside it)
        self.vocab_ids = proposal_vocab(self.train_split.labels[:, 1:], vocab, cfg.train_vocab)
        self.heads.restrict_vocab(self.vocab_ids)
        self.remap = np.arange(vocab, dtype=np.int32) if self.vocab_ids is None else np.full(vocab, IGNORE, np.int32)
        if self.vocab_ids is not None:
            self.remap[self.vocab_ids] = np.arange(len(self.vocab_ids), dtype=np.int32)
        self.steps_per_epoch = math.ceil(len(self.train_split.rows) / cfg.batch_size)
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.weights = Tensor([cfg.head_decay ** k for k in range(cfg.num_heads)])
        self.to_logits = self.to_hidden = None
        if self.heads.config.shares_lm_head:  # the frozen rows as the two products of _frozen_vocab_backward
            rows = self.heads._base_rows if self.vocab_ids is not None else self.base
            V = rows.shape[0]
            self.to_logits, self.to_hidden = Linear(dim, V), Linear(V, dim)
            Tensor.realize(*self.to_logits.set(rows), *self.to_hidden.set(rows.T))
        self._train_step = TinyJit(self._step)
        self._predict = TinyJit(self._topk)
        self.step = 0

    # -- captured kernels ------------------------------------------------------------------------------------
    def _losses(self, x: Tensor, y: Tensor, tokens: Tensor, x_next: Tensor | None = None) -> Tensor:
        """Per-head mean cross-entropy over the rows whose label is not IGNORE: (num_heads,)."""
        logits = self.heads(x, tokens=tokens).contiguous()                      # (H, R, V or |vocab_ids|)
        targets = y.T                                                            # (H, R)
        valid = targets != IGNORE
        if x_next is not None:  # soft labels, through autograd: the reference for _frozen_vocab_backward's gradient
            target = self._targets(targets, valid, logits.shape[-1], x_next)
            nll = -(target * logits.log_softmax(-1)).sum(-1) * valid
            return nll.sum(-1) / valid.sum(-1).maximum(1)
        picked = logits.gather(-1, valid.where(targets, 0).unsqueeze(-1)).squeeze(-1)
        nll = (logits.logsumexp(-1) - picked) * valid
        return nll.sum(-1) / valid.sum(-1).maximum(1)

    def _targets(self, targets: Tensor, valid: Tensor, vocab: int, x_next: Tensor | None) -> Tensor:
        """Each head's target distribution over the proposal vocabulary (H, R, V'): the one-hot hard label, mixed with
        the base model's distribution at the target's own row (x_next, (R, H, D)) when soft labels are on."""
        onehot = (valid.where(targets, 0).unsqueeze(-1) == Tensor.arange(vocab).to(targets.device)).float()
        if x_next is None:
            return onehot
        teacher = self.to_logits(x_next.permute(1, 0, 2)).softmax(-1).detach()
        w = self.cfg.soft_labels
        return onehot * (1 - w) + teacher * w

    def _frozen_vocab_backward(self, x: Tensor, y: Tensor, tokens: Tensor, x_next: Tensor | None = None) -> Tensor:
        """v2's loss and gradients with the vocabulary products written out. The projection onto the frozen lm_head
        rows is most of a step's work; autograd would lay out its backward product as tinygrad likes, which runs as
        scalar chains on one core. Written by hand, both products are model.Linear products (the fast kernels):
        forward logits = z @ rows.T, backward dz = dlogits @ rows, with dlogits = softmax - onehot (the gradient of
        the mean cross-entropy), scaled by each head's weight over its valid rows. Autograd then carries dz through
        the ResBlocks alone: d(sum(z * dz))/dparams is the loss's gradient."""
        feats = Tensor.stack(*self.heads.features(x, tokens=tokens))            # (H, R, D)
        logits = self.to_logits(feats.detach())                                  # (H, R, V')
        targets = y.T                                                            # (H, R)
        valid = targets != IGNORE
        logp = logits.log_softmax(-1)
        target = self._targets(targets, valid, logits.shape[-1], x_next)        # (H, R, V'), rows sum to 1
        count = valid.sum(-1).maximum(1)
        per_head = -((target * logp).sum(-1) * valid).sum(-1) / count           # (H,)
        coef = (self.weights / count).reshape(-1, 1, 1) * valid.unsqueeze(-1)
        dlogits = ((logp.exp() - target) * coef).contiguous()
        dz = self.to_hidden(dlogits)
        (feats * dz.detach()).sum().backward()
        return per_head

    def _step(self, x: Tensor, y: Tensor, tokens: Tensor, x_next: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens (R, num_heads): the true token each head continues (read by sequential heads only); x_next
        (R, num_heads, D): the hidden row of each head's target (soft labels only)."""
        self.opt.zero_grad()
        if self.to_logits is not None:
            per_head = self._frozen_vocab_backward(x, y, tokens, x_next)
        else:
            per_head = self._losses(x, y, tokens)
            (per_head * self.weights).sum().backward()
        # contiguous: without these boundaries the norm (a reduction over every gradient) is fused into each
        # element's update and recomputed per element, which made a step ~100x slower
        grads = [p.grad.contiguous() for p in self.params]
        norm = sum((g.float().square().sum() for g in grads), Tensor(0.0)).sqrt().contiguous()
        scale = (self.cfg.clip_norm / (norm + 1e-6)).minimum(1.0)
        for p, g in zip(self.params, grads):
            p.grad = g * scale
        self.opt.step()
        return per_head.realize(), norm.realize()

    def _topk(self, x: Tensor, root: Tensor) -> Tensor:
        return self.heads.propose(x, 5, root=root).realize()                    # (H, R, 5)

    # -- data ------------------------------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Rows of step `step`: epoch e visits the train rows in an order fixed by (seed, e), so a resumed run
        replays exactly the batches an uninterrupted one would have seen."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_split.rows))
        pick = order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        labels, rows = self.train_split.labels[pick], self.train_split.rows[pick]
        head_labels = labels[:, 1:]
        batch = self._tensors(rows, labels[:, :-1], np.where(head_labels == IGNORE, IGNORE, self.remap[head_labels]))
        store = self.train_split.store
        if not self.cfg.soft_labels:
            return batch
        # head k's target at row r is the base model's token at row r + k + 1: its distribution is read there
        # (rows past the answer's end are masked; they read row r itself)
        target_rows = np.where(head_labels != IGNORE, rows[:, None] + np.arange(1, self.cfg.num_heads + 1), rows[:, None])
        return (*batch, Tensor(_hidden_rows(store, target_rows.ravel(), self.cfg.batch_size * self.cfg.num_heads)
                               .reshape(self.cfg.batch_size, self.cfg.num_heads, -1)))

    def _tensors(self, rows: np.ndarray, tokens: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """Training rows' hidden states, remapped head labels and the tokens each head continues (IGNORE past the end
        reads token 0, whose target is masked), padded to the batch size."""
        B = self.cfg.batch_size
        x = _hidden_rows(self.train_split.store, rows, B)
        tok = np.zeros((B, tokens.shape[1]), dtype=np.int32)
        tok[:len(rows)] = np.maximum(tokens, 0)
        y = np.full((B, self.cfg.num_heads), IGNORE, dtype=np.int32)
        y[:len(rows)] = labels
        return Tensor(x), Tensor(y), Tensor(tok)

    def predict(self, rows: np.ndarray, roots: np.ndarray, store: FeatureStore | None = None) -> np.ndarray:
        """Top-5 token ids of every head at the given rows, as generation proposes them (a sequential head continues
        the previous head's best candidate; head 0 the root, the base model's token at that row):
        (num_heads, len(rows), 5)."""
        out = []
        for i in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[i:i + self.cfg.batch_size]
            root = np.zeros(self.cfg.batch_size, dtype=np.int32)
            root[:len(chunk)] = np.maximum(roots[i:i + self.cfg.batch_size], 0)
            x = Tensor(_hidden_rows(store or self.train_split.store, chunk, self.cfg.batch_size))
            out.append(self._predict(x, Tensor(root)).numpy()[:, :len(chunk)])
        return np.concatenate(out, axis=1) if out else np.zeros((self.cfg.num_heads, 0, 5), dtype=np.int32)

    def heldout_accuracy(self) -> list[float]:
        split = self.held_split
        rows, labels = split.rows[:self.cfg.eval_rows], split.labels[:self.cfg.eval_rows, 1:]
        if len(rows) == 0:
            return []
        top1 = self.predict(rows, split.labels[:self.cfg.eval_rows, 0], split.store)[..., 0]  # (H, R)
        return [float((top1[k] == labels[:, k])[labels[:, k] != IGNORE].mean()) for k in range(self.cfg.num_heads)]

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Tensor]:
        return {**{f"heads.{k}": v for k, v in self.heads.state_dict().items()},
                **{f"opt.{k}": v for k, v in get_state_dict(self.opt).items() if k != "lr"}}

    def save_state(self, out: Path) -> None:
        d = out / STATE_DIR
        d.mkdir(parents=True, exist_ok=True)
        (d / "progress.json").unlink(missing_ok=True)
        state = {k: v.contiguous().realize() for k, v in self._state().items()}
        best = None
        if self.best is not None:  # early stopping's best heads so far, so that a resumed run still keeps them
            state.update({f"best.{k}": Tensor(v) for k, v in self.best["heads"].items()})
            best = {k: v for k, v in self.best.items() if k != "heads"}
        safe_save(state, str(d / "state.safetensors"))
        (d / "progress.json").write_text(json.dumps({"step": self.step, "config": asdict(self.cfg), "best": best}))

    def load_state(self, out: Path) -> bool:
        d = out / STATE_DIR
        if (progress := resume_progress(d, asdict(self.cfg))) is None:
            return False
        saved = safe_load(str(d / "state.safetensors"))
        for name, t in self._state().items():
            t.assign(saved[name].to(t.device).cast(t.dtype)).realize()
        self.step = int(progress["step"])
        if progress.get("best"):
            heads = {k.removeprefix("best."): v.numpy() for k, v in saved.items() if k.startswith("best.")}
            self.best = {**progress["best"], "heads": heads}
        log.info("resumed at step %d of %d", self.step, self.total_steps)
        return True

    # -- loop ------------------------------------------------------------------------------------------------
    def train(self, out: Path, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to the end of the schedule, or only until step `stop_after` (then the state is saved to resume)."""
        if resume:
            self.load_state(out)
        t0, last_ckpt, history = time.perf_counter(), time.perf_counter(), []
        bar = Progress(self.total_steps, "train", "steps")
        bar.done = self.step
        acc, loss = [], float("nan")
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        stopped = False
        while self.step < end:
            self.opt.lr.assign(Tensor([lr_at(self.step, self.total_steps, self.cfg)], dtype=self.opt.lr.dtype)).realize()
            with Context(TRAINING=1):
                per_head, norm = self._train_step(*self._batch(self.step))
            per_head = per_head.numpy()
            loss = float((per_head * self.weights.numpy()).sum())
            self.step += 1
            stop = False
            if self.step % self.cfg.eval_every == 0 or self.step == self.total_steps:
                acc = self.heldout_accuracy()
                history.append({"step": self.step, "loss": loss, "heldout_top1": acc,
                                "train_tokens": self.step * self.cfg.batch_size})
                stop = self._early_stop(acc)
            bar.update(1, loss=loss, **{f"h{k}": a for k, a in enumerate(acc)})
            if stop:
                log.info("early stop at step %d: no better held-out score in %d evaluations since step %d",
                         self.step, self.cfg.patience, self.best["step"])
                stopped = True
                break
            if time.perf_counter() - last_ckpt > self.cfg.checkpoint_every_s and self.step < self.total_steps:
                self.save_state(out)
                last_ckpt = time.perf_counter()
        bar.close()
        best_step = None
        if not stopped and self.step < self.total_steps:  # stopped at stop_after: the state resumes later
            self.save_state(out)
        elif self.best is not None:  # early stopping: keep the best heads seen
            for name, t in self.heads.state_dict().items():
                t.assign(Tensor(self.best["heads"][name]).to(t.device).cast(t.dtype)).realize()
            best_step, acc = self.best["step"], self.best["acc"]
        return TrainResult(self.step, loss, acc, time.perf_counter() - t0, len(self.train_split.rows),
                           self.held_split.samples.tolist(), history, best_step)

    def _early_stop(self, acc: list[float]) -> bool:
        """Track the best held-out score (early stopping only); True when patience has run out."""
        if not self.cfg.patience or not acc:
            return False
        score = float(np.dot(acc, self.weights.numpy()) / self.weights.numpy().sum())
        if self.best is None or score > self.best["score"]:
            self.best = {"score": score, "step": self.step, "acc": acc, "bad": 0,
                         "heads": {k: v.numpy() for k, v in self.heads.state_dict().items()}}
            return False
        self.best["bad"] += 1
        return self.best["bad"] >= self.cfg.patience


def _hidden_rows(store: FeatureStore, rows: np.ndarray, pad_to: int) -> np.ndarray:
    """Stored hidden rows as float32, zero-padded to pad_to rows (memmap reads in file order)."""
    x = np.zeros((pad_to, store.meta["dim"]), dtype=np.float32)
    order = np.argsort(rows)
    x[:len(rows)][order] = store.hidden[rows[order]].astype(np.float32)
    return x


def write_heads(trainer: HeadTrainer, out: Path, info: dict) -> Path:
    """train_info.json, then the heads (MedusaHeads.save writes config.json last), then drop the resume state."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    trainer.heads.save(out)
    state = out / STATE_DIR
    for f in ("progress.json", "state.safetensors"):
        (state / f).unlink(missing_ok=True)
    if state.is_dir():
        state.rmdir()
    return out
