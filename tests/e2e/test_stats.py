"""Accuracy statistics: the paired interval, TensorRT-LLM's threshold test, and the per-task verdict."""

from __future__ import annotations

import math

import pytest

from evals.compare import check_public_reference, compare_task, public_references
from evals.stats import ThresholdTest, paired_difference


def test_paired_interval_by_hand():
    a = [1, 0, 1, 1, 0, 1, 0, 0]
    b = [1, 1, 1, 0, 0, 1, 1, 0]  # d = 0,1,0,-1,0,0,1,0: mean 1/8, sample sd sqrt((3 * 1 - 8/64) / 7)
    r = paired_difference(a, b)
    sd = math.sqrt((3 - 8 * (1 / 8) ** 2) / 7)
    half = 1.959963984540054 * sd / math.sqrt(8)
    assert (r.n, r.diff) == (8, 0.125)
    assert (r.low, r.high) == pytest.approx((0.125 - half, 0.125 + half), abs=1e-12)


def test_identical_runs_have_a_zero_width_interval():
    r = paired_difference([1, 0, 1], [1, 0, 1])
    assert (r.diff, r.low, r.high) == (0, 0, 0)
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


def test_trtllm_threshold_for_the_golden_figures():
    # DeepSeek-V3-Lite MMLU 71.40 on 4096: scale = sqrt(2 * 50^2 / 4096); z(0.05) = -1.6448536, z(0.2) = -0.8416212.
    mmlu = ThresholdTest(reference=71.40, num_samples=4096)
    scale = math.sqrt(5000 / 4096)
    assert mmlu.threshold == pytest.approx(71.40 - 1.6448536 * scale, abs=1e-6)
    assert mmlu.theta == pytest.approx((1.6448536 + 0.8416212) * scale, abs=1e-6)
    assert mmlu.passes(69.6) and not mmlu.passes(69.5)  # threshold 69.5826
    gsm8k = ThresholdTest(reference=64.74, num_samples=1319)
    assert gsm8k.threshold == pytest.approx(61.5374, abs=1e-3)
    lower = ThresholdTest(reference=10.0, num_samples=100, higher_is_better=False)  # e.g. a WER
    assert lower.threshold == pytest.approx(10.0 + 1.6448536 * math.sqrt(50), abs=1e-6)
    assert lower.passes(20.0) and not lower.passes(22.0)


def _mmlu(choices, correct):
    return {f"mmlu_x/{i}": {"choice": c, "logprobs": [0.0] * 4, "scores": {"acc,none": float(ok)}}
            for i, (c, ok) in enumerate(zip(choices, correct))}


def test_task_verdict_needs_agreement_and_the_threshold():
    ref = _mmlu([0, 1, 2, 3] * 25, [1, 0] * 50)
    same = compare_task("mmlu", ref, ref, min_agreement=1.0)
    assert same["passed"] and same["agreement"] == 1.0 and same["metrics"]["acc,none"]["diff"] == 0
    flipped = dict(ref, **{"mmlu_x/1": {"choice": 0, "logprobs": [0.0] * 4, "scores": {"acc,none": 1.0}}})
    one_off = compare_task("mmlu", flipped, ref, min_agreement=1.0)
    assert not one_off["passed"] and one_off["disagreements"] == ["mmlu_x/1"] and one_off["agreement"] == 0.99
    assert compare_task("mmlu", flipped, ref)["passed"]  # +1 point is within the threshold without min_agreement
    worse = _mmlu([0, 1, 2, 3] * 25, [0] * 100)
    assert not compare_task("mmlu", worse, ref)["passed"]  # 0 vs 50: far below the one-sided threshold


def test_public_figures_match_by_checkpoint_name_and_apply_their_test():
    v3 = {e["task"]: e for e in public_references("/models/DeepSeek-V3-Lite")}
    assert set(v3) == {"mmlu", "gsm8k"} and v3["mmlu"]["reference"] == 71.40 and v3["gsm8k"]["num_samples"] == 1319
    # TensorRT-LLM's GSM8K figure is the mean of the two filters: (62 + 61) / 2 = 61.5 < threshold 61.54.
    check = check_public_reference(v3["gsm8k"], {"exact_match,strict-match": 62.0, "exact_match,flexible-extract": 61.0}, 1319)
    assert check["score"] == 61.5 and not check["passed"] and "note" not in check
    floor, = public_references("deepseek-ai/DeepSeek-V2-Lite-Chat")
    check = check_public_reference(floor, {"exact_match,strict-match": 64.0}, 100)
    assert check["passed"] and check["floor"] == 64.0 and "100 samples" in check["note"]
