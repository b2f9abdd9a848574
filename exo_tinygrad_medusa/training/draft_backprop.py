"""The draft head's teacher-forced layer, forward and backward by hand in numpy, for training on the CPU.

tinygrad 0.14 lowers this layer's backward products on the CPU at 4-9 GFLOPS (80 s a step of 8 answers), where
numpy's BLAS runs them several times faster; the math is decoding/draft_head.py's first chain step
(DraftHead.forward_chains(steps=1)), checked against tinygrad's autograd in tests/test_draft_head.py. Weights use
the head's names and [out, in] layouts, so they move between the two as they are."""
from __future__ import annotations

import numpy as np

from ..decoding.draft_head import DraftHeadConfig


def _rot(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _rot_t(y: np.ndarray) -> np.ndarray:
    """The transpose of _rot: d(rot(x)) -> dx."""
    h = y.shape[-1] // 2
    return np.concatenate([y[..., h:], -y[..., :h]], axis=-1)


class _RMS:
    @staticmethod
    def forward(x, g, eps):
        r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        return x * r * g, (x, r, g)

    @staticmethod
    def backward(dy, cache):
        x, r, g = cache
        dg = (dy * x * r).reshape(-1, x.shape[-1]).sum(0)
        dxn = dy * g                                   # gradient wrt x * r
        dx = r * dxn - x * (r ** 3) * (dxn * x).mean(-1, keepdims=True)
        return dx, dg


class DraftLayer:
    """The layer's weights (float32 numpy, DraftHead's names) with a cached forward and its backward."""

    def __init__(self, config: DraftHeadConfig, weights: dict[str, np.ndarray]):
        self.config, self.w = config, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        self._cache = None

    def forward(self, features: np.ndarray, token_embeddings: np.ndarray) -> np.ndarray:
        """(B, T, dim) each -> the guessed f_{i+1} (B, T, dim), causal within the window."""
        c, w = self.config, self.w
        B, T, D = features.shape
        KV, G, hd = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
        x0 = np.concatenate([token_embeddings, features], axis=-1)
        u = x0 @ w["fc"].T
        n1, rms1 = _RMS.forward(u, w["input_norm"], c.norm_eps)
        cos, sin = c.rope(T)
        q = (n1 @ w["q"].T).reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4)       # (B, KV, G, T, hd)
        k = (n1 @ w["k"].T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)             # (B, KV, T, hd)
        v = (n1 @ w["v"].T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
        cs, sn = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)     # (T, hd)
        qr, kr = q * cs + _rot(q) * sn, k * cs + _rot(k) * sn
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        mask = np.where((j <= i) & (j > i - c.window), 0.0, -np.inf).astype(np.float32)
        scale = 1.0 / np.sqrt(hd)
        scores = np.einsum("bkgtd,bksd->bkgts", qr, kr, optimize=True) * scale + mask
        scores -= scores.max(-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(-1, keepdims=True)
        a = np.einsum("bkgts,bksd->bkgtd", p, v, optimize=True)
        a_flat = a.transpose(0, 3, 1, 2, 4).reshape(B, T, -1)
        h1 = u + a_flat @ w["o"].T
        n2, rms2 = _RMS.forward(h1, w["post_norm"], c.norm_eps)
        gate, up = n2 @ w["gate"].T, n2 @ w["up"].T
        sig = 1.0 / (1.0 + np.exp(-gate))
        m = gate * sig * up
        h2 = h1 + m @ w["down"].T
        out, rms3 = _RMS.forward(h2, w["out_norm"], c.norm_eps)
        self._cache = (x0, u, rms1, n1, q, k, v, cs, sn, qr, kr, p, a_flat, rms2, n2, gate, sig, up, m, rms3)
        return out

    def backward(self, d_out: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of every weight for d(loss)/d(out) (B, T, dim), from the last forward's activations."""
        c, w = self.config, self.w
        x0, u, rms1, n1, q, k, v, cs, sn, qr, kr, p, a_flat, rms2, n2, gate, sig, up, m, rms3 = self._cache
        B, T, D = d_out.shape
        KV, G, hd = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
        flat = lambda t: t.reshape(-1, t.shape[-1])
        g = {}
        dh2, g["out_norm"] = _RMS.backward(d_out, rms3)
        g["down"] = flat(dh2).T @ flat(m)
        dm = dh2 @ w["down"]
        dgate = dm * up * (sig * (1 + gate * (1 - sig)))
        dup = dm * gate * sig
        g["gate"], g["up"] = flat(dgate).T @ flat(n2), flat(dup).T @ flat(n2)
        dn2 = dgate @ w["gate"] + dup @ w["up"]
        dh1_norm, g["post_norm"] = _RMS.backward(dn2, rms2)
        dh1 = dh2 + dh1_norm
        g["o"] = flat(dh1).T @ flat(a_flat)
        da = (dh1 @ w["o"]).reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4)      # (B, KV, G, T, hd)
        dp = np.einsum("bkgtd,bksd->bkgts", da, v, optimize=True)
        dv = np.einsum("bkgts,bkgtd->bksd", p, da, optimize=True)
        ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(hd)
        dqr = np.einsum("bkgts,bksd->bkgtd", ds, kr, optimize=True)
        dkr = np.einsum("bkgts,bkgtd->bksd", ds, qr, optimize=True)
        dq, dk = dqr * cs + _rot_t(dqr * sn), dkr * cs + _rot_t(dkr * sn)
        dq_flat = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, -1)
        dk_flat, dv_flat = dk.transpose(0, 2, 1, 3).reshape(B, T, -1), dv.transpose(0, 2, 1, 3).reshape(B, T, -1)
        g["q"], g["k"], g["v"] = (flat(d).T @ flat(n1) for d in (dq_flat, dk_flat, dv_flat))
        dn1 = dq_flat @ w["q"] + dk_flat @ w["k"] + dv_flat @ w["v"]
        du_norm, g["input_norm"] = _RMS.backward(dn1, rms1)
        du = dh1 + du_norm
        g["fc"] = flat(du).T @ flat(x0)
        return g


