"""FFN of the Helix runtime: the N attention ranks re-used as tensor / expert parallel ranks
(docs/design.md §3.3 step 6).

Every module here returns this rank's **partial** output; the decoder layer sums the partials with one
all-reduce. Shapes: x [T, D] (T tokens: the decode batch or a prefill chunk), I_r = this rank's slice of an
intermediate width.

* ``GatedMLP``: SiLU(x W_gate^T) * (x W_up^T) W_down^T with W_gate/W_up column-sliced [I_r, D] and W_down
  row-sliced [D, I_r] (dense layers, shared experts, and routed experts in TP mode).
* ``MoE``: routing computed identically on every rank in float32 from the replicated gate (kernels/router.py);
  routed experts expert-parallel (rank r holds experts [r E/N, (r+1) E/N), whole) or tensor-parallel (all
  experts, I_r slice); shared experts tensor-parallel. A decode batch runs router + shared + routed experts in
  four launches (two router, two kernels.moe_decode, which reads the shared slice beside the chosen experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helix.checkpoint import Checkpoint
from helix.config import ModelConfig
from helix.mapping import HelixMapping
from helix.spec import Execution
from kernels import moe_decode
from kernels._triton import use_triton
from kernels.router import RouterSpec, route, route_torch

# up to this many tokens (decode batches) the routed experts run the kernels.moe_decode kernel, which reads each
# chosen expert once per choice (repeats from L2); larger batches (prefill) group the tokens by expert
DECODE_TOKENS = 64
# prefill runs the routed experts on slices of at most this many tokens
PREFILL_CHUNK = 4096


class GatedMLP:
    def __init__(self, ckpt: Checkpoint, prefix: str, width: int, mapping: HelixMapping | None,
                 dtype: torch.dtype, device):
        """``mapping`` None loads the whole expert (EP); otherwise this rank's TP slice of ``width``."""
        lo, hi = (0, width) if mapping is None else mapping.tp_range(width)
        self.gate = ckpt.get(prefix + "gate_proj.weight", 0, lo, hi, dtype, device)  # [I_r, D]
        self.up = ckpt.get(prefix + "up_proj.weight", 0, lo, hi, dtype, device)  # [I_r, D]
        self.down = ckpt.get(prefix + "down_proj.weight", 1, lo, hi, dtype, device).contiguous()  # [D, I_r]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


