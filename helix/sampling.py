"""Token selection shared by every backend: greedy, or seeded temperature / top-p sampling.

Every Helix rank ends a step holding the same full float32 logits, so drawing with a generator seeded
by (request seed, step) gives the same token on every rank without a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request generates. ``temperature == 0`` is greedy; generation stops at ``max_new_tokens``,
    at any of ``stop_token_ids`` (kept in the output), or once the decoded text contains a ``stop_strings``
    entry (the driver cuts the text; token ids are kept up to and including the token that completed it)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


class NonFiniteLogits(RuntimeError):
    """A step's logits hold NaN or inf: any token read from them is meaningless (with a NaN weight, argmax
    returns token 0 at every step), so the request fails instead."""


def check_finite(logits: torch.Tensor, side: str, request: int, first_step: int = 1) -> None:
    """Raises NonFiniteLogits, naming ``side`` (helix or reference), the request and the first bad step,
    unless ``logits`` ([V], or [steps, V] of consecutive steps from ``first_step``) are all finite. Steps count
    a request's outputs from 1."""
    finite = torch.isfinite(logits).reshape(-1, logits.shape[-1]).all(-1)
    if not bool(finite.all()):
        step = first_step + int(torch.nonzero(~finite)[0])
        raise NonFiniteLogits(f"{side} request {request}, step {step}: logits hold NaN or inf (a non-finite weight "
                              "or an overflow of the compute dtype); no token can be read from them")


def select_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """Next token from float32 logits [V] of one sequence. Deterministic given (params.seed, step)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double().cpu() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = torch.Generator().manual_seed(params.seed * 1_000_003 + step)
    return int(torch.multinomial(probs, 1, generator=gen))


def score_rows(rows: torch.Tensor, tokens: list[int], top: int = 0
               ) -> tuple[list[float], list[bool], list[list[tuple[int, float]]]]:
    """rows [T, V] float32 logits, row t the distribution ``tokens[t]`` was read from. Per token: its log-prob
    (float64 log-softmax), whether it is the argmax, and (``top`` > 0) the ``top`` most likely (id, log-prob)
    pairs, most likely first."""
    logp = rows.double().log_softmax(-1)
    target = torch.tensor(tokens, dtype=torch.long, device=rows.device)
    chosen = logp.gather(1, target[:, None])[:, 0]
    greedy = (rows.argmax(-1) == target).tolist()
    alternatives: list[list[tuple[int, float]]] = []
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return chosen.tolist(), greedy, alternatives


def per_prompt(sampling: "SamplingParams | list[SamplingParams]", prompts: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the list as given, or the single one repeated."""
    params = sampling if isinstance(sampling, list) else [sampling] * prompts
    if len(params) != prompts:
        raise ValueError(f"{len(params)} SamplingParams for {prompts} prompts")
    return params


def first_stop(text: str, stop_strings: tuple[str, ...] | list[str]) -> int | None:
    """Index in ``text`` where the earliest stop string starts, or None."""
    hits = [i for s in stop_strings if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None
