"""Residual add + RMSNorm of the decode step in one pass (docs/design.md §3.3).

A decoder layer adds each sub-block's output to the residual stream and normalises the sum for the next
sub-block. For rows x, delta [T, D] (delta optional) and weight [D]::

    h = x + delta                                  rounded to x's dtype, as the unfused add would
    y = weight * (h * rsqrt(mean(h^2) + eps))      the normalisation in float32, cast to x's dtype before the
                                                   weight (as transformers does), the product in x's dtype

``add_rms_norm_torch`` is that in torch; the Triton kernel, grid (T,), reads x and delta once and writes h
and y in the same launch (T rows of D values each: the whole row lives in registers).
"""

from __future__ import annotations

import torch

from kernels._triton import interpreting, launcher, next_pow2, tl, triton, use_triton

__all__ = ["add_rms_norm", "add_rms_norm_torch", "add_rms_norm_triton", "rms_norm_torch"]


def _validate(x, delta, weight):
    if x.dim() != 2 or weight.shape != (x.shape[1],) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"add_rms_norm: x and delta must be [T, D] and weight [D]; got {tuple(x.shape)}, "
                         f"{None if delta is None else tuple(delta.shape)}, {tuple(weight.shape)}")
    if weight.dtype != x.dtype or (delta is not None and delta.dtype != x.dtype):
        raise TypeError(f"add_rms_norm: x, delta and weight must share one dtype (x is {x.dtype})")


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back before the weight (as transformers does)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) of the module docstring; without ``delta``, h is x itself."""
    _validate(x, delta, weight)
    h = x if delta is None else x + delta
    return rms_norm_torch(h, weight, eps), h


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, h_ptr, D, s_x, s_d, s_y, s_h, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(x_ptr + t * s_x + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(d_ptr + t * s_d + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(h_ptr.dtype.element_ty)  # the residual stream keeps x's dtype
        tl.store(h_ptr + t * s_h + offs, h, mask=mask)
    hf = h.to(tl.float32)
    n = hf * (1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = n.to(y_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + t * s_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`add_rms_norm` (CUDA, or CPU under the interpreter). Graph-capturable."""
    _validate(x, delta, weight)
    t, d = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = x if delta is None else torch.empty_like(y)
    if t == 0 or d == 0:
        return y, h
    if x.stride(-1) != 1 or (delta is not None and delta.stride(-1) != 1):
        raise ValueError("add_rms_norm: the last dim of x and delta must be contiguous")
    block = next_pow2(d)
    launcher(_add_rms_norm_kernel, interpreting(x))[(t,)](
        x, delta if delta is not None else x, weight, y, h, d, x.stride(0),
        delta.stride(0) if delta is not None else 0, y.stride(0), h.stride(0), eps,
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return y, h


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm.

    Args:
        x: [T, D] residual stream; delta: [T, D] sub-block output to add first, or None; weight: [D]; all one
            float dtype.

    Returns:
        y [T, D] = RMSNorm(x + delta) * weight and h [T, D] = x + delta (x itself without delta), x's dtype.

    ``path``: kernels/_triton.py's rule (auto: Triton on CUDA tensors, the torch reference on CPU).
    """
    if use_triton(x, path):
        return add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_torch(x, delta, weight, eps)
