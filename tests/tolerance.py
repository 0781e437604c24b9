"""The tolerance policy of docs/design.md §6.2, written once.

* exact: token ids, cache writes, block ownership (``assert_exact``);
* float32 parity: max |out - ref| <= 1e-4 * max |ref| (``assert_f32_parity``);
* bf16: error vs a float64 reference <= 2x the error of a plain bf16 torch computation of the same
  thing, plus a small absolute floor (``assert_bf16_policy``); module-level checks also report the
  TensorRT-LLM criterion |out - ref| < 0.1 + 0.05 |ref| for >= 98% of elements (``trtllm_pass_ratio``).

Every failure message carries max and mean error and the index where the max occurred.
"""

from __future__ import annotations

import torch

F32_REL = 1e-4
BF16_FACTOR = 2.0
BF16_ABS_FLOOR = 1e-3


def error_report(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, tuple[int, ...], str]:
    """(max abs err, mean abs err, index of max, one-line text). NaN/inf mismatches count as inf error."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    both_inf = torch.isinf(out64) & torch.isinf(ref64) & (torch.sign(out64) == torch.sign(ref64))
    diff = (out64 - ref64).abs()
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return 0.0, 0.0, (), "empty"
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    mx, mean = float(diff.max()), float(diff.mean())
    text = f"max abs err {mx:.3e} at {idx} (out {out64[idx].item():.6g}, ref {ref64[idx].item():.6g}), mean abs err {mean:.3e}"
    return mx, mean, idx, text


def _finite_max(t: torch.Tensor) -> float:
    t = t.detach().double().abs()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else 0.0


def assert_exact(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if not torch.equal(out.cpu(), ref.cpu()):
        mism = (out.cpu() != ref.cpu()).nonzero()
        first = tuple(mism[0].tolist())
        raise AssertionError(f"{what}: {len(mism)} of {out.numel()} elements differ; first at {first}: "
                             f"{out.cpu()[first].item()} vs {ref.cpu()[first].item()}")


def assert_f32_parity(out: torch.Tensor, ref: torch.Tensor, what: str = "", rel: float = F32_REL) -> float:
    """max |out - ref| <= rel * max |ref|. Returns the max error."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    mx, _, _, text = error_report(out, ref)
    bound = rel * max(_finite_max(ref), 1e-30)
    assert mx <= bound, f"{what}: float32 parity failed: {text}; bound {bound:.3e} = {rel:g} * max|ref|"
    return mx


def assert_bf16_policy(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, what: str = "",
                       factor: float = BF16_FACTOR, abs_floor: float = BF16_ABS_FLOOR) -> tuple[float, float]:
    """err(out) <= factor * err(baseline) + abs_floor * max|ref|, errors measured against ``ref64``.

    ``baseline`` is the same computation done in plain bf16 torch. Returns (err, baseline err).
    """
    assert out.shape == ref64.shape == baseline.shape, f"{what}: shapes differ"
    mx, _, _, text = error_report(out, ref64)
    base_mx, _, _, base_text = error_report(baseline, ref64)
    bound = factor * base_mx + abs_floor * max(_finite_max(ref64), 1e-30)
    assert mx <= bound, (f"{what}: bf16 policy failed: {text}; bound {bound:.3e} = {factor:g} x bf16-torch "
                         f"error ({base_text}) + {abs_floor:g} * max|ref|")
    return mx, base_mx


def trtllm_pass_ratio(out: torch.Tensor, ref: torch.Tensor, atol: float = 0.1, rtol: float = 0.05) -> float:
    """Fraction of elements with |out - ref| < atol + rtol |ref| (TensorRT-LLM's MLA Helix criterion)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    ok = (out64 - ref64).abs() < atol + rtol * ref64.abs()
    return float(ok.double().mean()) if ok.numel() else 1.0


def assert_bf16_model_logits(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, what: str = "",
                             miss_floor: float = 0.005) -> dict:
    """Whole-model bf16 logits. A routed expert that flips on a near-tie score moves a few logits by O(1) for
    the bf16 reference as well, so the policy is applied to aggregates: mean error <= 2x the bf16 baseline's,
    and the fraction of elements missing the TensorRT-LLM criterion <= 2x the baseline's (+ ``miss_floor``).
    Returns the figures for the report."""
    mx, mean, _, text = error_report(out, ref64)
    base_mx, base_mean, _, base_text = error_report(baseline, ref64)
    miss, base_miss = 1 - trtllm_pass_ratio(out, ref64), 1 - trtllm_pass_ratio(baseline, ref64)
    assert mean <= BF16_FACTOR * base_mean, f"{what}: mean error {mean:.3e} > 2 x bf16 baseline's {base_mean:.3e} ({text})"
    assert miss <= BF16_FACTOR * base_miss + miss_floor, (
        f"{what}: {100 * miss:.2f}% of elements miss the TensorRT-LLM criterion, > 2 x the bf16 baseline's "
        f"{100 * base_miss:.2f}% + {100 * miss_floor:.1f}%")
    return {"text": text, "baseline": base_text, "trtllm": 1 - miss, "baseline_trtllm": 1 - base_miss}
