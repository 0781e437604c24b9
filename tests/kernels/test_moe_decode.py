"""moe_decode: the torch reference and the Triton kernel (under the interpreter on CPU, compiled on CUDA)
against a float64 slot-by-slot oracle. Hostile inputs: choices of other ranks' experts (-1, E_r, far out
of range) whose routing weights are NaN, a NaN-poisoned expert nobody chose, awkward I and D, a shared expert
of another width than the routed ones."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels import MoEConfig, moe_decode, moe_decode_torch, moe_decode_triton
from tests.kernels.cases import assert_path_selection
from tests.tolerance import assert_bf16_policy, assert_exact, assert_f32_parity

pytest.importorskip("triton", reason="triton not installed: the interpreted kernel tests need it")

PATHS = [pytest.param(moe_decode_torch, id="torch"), pytest.param(moe_decode_triton, id="triton")]
FOREIGN = (-1, 0, 1 << 20)  # offsets past E_r of ids that are not this rank's: -1, E_r, E_r + 2^20


def make_case(tokens, k, experts, inter, hidden, dtype=torch.float32, local=1.0, seed=0, device="cpu",
              id_dtype=torch.int64):
    """Random decode-batch MoE inputs. Each choice is local with probability ``local``; a foreign choice
    holds an out-of-range id and a NaN routing weight. The last expert is never chosen and is NaN."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = rand(tokens, hidden)
    w_gate = rand(experts, inter, hidden, scale=hidden ** -0.5)
    w_up = rand(experts, inter, hidden, scale=hidden ** -0.5)
    w_down = rand(experts, hidden, inter, scale=inter ** -0.5)
    for w in (w_gate, w_up, w_down):
        w[experts - 1] = float("nan")
    ids = torch.randint(0, experts - 1, (tokens, k), generator=g, device=device)
    foreign = torch.rand(tokens, k, generator=g, device=device) >= local
    junk = torch.tensor([experts + o if o >= 0 else o for o in FOREIGN], device=device)
    ids = torch.where(foreign, junk[torch.arange(tokens * k, device=device).view(tokens, k) % len(FOREIGN)], ids)
    weights = torch.rand(tokens, k, generator=g, device=device) + 0.5
    weights = torch.where(foreign, torch.full_like(weights, float("nan")), weights)
    return x, w_gate, w_up, w_down, ids.to(id_dtype), weights


def make_shared(inter_s, hidden, dtype=torch.float32, seed=0, device="cpu"):
    """A shared expert (or its TP slice): gate / up [I_s, D], down [D, I_s]."""
    g = torch.Generator(device=device).manual_seed(seed + 100)
    return tuple((torch.randn(*shape, generator=g, device=device) * shape[1] ** -0.5).to(dtype)
                 for shape in ((inter_s, hidden), (inter_s, hidden), (hidden, inter_s)))


def _local_slots(ids, experts):
    return [(t, s, int(ids[t, s])) for t in range(ids.shape[0]) for s in range(ids.shape[1])
            if 0 <= int(ids[t, s]) < experts]


def oracle64(x, w_gate, w_up, w_down, ids, weights, shared=None):
    """Slot by slot in float64 (independent of the grouped torch reference)."""
    y = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    if shared is not None:
        sg, su, sd = (w.double() for w in shared)
        y += (F.silu(x.double() @ sg.T) * (x.double() @ su.T)) @ sd.T
    for t, s, e in _local_slots(ids, w_gate.shape[0]):
        xt = x[t].double()
        h = F.silu(w_gate[e].double() @ xt) * (w_up[e].double() @ xt)
        y[t] += weights[t, s].double() * (w_down[e].double() @ h)
    return y


def bf16_baseline(x, w_gate, w_up, w_down, ids, weights, shared=None):
    """The same sum in plain low-precision torch (every matmul and the sum over choices in x's dtype)."""
    y = torch.zeros_like(x)
    if shared is not None:
        sg, su, sd = shared
        y += (F.silu(x @ sg.T) * (x @ su.T)) @ sd.T
    for t, s, e in _local_slots(ids, w_gate.shape[0]):
        h = F.silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])
        y[t] += (w_down[e] @ h) * weights[t, s].to(x.dtype)
    return y


def check(y, case, what):
    """``case``: moe_decode's arguments (the shared expert optional, last)."""
    x = case[0]
    assert y.shape == x.shape and y.dtype == x.dtype, f"{what}: {tuple(y.shape)} {y.dtype}"
    assert not torch.isnan(y).any(), f"{what}: NaN leaked from a foreign choice or an unchosen expert"
    ref = oracle64(*case)
    if x.dtype == torch.float32:
        return assert_f32_parity(y, ref, what)
    return assert_bf16_policy(y, ref, bf16_baseline(*case), what)[0]


