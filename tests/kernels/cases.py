"""Hostile inputs and float64 oracles for the kernel tests (shared by the CPU and GPU tests).

The oracles walk each sequence token by token through its block table in float64: written
independently of kernels/*_torch so the torch references are checked too.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import pytest
import torch

GARBAGE_BLOCK_IDS = (-1, 2**30)  # what unused block-table entries hold: never dereferenced


def assert_path_selection(monkeypatch, kernel: str, call, name: str | None = None) -> None:
    """``call(path=...)`` on CPU tensors takes the path kernels/_triton.py's rule names for each value, the default
    is auto, ``cuda`` is refused on CPU tensors, and an unknown value is refused. ``kernel`` names the module,
    ``name`` (default ``kernel``) its ``<name>_torch`` / ``<name>_triton``."""
    mod = importlib.import_module(f"kernels.{kernel}")  # the package attribute of that name is the function
    calls = []
    for path in ("torch", "triton"):
        monkeypatch.setattr(mod, f"{name or kernel}_{path}", lambda *a, path=path, **k: calls.append(path) or (None, None))
    for mode, want in [("auto", "torch"), ("torch", "torch"), ("triton", "triton"), (None, "torch")]:
        call(**({} if mode is None else {"path": mode}))
        assert calls[-1] == want, f"path={mode!r} on CPU picked {calls[-1]}"
    with pytest.raises(ValueError, match="path='cuda' needs CUDA tensors"):
        call(path="cuda")
    with pytest.raises(ValueError, match="path='gpu': expected one of auto, cuda, triton, torch"):
        call(path="gpu")


@dataclass
class MLACase:
    q_nope_abs: torch.Tensor   # [B, H, Lkv]
    q_pe: torch.Tensor         # [B, H, R]
    kv_cache: torch.Tensor     # [num_blocks, T, Lkv + R], NaN in every slot no sequence uses
    block_table: torch.Tensor  # [B, max_blocks] int32, shuffled, garbage past each sequence
    seq_lens: torch.Tensor     # [B] int32
    scale: float

    @property
    def args(self):
        return self.q_nope_abs, self.q_pe, self.kv_cache, self.block_table, self.seq_lens, self.scale


def make_mla_case(lens, heads, lkv=64, rope=16, tpb=8, dtype=torch.float32, seed=0, device="cpu",
                  spare_blocks=3, extra_table_cols=2, poison=True, q_layout="contiguous") -> MLACase:
    """Random MLA decode inputs. Each sequence gets its own blocks, scattered through the cache by a
    random permutation; spare blocks and the tail of each last block are NaN-poisoned; table entries past
    a sequence's last block hold garbage ids. ``q_layout``: "contiguous", "slice" (q_nope_abs and q_pe
    are views into one [B, H, Lkv + R + 8] tensor), or "transposed" (views of [H, B, D] tensors)."""
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in lens]
    bsz = len(lens)
    nblk = [math.ceil(n / tpb) for n in lens]
    total = sum(nblk) + spare_blocks
    max_blocks = max(nblk + [0]) + extra_table_cols
    perm = torch.randperm(total, generator=g)
    table = torch.empty(bsz, max_blocks, dtype=torch.int32)
    used = torch.zeros(total, tpb, dtype=torch.bool)
    k = 0
    for b, n in enumerate(lens):
        ids = perm[k:k + nblk[b]]
        k += nblk[b]
        table[b, :nblk[b]] = ids.to(torch.int32)
        for j in range(nblk[b], max_blocks):
            table[b, j] = GARBAGE_BLOCK_IDS[(b + j) % 2]
        t = torch.arange(n)
        used[ids[t // tpb], t % tpb] = True

    # draw on the target device (GPU cases hold ~1M tokens); scores get a spread of a few units, so
    # the softmax is neither flat nor one-hot
    gd = torch.Generator(device=device).manual_seed(seed + 1)
    rdt = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=gd, dtype=rdt, device=device)

    kv = randn(total, tpb, lkv + rope)
    if poison:
        kv[~used.to(device)] = float("nan")
    scale = 1.0 / math.sqrt(lkv + rope) * 1.5
    qn, qp = randn(bsz, heads, lkv), randn(bsz, heads, rope)
    if q_layout == "slice":
        both = randn(bsz, heads, lkv + rope + 8)
        both[..., :lkv], both[..., lkv + 8:] = qn, qp
        both = both.to(dtype)
        qn, qp = both[..., :lkv], both[..., lkv + 8:]
    elif q_layout == "transposed":
        qn = qn.transpose(0, 1).contiguous().to(dtype).transpose(0, 1)
        qp = qp.transpose(0, 1).contiguous().to(dtype).transpose(0, 1)
    else:
        qn, qp = qn.to(dtype), qp.to(dtype)
    return MLACase(qn, qp, kv.to(dtype), table.to(device),
                   torch.tensor(lens, dtype=torch.int32, device=device), scale)


def fp8_mla_case(case: MLACase) -> tuple[MLACase, torch.Tensor, MLACase]:
    """``case`` with its cache stored as an FP8 cache is: e4m3 rows, each scaled so its largest magnitude is 448,
    and their float32 scales [num_blocks, T]. Returns (the FP8 case, kv_scale, the case whose float64 cache holds
    the dequantized rows: the oracle's inputs). Poisoned slots stay NaN."""
    rows = case.kv_cache.float()
    scale = rows.abs().amax(-1) / 448.0
    fp8 = (rows / scale[..., None]).to(torch.float8_e4m3fn)
    dequantized = fp8.double() * scale.double()[..., None]
    return (MLACase(case.q_nope_abs, case.q_pe, fp8, case.block_table, case.seq_lens, case.scale), scale,
            MLACase(case.q_nope_abs, case.q_pe, dequantized, case.block_table, case.seq_lens, case.scale))


def _rows(case: MLACase, b: int) -> torch.Tensor:
    tpb = case.kv_cache.shape[1]
    n = int(case.seq_lens[b])
    ids = case.block_table[b].long()
    t = torch.arange(n, device=case.kv_cache.device)
    return case.kv_cache[ids[t // tpb], t % tpb] if n else case.kv_cache.new_zeros(0, case.kv_cache.shape[2])


def mla_oracle64(case: MLACase) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 o [B, H, Lkv], lse [B, H], from the (possibly bf16-rounded) inputs upcast to float64."""
    bsz, heads, lkv = case.q_nope_abs.shape
    o = torch.zeros(bsz, heads, lkv, dtype=torch.float64, device=case.kv_cache.device)
    lse = torch.full((bsz, heads), float("-inf"), dtype=torch.float64, device=case.kv_cache.device)
    for b in range(bsz):
        rows = _rows(case, b).double()
        if rows.shape[0] == 0:
            continue
        s = (case.q_nope_abs[b].double() @ rows[:, :lkv].T + case.q_pe[b].double() @ rows[:, lkv:].T) * case.scale
        lse[b] = torch.logsumexp(s, dim=-1)
        o[b] = torch.softmax(s, dim=-1) @ rows[:, :lkv]
    return o, lse


def mla_bf16_baseline(case: MLACase) -> tuple[torch.Tensor, torch.Tensor]:
    """The same computation in plain low-precision torch (matmuls in the input dtype, softmax in float32):
    the yardstick of the bf16 policy."""
    bsz, heads, lkv = case.q_nope_abs.shape
    dt = case.kv_cache.dtype
    o = torch.zeros(bsz, heads, lkv, dtype=dt, device=case.kv_cache.device)
    lse = torch.full((bsz, heads), float("-inf"), dtype=torch.float32, device=case.kv_cache.device)
    for b in range(bsz):
        rows = _rows(case, b)
        if rows.shape[0] == 0:
            continue
        s = (case.q_nope_abs[b] @ rows[:, :lkv].T + case.q_pe[b] @ rows[:, lkv:].T) * case.scale  # dt
        lse[b] = torch.logsumexp(s.float(), dim=-1)
        o[b] = torch.softmax(s.float(), dim=-1).to(dt) @ rows[:, :lkv]
    return o, lse


def make_combine_case(n, bsz, heads, lkv=64, dtype=torch.float32, seed=0, device="cpu", neg_inf="some"):
    """o_parts [N, B, h, Lkv] and lse_parts [N, B, h] float32. ``neg_inf``: "none"; "some" (random parts
    empty, with NaN in their o); "row" as "some" plus row (0, 0) empty on every part."""
    g = torch.Generator().manual_seed(seed)
    o_parts = torch.randn(n, bsz, heads, lkv, generator=g, dtype=torch.float64)
    lse_parts = torch.randn(n, bsz, heads, generator=g, dtype=torch.float64) * 4
    if neg_inf in ("some", "row"):
        empty = torch.rand(n, bsz, heads, generator=g) < 0.3
        if neg_inf == "row":
            empty[:, 0, 0] = True
        lse_parts[empty] = float("-inf")
        o_parts[empty] = float("nan")  # an empty part's o is garbage: it must not leak
    return o_parts.to(dtype).to(device), lse_parts.float().to(device)


def combine_oracle64(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, bsz, heads, lkv = o_parts.shape
    o = torch.zeros(bsz, heads, lkv, dtype=torch.float64)
    lse = torch.full((bsz, heads), float("-inf"), dtype=torch.float64)
    op, lp = o_parts.double().cpu(), lse_parts.double().cpu()
    for b in range(bsz):
        for h in range(heads):
            live = [r for r in range(n) if lp[r, b, h] != float("-inf")]
            if not live:
                continue
            lse[b, h] = torch.logsumexp(lp[live, b, h], dim=0)
            for r in live:
                o[b, h] += torch.exp(lp[r, b, h] - lse[b, h]) * op[r, b, h]
    return o, lse


def make_w_uv(heads: int, v: int, lkv: int, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """W_UV [heads, V, Lkv] with unit-scale products (entries ~ 1 / sqrt(Lkv)), drawn in float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, v, lkv, generator=g, dtype=torch.float64) / lkv ** 0.5).to(dtype).to(device)


def combine_uv_oracle64(o_parts: torch.Tensor, lse_parts: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """helix_combine_uv's contract in float64 on the CPU: the merged o [B, h, Lkv] times W_UV -> [B, h, V]."""
    return torch.einsum("bhl,hvl->bhv", combine_oracle64(o_parts, lse_parts)[0], w_uv.double().cpu())


def combine_lowp_baseline(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in the input dtype (weights rounded to it, sum in it)."""
    dt = o_parts.dtype
    lse = torch.logsumexp(lse_parts, dim=0)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_parts - lse_safe).to(dt)
    o = torch.where(w[..., None] > 0, o_parts, torch.zeros((), dtype=dt, device=o_parts.device))
    return (o * w[..., None]).sum(0), lse
