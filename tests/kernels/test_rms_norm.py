"""kernels.rms_norm: residual add + RMSNorm, the torch reference and the Triton kernel (under the interpreter on
CPU, compiled on CUDA) against a float64 oracle; bf16 against the unfused bf16 baseline (the add rounded to
bf16 before the norm, as the layer did it). Awkward widths (not powers of two), sliced rows, no delta, T = 0."""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import add_rms_norm, add_rms_norm_torch, add_rms_norm_triton
from tests.kernels.cases import assert_path_selection
from tests.tolerance import assert_bf16_policy, assert_exact, assert_f32_parity

pytest.importorskip("triton", reason="triton not installed: the interpreted kernel tests need it")

PATHS = [pytest.param(add_rms_norm_torch, id="torch"), pytest.param(add_rms_norm_triton, id="triton")]


def make_case(tokens, hidden, dtype, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g, device=device) * 3).to(dtype)
    delta = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    weight = (torch.rand(hidden, generator=g, device=device) + 0.5).to(dtype)
    return x, delta, weight


def oracle64(x, delta, weight, eps):
    h = x.double() + (0 if delta is None else delta.double())
    return weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps), h


def bf16_baseline(x, delta, weight, eps):
    h = x if delta is None else x + delta
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h


@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,hidden", [(1, 96), (5, 2560 // 8 + 3), (3, 40)])
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "norm-only"])
def test_matches_oracle(fn, dtype, tokens, hidden, with_delta):
    x, delta, weight = make_case(tokens, hidden, dtype, seed=tokens * hidden)
    delta = delta if with_delta else None
    y, h = fn(x, delta, weight, 1e-6)
    what = f"{fn.__name__} T={tokens} D={hidden} {dtype} delta={with_delta}"
    assert y.dtype == h.dtype == dtype and y.shape == h.shape == x.shape, what
    y_ref, h_ref = oracle64(x, delta, weight, 1e-6)
    if dtype == torch.float32:
        assert_f32_parity(y, y_ref, what + " y")
        assert_f32_parity(h, h_ref, what + " h")
    else:
        y_base, h_base = bf16_baseline(x, delta, weight, 1e-6)
        if fn is add_rms_norm_torch:  # the interpreter truncates float32 -> bf16 (CUDA rounds: the GPU test is exact)
            assert_exact(h, h_base, what + " h (the residual stream rounds as the unfused add)")
        assert_bf16_policy(h, h_ref, h_base, what + " h")
        assert_bf16_policy(y, y_ref, y_base, what + " y")
    if not with_delta:
        assert h is x, f"{what}: without delta h is x itself"


@pytest.mark.parametrize("fn", PATHS)
def test_sliced_rows_and_empty(fn):
    x, delta, weight = make_case(4, 40, torch.float32, seed=3)
    wide = torch.randn(4, 64)
    wide[:, 9:49] = x
    y, h = fn(wide[:, 9:49], delta, weight, 1e-5)
    assert_f32_parity(y, oracle64(x, delta, weight, 1e-5)[0], f"{fn.__name__} sliced x")
    y, h = fn(x[:0], delta[:0], weight, 1e-5)
    assert y.shape == h.shape == (0, 40)


def test_validation_and_path(monkeypatch):
    x, delta, weight = make_case(2, 24, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, delta, weight[:5], 1e-6)
    with pytest.raises(TypeError, match="one dtype"):
        add_rms_norm(x, delta.bfloat16(), weight, 1e-6)
    assert_path_selection(monkeypatch, "rms_norm", lambda **kw: add_rms_norm(x, delta, weight, 1e-6, **kw),
                          name="add_rms_norm")


@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("fn", [pytest.param(add_rms_norm, marks=pytest.mark.gpu)])
def test_gpu_hidden_sizes(fn, tokens):
    """DeepSeek-V3-Lite (2560), V3 (7168) and the latent norm (512) on CUDA, bf16."""
    for hidden in (2560, 7168, 512):
        x, delta, weight = make_case(tokens, hidden, torch.bfloat16, seed=hidden, device="cuda")
        y, h = fn(x, delta, weight, 1e-6)
        y_base, h_base = bf16_baseline(x, delta, weight, 1e-6)
        assert_exact(h, h_base, f"CUDA D={hidden} h")
        assert_bf16_policy(y, oracle64(x, delta, weight, 1e-6)[0], y_base, f"CUDA D={hidden} y")
