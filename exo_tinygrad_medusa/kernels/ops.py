"""Small tensor helpers shared by the captured steps, the heads and training."""
from __future__ import annotations

from tinygrad import Tensor, dtypes


def topk_ids(logits: Tensor, k: int) -> Tensor:
    """(..., V) -> (..., k) indices, best first. k repeated argmaxes beat a full sort of a 50k vocabulary."""
    ids, x = [], logits
    vocab = Tensor.arange(logits.shape[-1])
    for _ in range(k):
        best = x.argmax(-1)
        ids.append(best)
        x = (vocab == best.unsqueeze(-1)).where(-float("inf"), x)
    return Tensor.stack(*ids, dim=-1).cast(dtypes.int32)


def take(values: Tensor, index: Tensor) -> Tensor:
    """values[index] for a small 1-D `values`, as an explicit one-hot select: tinygrad 0.14's own gather
    lowering fails its UOp verification for some size-1 index shapes (e.g. the chain-1 tree)."""
    n = values.shape[0]
    return (index.unsqueeze(-1) == Tensor.arange(n).to(values.device)).where(values, 0).sum(-1).cast(values.dtype)
