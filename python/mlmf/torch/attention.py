"""``CrossModalAttention`` as a ``torch.nn.Module`` with mlmf's semantics and tensor names.

The layer computes what ``mlmf.CrossModalAttention`` computes (docs/attention.md):

    q = q_proj(query) -> [B, H, Tq, hd];  k, v = k_proj(kv), v_proj(kv) -> [B, Hkv, Tk, hd]
    qk_norm:  q, k = x * w / sqrt(mean(x^2 over hd) + qk_norm_eps)   (q_norm / k_norm)
    rope:     q, k = x * cos + rotate_half(x) * sin, positions 0..T-1 / rope_scale
    query head h reads kv head h // (H // Hkv)
    logits = q k^T / (temperature * sqrt(hd));  softcap: c * tanh(logits / c)
    allowed keys: kv_mask 1 and, with sliding_window w, |i - j| <= w
    top_k / sparsity_ratio: per query row and head the k largest allowed logits
    weights = softmax over the allowed keys;  out = out_proj(merge(weights v))
    a query row with query_mask 0 or without an allowed key: weights 0 and output 0

The choice of keys (top_k / sparsity_ratio) is made on the detached logits: no
gradient flows through it, only through the kept logits.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn


class HeadRmsNorm(nn.Module):
    """``x * weight / sqrt(mean(x^2) + eps)`` over the last axis (mlmf's qk_norm / RMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + self.eps)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: Tensor, base: float, scale: float) -> Tensor:
    """Rotary embedding of ``x`` [..., T, hd] at positions 0..T-1 (angles in float64)."""
    t, hd = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = (torch.arange(t, dtype=torch.float64) / scale)[:, None] * inv_freq[None, :]
    emb = torch.cat((angle, angle), dim=-1).to(device=x.device)
    return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)


