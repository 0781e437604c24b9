"""Accuracy statistics: the paired difference of two runs on the same samples, and TensorRT-LLM's threshold test.

Scores are percentages (0-100) wherever sigma appears, as in TensorRT-LLM's accuracy suite.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist


@dataclass
class PairedDiff:
    """mean(b - a) over paired per-sample scores, with a normal-approximation confidence interval."""

    n: int
    diff: float
    low: float
    high: float
    confidence: float


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> PairedDiff:
    """CI of the mean per-sample difference ``b - a``: mean ± z * sd(d) / sqrt(n) (sample sd; 0 width for n < 2).

    Pairing matters: two runs of nearly the same model disagree on few samples, so the paired interval is far
    tighter than comparing two independent accuracies."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists (got {len(a)} and {len(b)})")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(n)
    return PairedDiff(n, mean, mean - half, mean + half, confidence)


@dataclass
class ThresholdTest:
    """TensorRT-LLM's one-sided hypothesis test (tests/integration/defs/accuracy/accuracy_core.py,
    ``compute_threshold`` / ``compute_theta``): with scale = sqrt(2 sigma^2 / n) and z(p) the standard normal
    quantile, threshold = ref + z(alpha) * scale for higher-is-better metrics (z(alpha) < 0, so the threshold
    sits below the reference) and ref - z(alpha) * scale otherwise; theta = -(z(alpha) + z(beta)) * scale is
    the smallest regression detected with power 1 - beta. A run passes when its score is >= the threshold
    (<= when lower is better)."""

    reference: float
    num_samples: int
    alpha: float = 0.05
    beta: float = 0.2
    sigma: float = 50.0
    higher_is_better: bool = True

    @property
    def scale(self) -> float:
        return math.sqrt(2 * self.sigma ** 2 / self.num_samples)

    @property
    def threshold(self) -> float:
        z_alpha = NormalDist().inv_cdf(self.alpha)
        return self.reference + (z_alpha if self.higher_is_better else -z_alpha) * self.scale

    @property
    def theta(self) -> float:
        return -(NormalDist().inv_cdf(self.alpha) + NormalDist().inv_cdf(self.beta)) * self.scale

    def passes(self, score: float) -> bool:
        return score >= self.threshold if self.higher_is_better else score <= self.threshold

    def report(self, score: float) -> dict:
        return {**asdict(self), "threshold": self.threshold, "theta": self.theta, "score": score,
                "passed": self.passes(score)}
