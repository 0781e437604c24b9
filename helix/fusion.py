"""Fusing the decode step's small elementwise chains on CUDA.

A decode step at batch 1-8 is short matrix-vector work, and the many little kernels between the GEMVs cost as
much as the arithmetic (RoPE unfused: ten; RMSNorm and routing have Triton kernels of their own,
kernels/rms_norm.py and kernels/router.py). ``fused_on_cuda(fn, enabled)``
gives the function a module calls: with ``enabled`` (the run's ``Execution.fuse``), fn runs through torch.compile
(inductor) when its first tensor argument is a CUDA tensor of at most 64 rows, so each chain becomes one or two
kernels; anything else (CPU, prefill-sized inputs, ``enabled`` False) runs the plain function, which stays the
definition of the math.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

MAX_ROWS = 64


@functools.cache  # one compiled function per function, shared by every module and model of the process
def _compiled(fn: Callable) -> Callable:
    # Made at the first CUDA call, not when a module is built: torch.compile imports torch._dynamo (~4 s of CPU on
    # a 2-core host), which a CPU-only process, and each of its rank processes, would otherwise pay for nothing.
    return torch.compile(fn, fullgraph=True)


@functools.cache  # one wrapper per function
def _on_cuda(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.is_cuda and first.shape[0] <= MAX_ROWS:
            return _compiled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def fused_on_cuda(fn: Callable, enabled: bool) -> Callable:
    return _on_cuda(fn) if enabled else fn
