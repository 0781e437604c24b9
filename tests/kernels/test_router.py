"""kernels.router: the torch reference and the Triton pair (under the interpreter on CPU, compiled on CUDA)
against a float64 oracle that sorts (the kernels do not). Awkward sizes: expert counts that are not powers of
two, groups of two, one group, k = 1 and k = E; V3 (sigmoid + bias) and V2 (softmax, greedy and group-limited)
rules; an offset that moves ids out of range."""

from __future__ import annotations

import pytest
import torch

from kernels.router import RouterSpec, route, route_torch, route_triton
from tests.kernels.cases import assert_path_selection
from tests.tolerance import assert_f32_parity

pytest.importorskip("triton", reason="triton not installed: the interpreted kernel tests need it")

PATHS = [pytest.param(route_torch, id="torch"), pytest.param(route_triton, id="triton")]
SPECS = [
    pytest.param(RouterSpec(72, 6, 1, 1, True, True, True, 2.0), id="v3-lite-72e"),
    pytest.param(RouterSpec(12, 4, 4, 2, True, True, True, 2.5), id="v3-tiny-groups"),
    pytest.param(RouterSpec(40, 8, 8, 3, True, True, True, 2.5), id="v3-8groups-of-5"),
    pytest.param(RouterSpec(6, 6, 3, 3, True, True, True, 1.0), id="v3-k-equals-E"),
    pytest.param(RouterSpec(20, 1, 1, 1, False, False, False, 1.5), id="v2-greedy-k1-scaled"),
    pytest.param(RouterSpec(24, 6, 4, 2, False, True, True, 1.0), id="v2-group-limited"),
]


def make_case(tokens, spec, hidden, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    gate = torch.randn(spec.experts, hidden, generator=g, device=device) * hidden ** -0.5
    bias = torch.randn(spec.experts, generator=g, device=device) * 0.1 if spec.sigmoid else None
    return x, gate, bias


def oracle64(x, gate, bias, spec, offset=0):
    """Token by token in float64, with full sorts: the best groups, then the best experts among them."""
    ids, wts = [], []
    size = spec.experts // spec.groups
    for row in x.double() @ gate.double().T:
        scores = row.sigmoid() if spec.sigmoid else row.softmax(-1)
        choice = scores + bias.double() if spec.sigmoid else scores
        allowed = list(range(spec.experts))
        if spec.limit_groups:
            groups = [sorted(choice[j * size:(j + 1) * size].tolist(), reverse=True) for j in range(spec.groups)]
            rank = [sum(v[:2]) if spec.sigmoid else v[0] for v in groups]
            kept = sorted(range(spec.groups), key=lambda j: -rank[j])[:spec.keep_groups]
            allowed = [e for e in allowed if e // size in kept]
        best = sorted(allowed, key=lambda e: -float(choice[e]))[:spec.k]
        w = scores[best]
        if spec.normalise:
            w = w / w.sum()
        ids.append([e - offset for e in best])
        wts.append((w * spec.scale).tolist())
    return torch.tensor(ids), torch.tensor(wts, dtype=torch.float64)


def check(got, x, gate, bias, spec, offset, what):
    ids, wts = got
    ref_ids, ref_wts = oracle64(x.cpu(), gate.cpu(), None if bias is None else bias.cpu(), spec, offset)
    assert ids.shape == ref_ids.shape and wts.dtype == torch.float32, f"{what}: {tuple(ids.shape)} {wts.dtype}"
    assert torch.equal(ids.cpu().long(), ref_ids), f"{what}: ids {ids.tolist()} != {ref_ids.tolist()}"
    assert_f32_parity(wts.cpu(), ref_wts, f"{what} weights")


@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("tokens,hidden", [(1, 96), (5, 72)])
def test_matches_oracle(fn, spec, tokens, hidden):
    x, gate, bias = make_case(tokens, spec, hidden, seed=tokens + spec.experts)
    check(fn(x, gate, bias, spec, 3), x, gate, bias, spec, 3, f"{fn.__name__} {spec} T={tokens} D={hidden}")


@pytest.mark.parametrize("fn", PATHS)
def test_float32_input_strided_and_empty(fn):
    spec = RouterSpec(12, 4, 4, 2, True, True, True, 2.5)
    x, gate, bias = make_case(3, spec, 50, dtype=torch.float32, seed=5)
    wide = torch.randn(3, 64)
    wide[:, 7:57] = x
    check(fn(wide[:, 7:57], gate, bias, spec), x, gate, bias, spec, 0, f"{fn.__name__} sliced float32 x")
    ids, wts = fn(x[:0], gate, bias, spec)
    assert ids.shape == (0, 4) and wts.shape == (0, 4)


def test_validation_and_path(monkeypatch):
    spec = RouterSpec(12, 4, 4, 2, True, True, True, 2.5)
    x, gate, bias = make_case(2, spec, 40)
    with pytest.raises(ValueError, match="groups"):
        RouterSpec(12, 4, 5, 2)
    with pytest.raises(ValueError, match="correction bias"):
        route(x, gate, None, spec)
    with pytest.raises(TypeError, match="float32"):
        route(x, gate.bfloat16(), bias, spec)
    with pytest.raises(ValueError, match=r"\[E=12, D\]"):
        route(x, gate[:, :20].contiguous(), bias, spec)
    assert_path_selection(monkeypatch, "router", lambda **kw: route(x, gate, bias, spec, **kw), name="route")


@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("fn", [pytest.param(route, marks=pytest.mark.gpu)])
def test_gpu_deepseek_shapes(fn, tokens):
    """DeepSeek-V3-Lite (72 experts, one group) and V3 (256 experts, 8 groups keep 4) on CUDA."""
    for spec, hidden in ((RouterSpec(72, 6, 1, 1, True, True, True, 2.0), 2560),
                         (RouterSpec(256, 8, 8, 4, True, True, True, 2.5), 7168)):
        x, gate, bias = make_case(tokens, spec, hidden, seed=tokens, device="cuda")
        check(fn(x, gate, bias, spec, 36), x, gate, bias, spec, 36, f"CUDA {spec.experts}e T={tokens}")