def losses(out: np.ndarray, target: np.ndarray, valid: np.ndarray, rows: np.ndarray, labels: np.ndarray,
           token_weight: float, ignore: int) -> tuple[float, float, np.ndarray]:
    """Smooth-L1 feature regression over the valid rows plus token_weight x the cross-entropy of labels (indices into
    `rows`, the proposal vocabulary's lm_head rows; `ignore` where there is none). Returns (regression, cross-entropy,
    d(loss)/d(out))."""
    D = out.shape[-1]
    ok = valid.astype(np.float32)[..., None]
    n_ok = max(float(ok.sum()), 1.0)
    diff = out - target
    ad = np.abs(diff)
    reg = float((np.where(ad < 1.0, 0.5 * diff * diff, ad - 0.5).mean(-1, keepdims=True) * ok).sum() / n_ok)
    d_out = np.clip(diff, -1.0, 1.0) / D * ok / n_ok
    has = labels != ignore
    n_has = max(int(has.sum()), 1)
    sel = out[has]                                                            # (N, D)
    logits = sel @ rows.T
    logits -= logits.max(-1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(-1, keepdims=True)
    picked = labels[has]
    ce = float(-np.log(prob[np.arange(len(picked)), picked] + 1e-30).sum() / n_has)
    prob[np.arange(len(picked)), picked] -= 1.0
    d_out[has] += token_weight * (prob @ rows) / n_has
    return reg, ce, d_out.astype(np.float32)


class Adam:
    """AdamW on a dict of numpy arrays (bias-corrected, decoupled weight decay)."""

    def __init__(self, params: dict[str, np.ndarray], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
        self.b1, self.b2, self.eps, self.wd, self.t = b1, b2, eps, weight_decay, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for k, gk in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * gk
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * gk * gk
            params[k] -= lr * (self.m[k] / c1 / (np.sqrt(self.v[k] / c2) + self.eps) + self.wd * params[k])

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"m.{k}": v for k, v in self.m.items()}, **{f"v.{k}": v for k, v in self.v.items()},
                "t": np.array(self.t)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.m = {k: state[f"m.{k}"] for k in self.m}
        self.v = {k: state[f"v.{k}"] for k in self.v}
        self.t = int(state["t"])
