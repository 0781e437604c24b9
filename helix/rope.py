"""Rotary position embedding of the runtime, with DeepSeek's YaRN, always at the **global** position.

The R rope dimensions form R/2 pairs, each rotated by angle pos * inv_freq[i]. With ``rope_interleave`` the
pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout); otherwise (x_i, x_{i+R/2}). The output is laid out
[rotated firsts | rotated seconds]; q_pe and k_pe get the same layout, so their dot products are those of
the original layout. Angles are computed in float32 as transformers does, so long positions round alike.
"""

from __future__ import annotations

import math

import torch

from helix.config import ModelConfig, yarn_mscale
from helix.fusion import fused_on_cuda


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [R/2] float32, attention factor that scales cos and sin)."""
    dim, base, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if not rs.is_yarn:
        return 1.0 / pos_freqs, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the trained frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (rs.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    # DeepSeek's formula (transformers differs only when mscale_all_dim is 0, which no released config sets).
    return inv_freq, yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int64 -> cos, sin [T, R/2] float32."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, ..., R] with cos/sin [T, R/2] -> rotated x, same dtype."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Rope:
    """The model's rope: its frequencies on ``device``; ``fuse`` runs both functions fused on CUDA (helix/fusion.py)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str, fuse: bool = True):
        inv_freq, self.attention_factor = inverse_frequencies(cfg)
        self.inv_freq = inv_freq.to(device)
        self.interleave = cfg.rope_interleave or cfg.model_type == "deepseek_v2"  # V2 always rotates adjacent pairs
        self._cos_sin, self._rotate = fused_on_cuda(cos_sin, fuse), fused_on_cuda(rotate, fuse)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cos_sin(positions, self.inv_freq, self.attention_factor)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, cos, sin, self.interleave)
