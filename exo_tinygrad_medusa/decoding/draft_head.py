"""A feature-level draft head (after EAGLE, Li et al. 2024): one decoder layer that continues the base model's own
last hidden states, autoregressively, one drafted token at a time.

Position i of an answer pairs the base model's final normed hidden state there, f_i (the state whose lm_head row
chose token t_i), with the embedding of t_i. The head maps fc([emb(t_i), f_i]) through one Llama-style decoder
layer (causal attention over the answer's earlier positions, within a window) and an output norm to a guess of
f_{i+1}; the base lm_head of that guess, restricted to the head's proposal vocabulary (`vocab_ids`), drafts
t_{i+1}. The next draft feeds the guess back in place of the unknown f_{i+1}.

`forward_chains` is the training-time view of that loop (training-time test): step k at position i is the k-th
draft of the chain that started at position s = i - k + 1. Its query reads a guessed feature, and it attends to the
true keys of positions up to s and, past s, to the keys the chain's own earlier drafts wrote, exactly what the
drafting loop sees at generation time. Step 1 is the plain teacher-forced layer."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import safe_load, safe_save

from ..model.config import ModelConfig
from ..model.transformer import apply_rope

CONFIG_FILE, WEIGHTS_FILE = "draft_config.json", "draft_head.safetensors"
MASKED = -1e9  # a finite "minus infinity": a row whose keys are all masked still has its own key, never a NaN


@dataclass(frozen=True)
class DraftHeadConfig:
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float = 1e-5
    window: int = 64               # earlier positions a query attends to (itself included)
    base_model: str = ""

    @classmethod
    def of(cls, model: ModelConfig, window: int = 64, base_model: str = "") -> "DraftHeadConfig":
        return cls(model.dim, model.n_heads, model.n_kv_heads, model.head_dim, model.hidden_dim, model.vocab_size,
                   model.rope_theta, model.norm_eps, window, base_model)

    def rope(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        # plain rotary frequencies: the head's positions count within one answer, short of any long-context scaling
        inv = self.rope_theta ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angles = np.arange(positions, dtype=np.float32)[:, None] * inv[None, :]
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


class DraftHead:
    def __init__(self, config: DraftHeadConfig, vocab_ids: np.ndarray, out_norm: np.ndarray | None = None,
                 seed: int = 0):
        """vocab_ids: sorted token ids the head drafts from. out_norm: the base model's final norm weight, the output
        norm's starting point (the head guesses normed states). Projections start small and random, fc as the sum
        of its two halves' identities (so a fresh head passes f_i + emb(t_i) on)."""
        c, rng = config, np.random.default_rng(seed)
        self.config, self.vocab_ids = c, np.asarray(vocab_ids, dtype=np.int32)
        def init(rows, cols, scale=0.02):
            return Tensor(rng.normal(0, scale, (rows, cols)).astype(np.float32))
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        eye = np.eye(c.dim, dtype=np.float32)
        self.weights: dict[str, Tensor] = {
            "fc": Tensor(np.concatenate([eye, eye], axis=1)),                       # [dim, 2 dim]: [emb, feature]
            "input_norm": Tensor.ones(c.dim), "q": init(q, c.dim), "k": init(kv, c.dim), "v": init(kv, c.dim),
            "o": init(c.dim, q), "post_norm": Tensor.ones(c.dim),
            "gate": init(c.hidden_dim, c.dim), "up": init(c.hidden_dim, c.dim), "down": init(c.dim, c.hidden_dim),
            "out_norm": Tensor(np.ones(c.dim, np.float32) if out_norm is None else out_norm.astype(np.float32)),
        }
        for w in self.weights.values():
            w.requires_grad = True
        # products that drafting runs packed (draft_steps.py sets them); training and scoring use the float weights
        self.linears: dict = {}

    def parameters(self) -> list[Tensor]:
        return list(self.weights.values())

    # -- the layer -------------------------------------------------------------------------------------------
    def _mm(self, name: str, x: Tensor) -> Tensor:
        """x @ weight.T, through the packed product where drafting installed one."""
        linear = self.linears.get(name)
        return linear(x) if linear is not None else x @ self.weights[name].T

    def _qkv(self, u: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u (B, T, dim) -> q (B, kv, group, T, hd), k and v (B, kv, T, hd), rotated at their positions."""
        c, w, (B, T, _) = self.config, self.weights, u.shape
        x = _rms(u, w["input_norm"], c.norm_eps)
        q = self._mm("q", x).reshape(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self._mm("k", x).reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self._mm("v", x).reshape(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.reshape(B, c.n_kv_heads, c.n_heads // c.n_kv_heads, T, c.head_dim), k, v

    def _finish(self, u: Tensor, attn: Tensor) -> Tensor:
        """attn (B, kv, group, T, hd) -> the guessed normed feature (B, T, dim)."""
        c, w, (B, T, _) = self.config, self.weights, u.shape
        h = u + self._mm("o", attn.reshape(B, c.n_heads, T, c.head_dim).transpose(1, 2).reshape(B, T, -1))
        x = _rms(h, w["post_norm"], c.norm_eps)
        h = h + self._mm("down", self._mm("gate", x).silu() * self._mm("up", x))
        return _rms(h, w["out_norm"], c.norm_eps)

    def inputs(self, features: Tensor, token_embeddings: Tensor) -> Tensor:
        return self._mm("fc", token_embeddings.cat(features, dim=-1))

    def forward_chains(self, features: Tensor, token_embeddings: Tensor, steps: int) -> list[Tensor]:
        """features, token_embeddings (B, T, dim): f_i and emb(t_i) of each answer. Returns `steps` tensors
        (B, T, dim): step k's guess at position i is the k-th draft of the chain started at i - k + 1, a guess of
        f_{i+1} (rows with i < k - 1 belong to no chain: mask them in any loss)."""
        c, T = self.config, features.shape[1]
        cos_np, sin_np = c.rope(T)
        cos, sin = Tensor(cos_np, device=features.device), Tensor(sin_np, device=features.device)
        i = np.arange(T)[:, None]
        j = np.arange(T)[None, :]
        scale = 1.0 / c.head_dim ** 0.5
        outs, keys, values = [], [], []   # keys[m], values[m]: what step m + 1 wrote at each position
        guess = None
        for k in range(1, steps + 1):
            fed = features if guess is None else guess.pad(((0, 0), (1, 0), (0, 0)))[:, :T]  # f or the guess at i - 1
            u = self.inputs(fed, token_embeddings)
            q, key, value = self._qkv(u, cos, sin)
            keys.append(key), values.append(value)
            # the true keys the chain may read: positions <= s = i - k + 1, within the window of position i
            visible = (j <= i - k + 1) & (j > i - c.window)
            base = (q @ keys[0].unsqueeze(2).transpose(-1, -2)) * scale + \
                Tensor(np.where(visible, 0.0, MASKED).astype(np.float32), device=features.device)  # (B, kv, g, T, T)
            # the chain's own drafts: step m wrote position i - (k - m), m = 2..k (the last one is the query itself)
            own_k, own_v = [], []
            for m in range(2, k + 1):
                shift = k - m
                own_k.append(keys[m - 1].pad(((0, 0), (0, 0), (shift, 0), (0, 0)))[:, :, :T])
                own_v.append(values[m - 1].pad(((0, 0), (0, 0), (shift, 0), (0, 0)))[:, :, :T])
            extra = [(q * kk.unsqueeze(2)).sum(-1, keepdim=True) * scale for kk in own_k]  # each (B, kv, g, T, 1)
            scores = base.cat(*extra, dim=-1) if extra else base
            probs = scores.softmax(-1)
            attn = probs[..., :T] @ values[0].unsqueeze(2)
            for n, vv in enumerate(own_v):
                attn = attn + probs[..., T + n:T + n + 1] * vv.unsqueeze(2)
            guess = self._finish(u, attn)
            outs.append(guess)
        return outs

    # -- files -----------------------------------------------------------------------------------------------
    def save(self, out: str | Path) -> None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        safe_save({**{k: v.contiguous().realize() for k, v in self.weights.items()},
                   "vocab_ids": Tensor(self.vocab_ids)}, str(d / WEIGHTS_FILE))
        (d / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))  # last: a directory with it is whole

    @classmethod
    def load(cls, directory: str | Path) -> "DraftHead":
        d = Path(directory)
        if not (d / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{d} holds no draft head ({CONFIG_FILE} is missing)")
        config = DraftHeadConfig(**json.loads((d / CONFIG_FILE).read_text()))
        saved = safe_load(str(d / WEIGHTS_FILE))
        head = cls(config, saved["vocab_ids"].numpy())
        for name, t in head.weights.items():
            if name not in saved or saved[name].shape != t.shape:
                raise ValueError(f"{d / WEIGHTS_FILE}: weight {name!r} missing or of the wrong shape")
            head.weights[name] = saved[name].to(t.device).cast(dtypes.float32).contiguous().realize()
        return head