# ------------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,k,experts,inter,hidden,local", [
    (1, 1, 3, 48, 96, 1.0),
    (1, 6, 9, 48, 96, 0.5),
    (5, 6, 7, 40, 72, 0.6),
    (5, 1, 4, 40, 72, 0.7),
])
def test_matches_oracle(fn, dtype, tokens, k, experts, inter, hidden, local):
    case = make_case(tokens, k, experts, inter, hidden, dtype, local, seed=tokens * 10 + k)
    check(fn(*case), case, f"{fn.__name__} T={tokens} k={k} I={inter} D={hidden} {dtype}")


@pytest.mark.parametrize("fn", PATHS)
def test_all_foreign_gives_zeros(fn):
    case = make_case(3, 6, 4, 40, 72, torch.bfloat16, local=0.0, seed=1, id_dtype=torch.int32)
    y = fn(*case)
    assert y.dtype == torch.bfloat16 and torch.all(y == 0), "all-foreign batch must give exact zeros"


@pytest.mark.parametrize("fn", PATHS)
def test_noncontiguous_x_int32_ids_and_empty(fn):
    x, wg, wu, wd, ids, w = make_case(4, 2, 5, 40, 72, seed=2, id_dtype=torch.int32)
    wide = torch.randn(4, 80)
    wide[:, 8:] = x
    check(fn(wide[:, 8:], wg, wu, wd, ids, w), (x, wg, wu, wd, ids, w), f"{fn.__name__} sliced x")
    # T = 0, and an expert-parallel rank that owns no experts
    assert fn(x[:0], wg, wu, wd, ids[:0], w[:0]).shape == (0, 72)
    empty = fn(x, wg[:0], wu[:0], wd[:0], ids, w)
    assert empty.shape == x.shape and torch.all(empty == 0)


@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,inter_s,local", [(1, 40, 0.5), (3, 56, 0.6), (2, 24, 0.0), (4, 96, 1.0)])
def test_shared_expert_matches_oracle(fn, dtype, tokens, inter_s, local):
    """The shared expert (I_s narrower, equal or wider than I = 40) adds to every token, also one whose
    choices are all another rank's, and the NaN expert nobody chose stays unread."""
    case = (*make_case(tokens, 6, 5, 40, 72, dtype, local, seed=inter_s), make_shared(inter_s, 72, dtype, inter_s))
    check(fn(*case), case, f"{fn.__name__} shared I_s={inter_s} T={tokens} local={local} {dtype}")


def test_shared_expert_with_no_routed_experts():
    """An expert-parallel rank with no local experts still runs its shared slice."""
    x, wg, wu, wd, ids, w = make_case(3, 4, 3, 40, 72, seed=4)
    shared = make_shared(32, 72)
    for fn in (moe_decode_torch, moe_decode_triton):
        check(fn(x, wg[:0], wu[:0], wd[:0], ids, w, shared), (x, wg[:0], wu[:0], wd[:0], ids, w, shared),
              f"{fn.__name__} E_r = 0 with a shared expert")


def test_triton_matches_reference_order_free():
    """float32, all choices local: kernel and reference agree to float32 rounding of the sums."""
    case = make_case(2, 6, 5, 40, 72, seed=3)
    assert_f32_parity(moe_decode_triton(*case), moe_decode_torch(*case), "triton vs torch reference")


def test_validation_and_path(monkeypatch):
    x, wg, wu, wd, ids, w = make_case(2, 2, 3, 40, 72)
    with pytest.raises(ValueError):
        moe_decode(x, wg, wu, wd.transpose(1, 2), ids, w)  # w_down must be [E, D, I]
    with pytest.raises(ValueError):
        moe_decode(x, wg, wu, wd, ids[:1], w[:1])
    with pytest.raises(TypeError):
        moe_decode(x, wg, wu, wd, ids.float(), w)
    with pytest.raises(TypeError):
        moe_decode(x, wg, wu, wd, ids, w.double())
    with pytest.raises(TypeError):
        moe_decode(x.bfloat16(), wg, wu, wd, ids, w)
    with pytest.raises(ValueError):
        moe_decode(x, wg.transpose(1, 2).contiguous().transpose(1, 2), wu, wd, ids, w)
    sg, su, sd = make_shared(24, 72)
    with pytest.raises(ValueError, match="shared expert"):
        moe_decode(x, wg, wu, wd, ids, w, (sg, su, sd.T.contiguous()))  # down must be [D, I_s]
    with pytest.raises(TypeError, match="shared expert"):
        moe_decode(x, wg, wu, wd, ids, w, (sg, su, sd.bfloat16()))

    assert_path_selection(monkeypatch, "moe_decode", lambda **kw: moe_decode(x, wg, wu, wd, ids, w, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,k,experts,local,chunk", [
    (1, 6, 9, 0.5, 4096),
    (13, 6, 7, 0.6, 4096),
    (13, 6, 7, 0.6, 4),  # chunked: 4 + 4 + 4 + 1 tokens
    (9, 2, 5, 1.0, 4096),
    (6, 3, 4, 0.0, 4096),  # no local choice at all
])
def test_helix_moe_prefill_grouping_matches_oracle(dtype, tokens, k, experts, local, chunk):
    """helix.moe.grouped_experts (the prefill path: pairs grouped by expert, padded batched matmuls) keeps
    moe_decode's contract on the same hostile inputs: foreign ids with NaN weights, a NaN expert nobody chose."""
    from helix.moe import grouped_experts

    case = make_case(tokens, k, experts, 40, 72, dtype, local, seed=tokens + k)
    y = grouped_experts(*case, chunk=chunk)
    if local == 0.0:
        return assert_exact(y, torch.zeros_like(case[0]), "grouped_experts with no local choice")
    check(y, case, f"grouped_experts T={tokens} k={k} E_r={experts} chunk={chunk} {dtype}")


