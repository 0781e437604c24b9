"""e4m3 storage, shared by FP8 checkpoints (helix/checkpoint.py, one scale per 128 x 128 weight block) and the FP8
latent KV cache (helix/kv_cache.py, one scale per cache row).

A group of values x is stored as q = e4m3(x / s) with s = max|x| / 448, e4m3's largest finite value, and read as
q * s: no value saturates, none needs calibrating, and each keeps 3 mantissa bits relative to its own magnitude
(values below 2^-6 s lose bits as e4m3 subnormals).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def e4m3_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 scales of groups whose largest magnitudes are ``amax`` (an all-zero group gets the smallest normal)."""
    return (amax.float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (``scale`` broadcast against ``x``)."""
    return (x.float() / scale).to(FP8)