class MoE:
    """Routed experts are stacked per rank: gate/up [E_r, I_r, D], down [E_r, D, I_r] (E_r local experts)."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, prefix: str, mapping: HelixMapping, moe_parallel: str,
                 dtype: torch.dtype, device, execution: Execution = Execution()):
        self.cfg, self.kernels = cfg, execution.kernels  # kernels: the path rule of kernels/_triton.py
        self.router = router_spec(cfg)
        self.gate = ckpt.get(prefix + "gate.weight", dtype=torch.float32, device=device)  # [E, D], replicated
        self.bias = (ckpt.get(prefix + "gate.e_score_correction_bias", dtype=torch.float32, device=device)
                     if cfg.scoring_func == "sigmoid" else None)
        width = cfg.moe_intermediate_size
        if moe_parallel == "ep":
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
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or (use_triton(x, self.kernels) and x.shape[0] <= DECODE_TOKENS):
            # decode (on CUDA, or kernels 'triton'): no host sync, so CUDA graphs can capture it, and
            # only the chosen local experts are read; eager and captured decode steps run the same kernels.
            # ids come shifted to this rank's numbering: in [0, E_r) for its experts, out of range for others.
            local, weights = route(x, self.gate, self.bias, self.router, self.first, path=self.kernels)
            shared = (self.shared.gate, self.shared.up, self.shared.down) if self.shared is not None else None
            return moe_decode(x, self.w_gate, self.w_up, self.w_down, local, weights, shared, path=self.kernels)
        local, weights = route_torch(x, self.gate, self.bias, self.router, self.first)
        out = self.shared(x) if self.shared is not None else torch.zeros_like(x)
        return out + grouped_experts(x, self.w_gate, self.w_up, self.w_down, local, weights)


def router_spec(cfg: ModelConfig) -> RouterSpec:
    """The config's routing rule. V3: sigmoid scores, groups ranked by their two best biased scores, weights
    normalised if ``norm_topk_prob`` and scaled. V2: softmax, ``greedy`` or ``group_limited_greedy`` (groups
    ranked by their best score), weights normalised if ``norm_topk_prob`` (and k > 1), otherwise scaled
    (DeepSeek-V2's code: it normalises *or* scales, V3 does both)."""
    sigmoid = cfg.scoring_func == "sigmoid"
    normalise = cfg.norm_topk_prob and (sigmoid or cfg.num_experts_per_tok > 1)
    limit = sigmoid or cfg.topk_method == "group_limited_greedy"
    groups, keep = (cfg.n_group, cfg.topk_group) if limit else (1, 1)
    return RouterSpec(cfg.n_routed_experts, cfg.num_experts_per_tok, groups, keep, sigmoid, limit, normalise,
                      cfg.routed_scaling_factor if sigmoid or not normalise else 1.0)


def grouped_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                    expert_ids: torch.Tensor, weights: torch.Tensor, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """``kernels.moe_decode``'s contract for many tokens (prefill): x [T, D], stacked local experts w_gate /
    w_up [E_r, I, D] and w_down [E_r, D, I], expert_ids [T, k] (out of range for other ranks' experts, whose
    weights are ignored) and weights [T, k] -> this rank's routed output [T, D].

    The (token, choice) pairs of local experts are grouped by expert and padded to the busiest expert's count
    C, then run as three batched matmuls over [E_r, C, D]: a fixed number of launches and one host sync (C),
    however many experts are busy. Each token sums its k results in choice order (no atomics: the same bits
    on every run). Tokens go ``chunk`` at a time to bound the [E_r, C, .] buffers of long prompts. It reads
    every local expert, which a prefill chunk chooses anyway; ``kernels.moe_decode_torch`` (same contract)
    reads only the chosen ones, one expert at a time, which is what small decode batches want."""
    if x.shape[0] > chunk:
        parts = zip(x.split(chunk), expert_ids.split(chunk), weights.split(chunk))
        return torch.cat([grouped_experts(xc, w_gate, w_up, w_down, ic, wc, chunk) for xc, ic, wc in parts])
    experts, (t, k), d = w_gate.shape[0], expert_ids.shape, x.shape[1]
    expert = expert_ids.reshape(-1).long()  # [T k], pair p = (token p // k, choice p % k)
    expert = torch.where((expert >= 0) & (expert < experts), expert, experts)  # other ranks' sort last
    count = torch.bincount(expert, minlength=experts + 1)[:experts]  # [E_r]
    cap = int(count.max()) if experts else 0  # host sync
    if cap == 0:
        return torch.zeros_like(x)
    pair = expert.argsort(stable=True)  # [T k] pairs grouped by expert
    row = expert[pair]
    col = torch.arange(t * k, device=x.device) - (count.cumsum(0) - count)[row.clamp(max=experts - 1)]
    slot = torch.where(row < experts, row * cap + col, experts * cap)  # flat [E_r, C] slot; E_r C: a zero row
    token = torch.full((experts * cap + 1,), t, dtype=torch.long, device=x.device)  # t: an all-zero pad token
    token[slot] = pair // k
    weight = torch.zeros(experts * cap + 1, dtype=weights.dtype, device=x.device)
    weight[slot] = weights.reshape(-1)[pair]
    xs = F.pad(x, (0, 0, 0, 1))[token[:-1]].view(experts, cap, d)  # [E_r, C, D]
    h = F.silu(xs @ w_gate.transpose(1, 2)) * (xs @ w_up.transpose(1, 2))  # [E_r, C, I]
    y = (h @ w_down.transpose(1, 2)).view(-1, d) * weight[:-1, None].to(x.dtype)  # [E_r C, D]
    where = torch.empty_like(slot)
    where[pair] = slot  # pair p's slot, in pair order
    return F.pad(y, (0, 0, 0, 1))[where].view(t, k, d).sum(1)
