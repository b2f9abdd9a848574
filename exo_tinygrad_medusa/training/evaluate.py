"""How good are heads: per-head top-1/top-5 against the model's own greedy continuation, and the mean number of
tokens one greedy verify step yields with a given tree.

With greedy decoding the accepted length follows from the greedy continuation and the heads' top-k at the
hidden state of each step's last accepted token, so it is replayed exactly from stored features
(`replay_acceptance`); `measure_acceptance` runs the real Generator for comparison."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..decoding.generate import Generator
from ..decoding.heads import MedusaHeads
from ..decoding.tree import MedusaTree
from ..model.transformer import Transformer
from ..decoding.sampling import GenerationConfig
from .features import IGNORE


@dataclass
class HeadAccuracy:
    top1: list[float]
    top5: list[float]
    rows: list[int]   # rows with a target, per head


def head_accuracy(predictions: np.ndarray, labels: np.ndarray) -> HeadAccuracy:
    """predictions (H, R, 5) top-5 ids; labels (R, H) head targets with IGNORE past the end."""
    top1, top5, rows = [], [], []
    for k in range(predictions.shape[0]):
        valid = labels[:, k] != IGNORE
        target = labels[valid, k]
        rows.append(int(valid.sum()))
        top1.append(float((predictions[k, valid, 0] == target).mean()) if valid.any() else 0.0)
        top5.append(float((predictions[k, valid] == target[:, None]).any(-1).mean()) if valid.any() else 0.0)
    return HeadAccuracy(top1, top5, rows)


def replay_acceptance(tree: MedusaTree, predictions: np.ndarray, answer: list[int]) -> list[int]:
    """Tokens each greedy verify step yields on one answer. predictions (H, n, K): the heads' ranked guesses at
    the sample's rows (row i = hidden state before answer[i]). Starting with answer[0] as the root, a step at
    root i accepts the deepest tree path whose rank-r guesses of head d equal answer[i + 1 + d], then the bonus
    token answer[i + a + 1] becomes the next root."""
    n, accepted, i = len(answer), [], 0
    paths = [c for c in tree.choices if len(c) <= predictions.shape[0]]
    while i < n - 1:
        best = 0
        for path in paths:
            if len(path) > best and all(i + 1 + d < n and predictions[d, i, r] == answer[i + 1 + d]
                                        for d, r in enumerate(path)):
                best = len(path)
        accepted.append(1 + best)
        i += 1 + best
    return accepted


def measure_acceptance(model: Transformer, eos_ids, heads: MedusaHeads, tree: MedusaTree, prompts: list[list[int]],
                       max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """Mean accepted length of the real Generator (greedy) over prompts, and what it generated."""
    gen = Generator(model, eos_ids, tree, heads)
    lengths, outputs = [], []
    for ids in prompts:
        # the heads alone: context drafts would change the steps the replay predicts
        result = gen.generate(ids, GenerationConfig(max_new_tokens=max_new_tokens, prompt_lookup=False))
        lengths += result.accept_lengths
        outputs.append(result.generated_ids)
    return (float(np.mean(lengths)) if lengths else 1.0), outputs
