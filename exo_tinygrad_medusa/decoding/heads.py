"""Medusa heads: ResBlocks on the final normed hidden state, each head guessing one token further ahead.

Head k reads h_t and predicts token t + k + 2 (the base lm_head predicts t + 1). A head is `num_layers`
ResBlocks x + SiLU(W x + b), then its own lm_head ("v1", the published Medusa-1 layout) or the base model's
("v2": heads stay a few MB even for 150k-token vocabularies). Checkpoints use the published layout:
config.json + medusa_lm_head.safetensors with `{head}.{layer}.linear.weight|bias` and, for v1,
`{head}.{num_layers}.weight`.

"hydra" heads (our format, after Hydra, Ankner et al. 2024) are sequential: head k also reads the token its
proposal continues, so it knows what it follows. Its input is the previous head's output state (h for head 0)
plus a learned map of that token's lm_head row; head 0 reads the root, the base model's own next token, which is
exact, and head k > 0 the best candidate of head k-1. They share the base lm_head as v2 does and add one
`{head}.token.weight` (D x D) per head. In a tree, every node at depth k gets head k's candidates conditioned on
the best node at depth k-1 (one head evaluation per depth, like the parallel heads); a chain is exact Hydra.

Heads may also carry a proposal vocabulary (`vocab_ids`, our extension): the token ids they were trained to
predict. They then propose only from it, which keeps never-trained logits out of the candidates and makes each
head's vocabulary projection as small as that list. Verification is unchanged, so greedy output stays exact."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import safe_load, safe_save, torch_load

from ..model.config import ModelConfig
from ..model.transformer import Linear, Transformer
from ..kernels.packed import PackedWeight
from ..kernels.ops import take, topk_ids

log = logging.getLogger(__name__)
WEIGHTS_FILE = "medusa_lm_head.safetensors"
VOCAB_KEY = "vocab_ids"
FORMATS = ("v1", "v2", "hydra")


@dataclass(frozen=True)
class MedusaConfig:
    medusa_num_heads: int
    medusa_num_layers: int
    hidden_size: int
    vocab_size: int
    # "v1": each head has its own lm_head; "v2": heads share the base model's; "hydra": v2 + sequential heads
    medusa_format: str = "v2"
    base_model_name_or_path: str = ""

    def __post_init__(self):
        if self.medusa_num_heads < 1:
            raise ValueError(f"medusa_num_heads must be >= 1, got {self.medusa_num_heads}")
        if self.medusa_num_layers < 0:
            raise ValueError(f"medusa_num_layers must be >= 0, got {self.medusa_num_layers}")
        if self.medusa_format not in FORMATS:
            raise ValueError(f"medusa_format must be one of {', '.join(FORMATS)}, got {self.medusa_format!r}")

    @property
    def sequential(self) -> bool:
        return self.medusa_format == "hydra"

    @property
    def shares_lm_head(self) -> bool:
        return self.medusa_format != "v1"


class MedusaHeads:
    def __init__(self, config: MedusaConfig, base_lm_head: Tensor | None = None, seed: int | None = None,
                 packed_lm_head: PackedWeight | None = None):
        """packed_lm_head: the same matrix as base_lm_head, packed (Model.packed_logits); the proposal product then
        reads its rows packed."""
        c = config
        self.config = c
        # zero-initialised ResBlocks make a fresh head an identity on h: it starts as a copy of the base lm_head
        self.linear_w = [[Tensor.zeros(c.hidden_size, c.hidden_size).contiguous() for _ in range(c.medusa_num_layers)]
                         for _ in range(c.medusa_num_heads)]
        self.linear_b = [[Tensor.zeros(c.hidden_size).contiguous() for _ in range(c.medusa_num_layers)]
                         for _ in range(c.medusa_num_heads)]
        # hydra: each head's map of the token it continues (zero: a fresh head ignores it)
        self.token_w = [Tensor.zeros(c.hidden_size, c.hidden_size).contiguous() for _ in range(c.medusa_num_heads)] \
            if c.sequential else []
        self.base_lm_head, self.packed_lm_head = base_lm_head, packed_lm_head
        self.lm_heads: list[Tensor] = []
        if c.medusa_format == "v1":
            if base_lm_head is None:
                raise ValueError("v1 heads are initialised from the base lm_head: pass base_lm_head")
            self.lm_heads = [base_lm_head.contiguous() for _ in range(c.medusa_num_heads)]
        self.vocab_ids: Tensor | None = None     # proposal vocabulary, None = the whole vocabulary
        self._base_rows: Tensor | None = None    # base_lm_head[vocab_ids], gathered once for v2
        # the same rows as a model.Linear (panels): the product kernels read them ~3x faster than a matmul does
        self._vocab_product: Linear | None = None
        # after freeze(): the ResBlocks and token maps as panels too (inference only)
        self._block_products: list[list[Linear]] = []
        self._token_products: list[Linear] = []

    def restrict_vocab(self, vocab_ids: np.ndarray | None) -> "MedusaHeads":
        """Propose only tokens from `vocab_ids` (sorted unique ids), or from the whole vocabulary when None."""
        if vocab_ids is None:
            self.vocab_ids = self._base_rows = self._vocab_product = None
            return self
        ids = np.asarray(vocab_ids)
        V = self.config.vocab_size
        if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= V or len(np.unique(ids)) != len(ids):
            raise ValueError(f"Medusa proposal vocabulary must be 1..{V} distinct token ids below {V}, "
                             f"got shape {ids.shape}")
        ids = np.sort(ids).astype(np.int32)
        dev = self.base_lm_head.device if self.base_lm_head is not None else None
        self.vocab_ids = Tensor(ids, device=dev).realize()
        if self.config.shares_lm_head:
            self._vocab_product = Linear(self.config.hidden_size, len(ids))
            if self.packed_lm_head is not None and len(ids) % 4 == 0:  # packed panels hold 4 rows to a word
                self._base_rows = None  # only training reads the float rows, and training heads are never packed
                Tensor.realize(*self._vocab_product.set(self.packed_lm_head.rows(ids)))
            else:
                self._base_rows = self.base_lm_head[self.vocab_ids].contiguous().realize()
                Tensor.realize(*self._vocab_product.set(self._base_rows))
        return self

    @property
    def num_heads(self) -> int:
        return self.config.medusa_num_heads

    @property
    def sequential(self) -> bool:
        """Whether each head continues a token (hydra): proposals then depend on the root."""
        return self.config.sequential

    def trainable(self) -> list[Tensor]:
        params = [t for head in self.linear_w for t in head] + [t for head in self.linear_b for t in head]
        return params + self.token_w + self.lm_heads

    def freeze(self) -> "MedusaHeads":
        """For inference: hold the square weights (ResBlocks, token maps) as model.Linear panels as well. Their
        one-row products then run as vector kernels, ~0.6 -> ~0.1 ms a head on the CPU. The panels are copies, so
        later changes to linear_w/token_w are not seen: training never freezes."""
        D, made = self.config.hidden_size, []

        def panels(weight: Tensor, bias: Tensor | None = None) -> Linear:
            linear = Linear(D, D, bias=bias is not None)
            made.extend(linear.set(weight))
            linear.bias = bias
            return linear
        self._block_products = [[panels(w, b) for w, b in zip(ws, bs)] for ws, bs in zip(self.linear_w, self.linear_b)]
        self._token_products = [panels(w) for w in self.token_w]
        Tensor.realize(*made)
        return self

    def _head(self, h: int, x: Tensor, token: Tensor | None) -> Tensor:
        """Head h's output state from its input state x (..., D); a sequential head adds the token it continues."""
        if self.config.sequential:
            row = self.base_lm_head[token]
            x = x + (self._token_products[h](row) if self._token_products else row @ self.token_w[h].T)
        for l, (w, b) in enumerate(zip(self.linear_w[h], self.linear_b[h])):
            x = x + (self._block_products[h][l](x) if self._block_products else x @ w.T + b).silu()
        # contiguous: otherwise tinygrad fuses the ResBlocks into the vocab projection and recomputes them per token
        return x.contiguous()

    def features(self, hidden: Tensor, num_heads: int | None = None, tokens: Tensor | None = None) -> list[Tensor]:
        """Per head (the first `num_heads`), its output state: (..., D) -> list of (..., D). Sequential heads need
        `tokens` (..., num_heads): column k is the token head k continues (teacher forcing in training)."""
        n = self.num_heads if num_heads is None else num_heads
        if self.config.sequential and tokens is None:
            raise ValueError("sequential (hydra) heads need the tokens they continue")
        out, x = [], hidden
        for h in range(n):
            x = self._head(h, x if self.config.sequential else hidden, tokens[..., h] if self.config.sequential else None)
            out.append(x)
        return out

    def _project(self, h: int, x: Tensor) -> Tensor:
        """Head h's output state(s) (..., D) -> logits over its proposal vocabulary, from the shared lm_head's rows or
        the head's own."""
        if self.config.shares_lm_head:
            return x @ self.base_lm_head.T if self._vocab_product is None else self._vocab_product(x)
        return x @ (self.lm_heads[h] if self.vocab_ids is None else self.lm_heads[h][self.vocab_ids]).T

    def __call__(self, hidden: Tensor, num_heads: int | None = None, tokens: Tensor | None = None) -> Tensor:
        """hidden (..., D) -> logits (num_heads, ..., V) over the proposal vocabulary (V = its size; the whole
        vocabulary unless restricted); a shallow tree needs only its first heads."""
        feats = self.features(hidden, num_heads, tokens)
        if self.config.shares_lm_head:
            return self._project(0, Tensor.stack(*feats))
        return Tensor.stack(*[self._project(h, f) for h, f in enumerate(feats)])

    def _to_vocab(self, ranked: Tensor) -> Tensor:
        return ranked if self.vocab_ids is None else take(self.vocab_ids, ranked.flatten()).reshape(ranked.shape)

    def propose(self, hidden: Tensor, k: int, num_heads: int | None = None, root: Tensor | None = None) -> Tensor:
        """hidden (..., D) -> (num_heads, ..., k) token ids, each head's k best first. Sequential heads need `root`
        (...,): the base model's token after `hidden`; head h > 0 continues head h-1's best candidate."""
        if not self.config.sequential:
            return self._to_vocab(topk_ids(self(hidden, num_heads), k))
        if root is None:
            raise ValueError("sequential (hydra) heads propose from the root token: pass root")
        out, x, token = [], hidden, root.cast(dtypes.int32)
        for h in range(self.num_heads if num_heads is None else num_heads):
            x = self._head(h, x, token)
            ranked = self._to_vocab(topk_ids(self._project(h, x), k))                   # (..., k)
            out.append(ranked)
            token = ranked[..., 0]
        return Tensor.stack(*out)

    def use_first(self, num_heads: int | None = None, num_layers: int | None = None) -> "MedusaHeads":
        """Keep the first heads/layers only (--medusa-num-heads/--medusa-num-layers)."""
        c = self.config
        for name, asked, have in (("heads", num_heads, c.medusa_num_heads), ("layers", num_layers, c.medusa_num_layers)):
            if asked is not None and not 1 <= asked <= have:
                raise ValueError(f"--medusa-num-{name} {asked}: the checkpoint has {have} {name}")
        if num_layers is not None and num_layers != c.medusa_num_layers:
            raise ValueError(f"--medusa-num-layers {num_layers} does not match the checkpoint's {c.medusa_num_layers} "
                             "(ResBlocks are trained as a stack and cannot be dropped)")
        n = num_heads or c.medusa_num_heads
        self.config = MedusaConfig(**{**asdict(c), "medusa_num_heads": n})
        self.linear_w, self.linear_b = self.linear_w[:n], self.linear_b[:n]
        self.lm_heads, self.token_w = self.lm_heads[:n], self.token_w[:n]
        self._block_products, self._token_products = self._block_products[:n], self._token_products[:n]
        return self

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        sd = {}
        for h, (ws, bs) in enumerate(zip(self.linear_w, self.linear_b)):
            for l, (w, b) in enumerate(zip(ws, bs)):
                sd[f"{h}.{l}.linear.weight"], sd[f"{h}.{l}.linear.bias"] = w, b
        for h, w in enumerate(self.lm_heads):
            sd[f"{h}.{self.config.medusa_num_layers}.weight"] = w
        for h, w in enumerate(self.token_w):
            sd[f"{h}.token.weight"] = w
        return sd

    def checkpoint(self) -> dict[str, Tensor]:
        """What a saved checkpoint holds: the weights, plus the proposal vocabulary when there is one."""
        sd = {k: v.cast(dtypes.float32) for k, v in self.state_dict().items()}
        if self.vocab_ids is not None:
            sd[VOCAB_KEY] = self.vocab_ids
        return sd

    def save(self, out_dir: str | Path) -> Path:
        """Write config.json last (via a rename) so a directory never looks complete before its weights are."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"output directory {out} is not writable")
        safe_save({k: v.contiguous().realize() for k, v in self.checkpoint().items()}, str(out / WEIGHTS_FILE))
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".json")
        with os.fdopen(fd, "w") as f:
            extra = {} if self.vocab_ids is None else {"medusa_proposal_vocab_size": int(self.vocab_ids.shape[0])}
            json.dump({**asdict(self.config), **extra}, f, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is meant to be shared
        os.replace(tmp, out / "config.json")
        return out


def _resolve_dir(path_or_repo: str) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if path_or_repo.count("/") == 1 and not path_or_repo.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(path_or_repo, allow_patterns=["config.json", "medusa_lm_head.*"]))
        except Exception as e:  # offline, 404, auth: one clear line
            raise FileNotFoundError(f"Medusa heads {path_or_repo!r}: not a local path and the hub download failed "
                                    f"({type(e).__name__})") from None
    raise FileNotFoundError(f"Medusa heads {path_or_repo!r} not found (expected a directory with config.json and "
                            f"{WEIGHTS_FILE}, or an HF repo id)")


def load_heads(path_or_repo: str, model_config: ModelConfig, base_lm_head: Tensor, *, dtype=None,
               device: str | None = None, packed_lm_head: PackedWeight | None = None) -> MedusaHeads:
    """Load and validate heads against the model they will run on; every mismatch names both numbers.
    packed_lm_head: the model's packed logits weight (Model.packed_logits), which the proposals then read."""
    root = _resolve_dir(path_or_repo)
    cfg_path = root / "config.json" if root.is_dir() else root.parent / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"Medusa heads at {root}: missing config.json")
    try:
        raw = json.loads(cfg_path.read_text())
        num_heads, num_layers = int(raw["medusa_num_heads"]), int(raw["medusa_num_layers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"Medusa heads config {cfg_path} is invalid: {e}") from None
    weights = _read_weights(root)
    first = weights.get("0.0.linear.weight")
    hidden = int(raw.get("hidden_size") or (first.shape[0] if first is not None else model_config.dim))
    fmt = raw.get("medusa_format") or ("v1" if f"0.{num_layers}.weight" in weights else "v2")
    if fmt not in FORMATS:
        raise ValueError(f"Medusa heads config {cfg_path}: unknown medusa_format {fmt!r} (known: {', '.join(FORMATS)})")
    lm = weights.get(f"0.{num_layers}.weight")
    vocab = int(raw.get("vocab_size") or (lm.shape[0] if lm is not None else model_config.vocab_size))
    if hidden != model_config.dim:
        raise ValueError(f"Medusa heads have hidden size {hidden} but the model's hidden size is {model_config.dim}")
    if vocab != model_config.vocab_size:
        raise ValueError(f"Medusa heads have vocab size {vocab} but the model's vocab size is {model_config.vocab_size}")
    config = MedusaConfig(num_heads, num_layers, hidden, vocab, fmt, raw.get("base_model_name_or_path", ""))
    heads = MedusaHeads(config, base_lm_head, packed_lm_head=packed_lm_head)
    expected = heads.state_dict()
    target = dtype or base_lm_head.dtype
    loaded = {}
    for name, want in expected.items():
        if name not in weights:
            raise ValueError(f"Medusa heads {root}: missing tensor {name!r} for {num_heads} heads x {num_layers} layers")
        got = weights[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"Medusa heads tensor {name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        loaded[name] = got.to(device or base_lm_head.device).cast(target).contiguous()
    Tensor.realize(*loaded.values())
    for h in range(num_heads):
        for l in range(num_layers):
            heads.linear_w[h][l], heads.linear_b[h][l] = loaded[f"{h}.{l}.linear.weight"], loaded[f"{h}.{l}.linear.bias"]
        if fmt == "v1":
            heads.lm_heads[h] = loaded[f"{h}.{num_layers}.weight"]
        if config.sequential:
            heads.token_w[h] = loaded[f"{h}.token.weight"]
    if VOCAB_KEY in weights:
        heads.restrict_vocab(weights[VOCAB_KEY].numpy())
    heads.freeze()
    log.info("loaded %d Medusa heads (%s, %d layer(s)%s) from %s", num_heads, fmt, num_layers,
             "" if heads.vocab_ids is None else f", proposing from {heads.vocab_ids.shape[0]} tokens", root)
    return heads


def load_heads_for(path_or_repo: str, model: Transformer) -> MedusaHeads:
    """load_heads for a loaded model (its last shard): its config and lm_head, its packed logits weight if any."""
    return load_heads(path_or_repo, model.config, model.lm_head, packed_lm_head=model.packed_logits)


def _read_weights(root: Path) -> dict[str, Tensor]:
    candidates = [root] if root.is_file() else [root / WEIGHTS_FILE, root / "medusa_lm_head.pt", root / "medusa_lm_head.bin"]
    for path in candidates:
        if path.is_file():
            try:
                sd = safe_load(str(path)) if path.suffix == ".safetensors" else torch_load(str(path))
            except Exception as e:  # truncated or foreign files fail in many ways inside the readers
                raise ValueError(f"Medusa heads file {path} is corrupt or unreadable ({type(e).__name__}: {e})") from None
            # checkpoints saved from a wrapped module prefix every key with "medusa_head."
            return {k.removeprefix("medusa_head."): v for k, v in sd.items()}
    raise FileNotFoundError(f"Medusa heads at {root}: no {WEIGHTS_FILE} or medusa_lm_head.pt")


def random_heads(model_config: ModelConfig, base_lm_head: Tensor, num_heads: int = 4, num_layers: int = 1,
                 fmt: str = "v2", seed: int = 0, scale: float = 0.02) -> MedusaHeads:
    """Heads with random ResBlocks: test fixtures and benchmarks where accuracy does not matter."""
    rng = np.random.default_rng(seed)
    heads = MedusaHeads(MedusaConfig(num_heads, num_layers, model_config.dim, model_config.vocab_size, fmt), base_lm_head)
    dev, dt = base_lm_head.device, base_lm_head.dtype
    for h in range(num_heads):
        for l in range(num_layers):
            heads.linear_w[h][l] = Tensor((rng.standard_normal((model_config.dim,) * 2) * scale).astype(np.float32),
                                          device=dev).cast(dt).realize()
            heads.linear_b[h][l] = Tensor((rng.standard_normal(model_config.dim) * scale).astype(np.float32),
                                          device=dev).cast(dt).realize()
        if heads.config.sequential:
            heads.token_w[h] = Tensor((rng.standard_normal((model_config.dim,) * 2) * scale).astype(np.float32),
                                      device=dev).cast(dt).realize()
        if fmt == "v1":
            noise = rng.standard_normal(tuple(base_lm_head.shape)).astype(np.float32) * scale
            heads.lm_heads[h] = (base_lm_head + Tensor(noise, device=dev).cast(dt)).contiguous().realize()
    return heads