def as_bool_mask(mask: Optional[Tensor], shape: tuple[int, int], device: Any) -> Optional[Tensor]:
    """A [B, T] 0/1 (or bool) mask as bool, checked against ``shape``."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)}, expected {shape}")
    return mask != 0


class CrossModalAttention(nn.Module):
    """Multi-head cross-modal attention (``mlmf.CrossModalAttention``'s semantics).

    Submodules ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear`` with
    biases) and, with ``qk_norm``, ``q_norm`` / ``k_norm`` (a ``weight`` of ``[head_dim]``):
    the state_dict names are mlmf's tensor names.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        kv_dim: Optional[int] = None,
        *,
        head_dim: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        temperature: float = 1.0,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        softcap: Optional[float] = None,
        sliding_window: Optional[int] = None,
        top_k: Optional[int] = None,
        sparsity_ratio: Optional[float] = None,
        rope_base: Optional[float] = None,
        rope_scale: float = 1.0,
        adaptive: bool = False,
    ) -> None:
        super().__init__()
        if adaptive:
            raise NotImplementedError(
                "mlmf.torch.CrossModalAttention does not implement adaptive=True (per-row "
                "temperature and sparsity); use mlmf.CrossModalAttention for it"
            )
        kv_dim = dim if kv_dim is None else kv_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"num_heads {num_heads} does not divide dim {dim}: set head_dim")
            head_dim = dim // num_heads
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(f"num_kv_heads {kv_heads} does not divide num_heads {num_heads}")
        if rope_base is not None and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        if top_k is not None and sparsity_ratio is not None:
            raise ValueError("top_k and sparsity_ratio cannot be combined")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if sparsity_ratio is not None and not 0.0 <= sparsity_ratio < 1.0:
            raise ValueError(f"sparsity_ratio must be in [0, 1), got {sparsity_ratio}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.dim, self.kv_dim, self.num_heads = dim, kv_dim, num_heads
        self.head_dim, self.num_kv_heads = head_dim, kv_heads
        self.temperature = temperature
        self.qk_norm_eps = qk_norm_eps
        self.softcap, self.sliding_window = softcap, sliding_window
        self.top_k, self.sparsity_ratio = top_k, sparsity_ratio
        self.rope_base, self.rope_scale = rope_base, rope_scale
        self.q_proj = nn.Linear(dim, num_heads * head_dim)
        self.k_proj = nn.Linear(kv_dim, kv_heads * head_dim)
        self.v_proj = nn.Linear(kv_dim, kv_heads * head_dim)
        self.out_proj = nn.Linear(num_heads * head_dim, dim)
        if qk_norm:
            self.q_norm = HeadRmsNorm(head_dim, qk_norm_eps)
            self.k_norm = HeadRmsNorm(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    @property
    def config(self) -> dict[str, Any]:
        """The constructor keywords (as ``mlmf.CrossModalAttention`` takes them)."""
        return {
            "dim": self.dim,
            "num_heads": self.num_heads,
            "kv_dim": self.kv_dim,
            "head_dim": self.head_dim,
            "num_kv_heads": self.num_kv_heads,
            "temperature": self.temperature,
            "qk_norm": self.q_norm is not None,
            "qk_norm_eps": self.qk_norm_eps,
            "softcap": self.softcap,
            "sliding_window": self.sliding_window,
            "top_k": self.top_k,
            "sparsity_ratio": self.sparsity_ratio,
            "rope_base": self.rope_base,
            "rope_scale": self.rope_scale,
        }

    def _keys_to_keep(self, n_allowed: Tensor) -> Tensor:
        """How many keys top_k / sparsity_ratio keep in a row with ``n_allowed`` keys."""
        if self.top_k is not None:
            k = torch.full_like(n_allowed, self.top_k)
        else:
            kf = torch.ceil((1.0 - self.sparsity_ratio) * n_allowed.to(torch.float64))
            k = kf.to(n_allowed.dtype).clamp(min=1)
        return torch.minimum(k, n_allowed)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        query_mask: Optional[Tensor] = None,
        kv_mask: Optional[Tensor] = None,
        return_weights: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``query`` [B, Tq, dim], ``key_value`` [B, Tk, kv_dim], masks [B, T] of 0/1.

        Returns the output [B, Tq, dim] and, with ``return_weights``, the weights
        [B, H, Tq, Tk] (else None).
        """
        if query.dim() != 3 or key_value.dim() != 3:
            raise ValueError("query and key_value must be [B, T, D]")
        b, tq, _ = query.shape
        if key_value.shape[0] != b:
            raise ValueError(f"batch sizes differ: {b} and {key_value.shape[0]}")
        tk = key_value.shape[1]
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qm = as_bool_mask(query_mask, (b, tq), query.device)
        km = as_bool_mask(kv_mask, (b, tk), query.device)

        q = self.q_proj(query).view(b, tq, h, hd).transpose(1, 2)
        k = self.k_proj(key_value).view(b, tk, hkv, hd).transpose(1, 2)
        v = self.v_proj(key_value).view(b, tk, hkv, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:
            q = _rope(q, self.rope_base, self.rope_scale)
            k = _rope(k, self.rope_base, self.rope_scale)
        if hkv != h:
            k = k.repeat_interleave(h // hkv, dim=1)
            v = v.repeat_interleave(h // hkv, dim=1)
        logits = q @ k.transpose(-1, -2) / (self.temperature * math.sqrt(hd))
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)

        allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=query.device)
        if km is not None:
            allowed = allowed & km[:, None, None, :]
        if self.sliding_window is not None:
            i = torch.arange(tq, device=query.device)[:, None]
            j = torch.arange(tk, device=query.device)[None, :]
            allowed = allowed & ((i - j).abs() <= self.sliding_window)[None, None]
        has_key = allowed.any(dim=-1)[:, 0]  # [B, Tq]
        if self.top_k is not None or self.sparsity_ratio is not None:
            n_allowed = allowed.sum(dim=-1)  # [B, 1, Tq]
            keep = self._keys_to_keep(n_allowed)
            detached = logits.detach().masked_fill(~allowed, -math.inf)
            ranked = detached.sort(dim=-1, descending=True).values
            index = (keep - 1).clamp(min=0)[..., None].expand(b, h, tq, 1)
            kth = ranked.gather(-1, index)
            allowed = allowed & (detached >= kth)  # ties at the k-th value are all kept
        allowed = allowed.expand(b, h, tq, tk)
        row_live = allowed.any(dim=-1, keepdim=True)
        # Rows without a key get a finite softmax input, then weights 0 (no NaN, no gradient).
        filled = logits.masked_fill(~allowed, -math.inf).masked_fill(~row_live, 0.0)
        weights = torch.softmax(filled, dim=-1) * row_live
        keep_row = has_key if qm is None else has_key & qm
        weights = weights * keep_row[:, None, :, None]
        ctx = (weights @ v).transpose(1, 2).reshape(b, tq, h * hd)
        out = self.out_proj(ctx) * keep_row[..., None]
        return out, (weights if return_weights else None)