@pytest.mark.parametrize("mode,rank", [("ep", 1), ("tp", 2)])
def test_helix_moe_decode_path_matches_grouped_path(checkpoint_factory, monkeypatch, mode, rank):
    """helix.moe.MoE on 3 ranks of the tiny preset: the decode path (kernel under the interpreter, which is
    what CUDA runs) equals the grouped path that larger batches (and kernels 'torch') take."""
    from helix.checkpoint import Checkpoint
    from helix.mapping import HelixMapping
    from helix.moe import MoE
    from helix.presets import get_preset
    from helix.spec import Execution

    cfg = get_preset("deepseek-v3-lite-tiny")
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    ckpt = Checkpoint(checkpoint_factory("deepseek-v3-lite-tiny"))

    def moe(kernels: str) -> MoE:
        return MoE(cfg, ckpt, f"model.layers.{layer}.mlp.", HelixMapping(rank, 3, 8), mode, torch.float32, "cpu",
                   Execution(kernels=kernels))

    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    grouped = moe("torch")(x)  # the grouped path
    mod = importlib.import_module("kernels.moe_decode")
    launched = []
    monkeypatch.setattr(mod, "moe_decode_triton", lambda *a: launched.append(1) or moe_decode_triton(*a))
    assert_f32_parity(moe("triton")(x), grouped, f"MoE {mode} rank {rank}/3: moe_decode vs grouped path")
    assert launched, "MoE did not take the moe_decode path"


# ------------------------------------------------------------------------------------------------ GPU
# deepseek-v3-lite: I 1536, D 2560, k 6, 72 experts; on 4 expert-parallel ranks E_r = 18 and ~1/4 of the
# choices are local
REAL = dict(k=6, experts=18 + 1, inter=1536, hidden=2560)  # + the NaN expert nobody chooses


@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("local", [1.0, 0.25], ids=["all-local", "ep4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("inter_s", [0, 1536, 3072], ids=["no-shared", "shared-tp2", "shared-whole"])
@pytest.mark.parametrize("fn", [pytest.param(moe_decode, marks=pytest.mark.gpu)])
def test_gpu_real_shape(fn, inter_s, dtype, local, tokens):
    case = make_case(tokens, dtype=dtype, local=local, seed=tokens, device="cuda", **REAL)
    if inter_s:
        case = (*case, make_shared(inter_s, REAL["hidden"], dtype, tokens, "cuda"))
    y = fn(*case)
    err = check(y, case, f"GPU T={tokens} local={local} {dtype}")
    assert_exact(fn(*case), y, "second call (deterministic)")
    print(f"T={tokens} local={local} {dtype}: max err {err:.3e}")


@pytest.mark.parametrize("fn", [pytest.param(moe_decode, marks=pytest.mark.gpu)])
def test_gpu_cuda_graph_replay(fn):
    """Captured once; replays follow new tokens, routings and weights without host syncs."""
    x, wg, wu, wd, ids, w = make_case(8, device="cuda", dtype=torch.bfloat16, local=0.5, seed=5, **REAL)
    fn(x, wg, wu, wd, ids, w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x, wg, wu, wd, ids, w)
    for seed in (6, 7):
        nx, _, _, _, nids, nw = make_case(8, device="cuda", dtype=torch.bfloat16, local=0.5, seed=seed, **REAL)
        x.copy_(nx), ids.copy_(nids), w.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        check(y, (x, wg, wu, wd, ids, w), f"graph replay seed {seed}")


@pytest.mark.parametrize("inter_s", [0, 56])
def test_small_tiles_match_oracle(inter_s):
    """Tiles smaller than I and D (several chunks per row), NaN weights of foreign choices, with or without a
    shared expert."""
    case = make_case(3, 6, 5, 40, 72, torch.float32, 0.5, seed=11)
    shared = make_shared(inter_s, 72) if inter_s else None
    config = MoEConfig(block_i=16, block_d=32, block_n=16, block_k=16)
    check(moe_decode_triton(*case, shared, config=config), (*case, shared) if shared else case, f"I_s={inter_s}")
