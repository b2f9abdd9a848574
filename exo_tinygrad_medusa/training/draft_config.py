"""Settings of a draft-head training run (training/draft_trainer.py), kept apart so the CLI reads its defaults
without importing tinygrad."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftTrainConfig:
    steps: int = 4                 # chain depths scored (1..steps drafts a step)
    epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 8            # answers per step
    max_len: int = 256             # positions per answer (longer answers are cut)
    window: int = 64
    train_vocab: int = 8192
    token_weight: float = 0.1      # cross-entropy weight next to the feature regression (EAGLE's 0.1)
    noise: float = 0.1             # uniform noise on the input features (EAGLE's): the head learns to continue
                                   # from imperfect features, as its own guesses are when it drafts
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.05
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    heldout_frac: float = 0.1
    eval_answers: int = 64         # held-out answers scored at each evaluation
    eval_every: int = 100
    checkpoint_every_s: float = 300.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.max_len < 2 or self.window < 1:
            raise ValueError("--steps, --batch-size and --window must be >= 1 and --max-len >= 2")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError("--epochs and --lr must be > 0")
        if self.train_vocab < 1:
            raise ValueError(f"--train-vocab must be a positive number of tokens, got {self.train_vocab}")
