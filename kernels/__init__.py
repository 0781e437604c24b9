"""Triton kernels, each beside its torch reference (docs/design.md §9.1).

* :func:`mla_decode` - absorbed-MLA decode attention over a paged latent cache, with its natural-log LSE;
* :func:`helix_combine` - the exact log-sum-exp merge of per-rank partials (Helix step 4), and
  :func:`helix_combine_uv`, the same merge fused with the local heads' W_UV (steps 4-5 of a decode step);
* :func:`moe_decode` - the routed (and shared) experts of a decode batch, reading only the chosen local experts;
* :func:`route` - the MoE router of a decode batch: gate GEMV, scores, group-limited top-k without a sort;
* :func:`add_rms_norm` - residual add + RMSNorm in one pass.

``mla_decode`` also has a CUDA C++ split kernel (kernels/mla_decode.cu, :func:`mla_decode_cuda`). Each takes ``path``
(kernels/_triton.py): ``auto`` runs the fastest GPU kernel on CUDA tensors and the torch reference on CPU; ``cuda``,
``triton`` or ``torch`` forces one (Triton on CPU tensors runs under Triton's interpreter). A run's path is its
``Execution.kernels`` (helix/spec.py), whose default is ``HELIX_KERNELS``.
"""

from kernels.helix_combine import (helix_combine, helix_combine_torch, helix_combine_triton, helix_combine_uv,
                                   helix_combine_uv_torch, helix_combine_uv_triton)
from kernels.mla_decode import MLAConfig, mla_decode, mla_decode_cuda, mla_decode_torch, mla_decode_triton
from kernels.moe_decode import MoEConfig, moe_decode, moe_decode_torch, moe_decode_triton
from kernels.rms_norm import add_rms_norm, add_rms_norm_torch, add_rms_norm_triton
from kernels.router import RouterSpec, route, route_torch, route_triton

__all__ = [
    "MLAConfig",
    "MoEConfig",
    "RouterSpec",
    "add_rms_norm",
    "add_rms_norm_torch",
    "add_rms_norm_triton",
    "helix_combine",
    "helix_combine_torch",
    "helix_combine_triton",
    "helix_combine_uv",
    "helix_combine_uv_torch",
    "helix_combine_uv_triton",
    "mla_decode",
    "mla_decode_cuda",
    "mla_decode_torch",
    "mla_decode_triton",
    "moe_decode",
    "moe_decode_torch",
    "moe_decode_triton",
    "route",
    "route_torch",
    "route_triton",
]
