"""FFN of the Helix runtime: the N attention ranks re-used as tensor / expert parallel ranks (DESIGN §3 step 6).

Every module here returns this rank's **partial** output; the decoder layer sums the partials with one
all-reduce. Shapes: x [T, D] (T tokens: the decode batch or a prefill chunk), I_r = this rank's slice of an
intermediate width.

* ``GatedMLP``: SiLU(x W_gate^T) * (x W_up^T) W_down^T with W_gate/W_up column-sliced [I_r, D] and W_down
  row-sliced [D, I_r] (dense layers, shared experts, and routed experts in TP mode).
* ``MoE``: routing computed identically on every rank in float32 from the replicated gate; routed experts
  expert-parallel (rank r holds experts [r E/N, (r+1) E/N), whole) or tensor-parallel (all experts, I_r
  slice); shared experts tensor-parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helix.checkpoint import Checkpoint
from helix.config import ModelConfig
from helix.fusion import fused_on_cuda
from helix.mapping import HelixMapping
from kernels import moe_decode
from kernels._triton import use_triton

# up to this many tokens (decode batches) the routed experts run the kernels.moe_decode kernel, which reads each
# chosen expert once per choice (repeats from L2); larger batches (prefill) loop over the chosen experts
DECODE_TOKENS = 64


class GatedMLP:
    def __init__(self, ckpt: Checkpoint, prefix: str, width: int, mapping: HelixMapping | None,
                 dtype: torch.dtype, device):
        """``mapping`` None loads the whole expert (EP); otherwise this rank's TP slice of ``width``."""
        lo, hi = (0, width) if mapping is None else mapping.tp_range(width)
        self.gate = ckpt.get(prefix + "gate_proj.weight", 0, lo, hi, dtype, device)  # [I_r, D]
        self.up = ckpt.get(prefix + "up_proj.weight", 0, lo, hi, dtype, device)  # [I_r, D]
        self.down = ckpt.get(prefix + "down_proj.weight", 1, lo, hi, dtype, device)  # [D, I_r]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


@fused_on_cuda
def route(cfg: ModelConfig, logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 router logits [T, E] -> (expert ids [T, k], weights [T, k] float32).

    V3: sigmoid scores; the correction bias only steers the choice; groups ranked by the sum of their two best
    biased scores, the best ``topk_group`` groups kept, top-k experts among them; weights are the unbiased
    scores, normalised if ``norm_topk_prob``, times ``routed_scaling_factor``.
    V2: softmax scores; ``greedy`` top-k, or ``group_limited_greedy`` with groups ranked by their best score;
    weights normalised if ``norm_topk_prob`` (and k > 1), otherwise scaled (DeepSeek-V2's code).
    """
    t, e = logits.shape
    g = cfg.n_group
    if cfg.scoring_func == "sigmoid":
        scores = logits.sigmoid()
        choice = scores + bias
        group_score = choice.view(t, g, e // g).topk(2, dim=-1).values.sum(-1)
        masked_fill = float("-inf")
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        group_score = choice.view(t, g, e // g).max(dim=-1).values
        masked_fill = 0.0  # as transformers' DeepseekV2TopkRouter
    if cfg.scoring_func == "sigmoid" or cfg.topk_method == "group_limited_greedy":
        keep_groups = group_score.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // g, dim=1), masked_fill)
    ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, ids)
    normalise = cfg.norm_topk_prob and (cfg.scoring_func == "sigmoid" or cfg.num_experts_per_tok > 1)
    if normalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if cfg.scoring_func == "sigmoid" or not normalise:  # DeepSeek-V2 normalises *or* scales, V3 does both
        weights = weights * cfg.routed_scaling_factor
    return ids, weights


class MoE:
    """Routed experts are stacked per rank: gate/up [E_r, I_r, D], down [E_r, D, I_r] (E_r local experts)."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, prefix: str, mapping: HelixMapping, mode: str,
                 dtype: torch.dtype, device):
        self.cfg = cfg
        self.gate = ckpt.get(prefix + "gate.weight", dtype=torch.float32, device=device)  # [E, D], replicated
        self.bias = (ckpt.get(prefix + "gate.e_score_correction_bias", dtype=torch.float32, device=device)
                     if cfg.scoring_func == "sigmoid" else None)
        width = cfg.moe_intermediate_size
        if mode == "ep":
            self.first, last = mapping.expert_range(cfg.n_routed_experts)
            experts = [GatedMLP(ckpt, f"{prefix}experts.{j}.", width, None, dtype, device)
                       for j in range(self.first, last)]
        else:
            self.first = 0
            experts = [GatedMLP(ckpt, f"{prefix}experts.{j}.", width, mapping, dtype, device)
                       for j in range(cfg.n_routed_experts)]
        self.w_gate = torch.stack([e.gate for e in experts])
        self.w_up = torch.stack([e.up for e in experts])
        self.w_down = torch.stack([e.down for e in experts])
        self.shared = (GatedMLP(ckpt, prefix + "shared_experts.", width * cfg.n_shared_experts, mapping, dtype, device)
                       if cfg.n_shared_experts else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = route(self.cfg, F.linear(x.float(), self.gate), self.bias)
        out = self.shared(x) if self.shared is not None else torch.zeros_like(x)
        local = ids - self.first  # [T, k]; in [0, E_r) for this rank's experts, out of range for the others
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or (use_triton(x) and x.shape[0] <= DECODE_TOKENS):
            # decode (on CUDA, or HELIX_KERNELS=triton): no host sync, so CUDA graphs can capture it, and
            # only the chosen local experts are read; eager and captured decode steps run the same kernels
            return out + moe_decode(x, self.w_gate, self.w_up, self.w_down, local, weights)
        mine = (local >= 0) & (local < self.w_gate.shape[0])
        for j in torch.unique(local[mine]).tolist():  # host sync: which experts got tokens
            token, slot = torch.where(local == j)
            h = F.silu(F.linear(x[token], self.w_gate[j])) * F.linear(x[token], self.w_up[j])
            out.index_add_(0, token, F.linear(h, self.w_down[j]) * weights[token, slot, None].to(x.dtype))
        return out
