"""The OpenAI completions protocol as ``helix serve`` speaks it: the request body, its translation into engine
Requests, and the response's text and ``logprobs`` object.

Supported body keys (any other is refused, as OpenAI does): ``model``, ``prompt`` (text, token ids, or a list
of either), ``max_tokens`` (>= 1, default 16), ``temperature`` (0 = greedy, default 1), ``top_p``, ``seed``
(sampling is random per request without one), ``stop`` (a string or a list), ``echo``, ``logprobs`` (the k
most likely alternatives per token, 0..20), ``stream``, ``n`` (1 only), ``user``.

Text prompts are encoded with the checkpoint's tokenizer, special tokens included (BOS), like an HF
tokenizer's default; token-id prompts go in as they are. Generation stops at the checkpoint's EOS tokens, at
``max_tokens`` or once the text contains a ``stop`` string; the text ends before the stop string.

``logprobs`` follows the legacy completions object: per token its text, its log-prob, a dict of the k most
likely tokens' texts to their log-probs (always with the chosen token, so up to k + 1 entries; tokens with the
same text keep the highest log-prob) and its offset in the returned text. With ``echo`` the prompt's tokens come
first, the first one with ``None`` entries; their log-probs are the context server's prefill (each given the
tokens before it), the generated tokens' come from Helix decode steps.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Union

from pydantic import BaseModel, ConfigDict, Field

from helix.disagg.handoff import PromptScores
from helix.engine import Request, Result
from helix.sampling import SamplingParams, first_stop

MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 500: "server_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES[self.status], "param": self.param,
                          "code": self.code}}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: its text or its token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt: must not be empty", "prompt")
        return list(p)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


@dataclass(frozen=True)
class Model:
    """What the frontend serves: the name, its tokenizer and the facts requests are checked against."""

    name: str
    tokenizer: object
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int  # the smaller KV capacity per sequence of the two servers

    def encode(self, i: int, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            if bad := [t for t in ids if not 0 <= t < self.vocab_size]:
                raise APIError(400, f"prompt {i}: token id {bad[0]} is outside [0, vocab_size={self.vocab_size})",
                               "prompt")
        if not ids:
            raise APIError(400, f"prompt {i}: empty (needs at least one token)", "prompt")
        return ids

    def token_text(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]


def to_requests(body: CompletionRequest, model: Model) -> list[Request]:
    """One engine Request per prompt, ``req_id`` its index in the body."""
    if body.model not in (None, model.name):
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model.name}`", "model",
                       "model_not_found")
    out = []
    for i, prompt in enumerate(body.prompts()):
        seed = body.seed if body.seed is not None else random.getrandbits(31)
        sampling = SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=seed, stop_token_ids=model.eos_token_ids, stop_strings=body.stops())
        out.append(Request(i, model.encode(i, prompt), sampling, top_logprobs=body.logprobs or 0,
                           prompt_logprobs=body.echo and body.logprobs is not None, stream=body.stream))
    return out


# --------------------------------------------------------------------------------------------- responses


def completion_text(model: Model, token_ids: list[int], stops: tuple[str, ...]) -> str:
    """The generated text: special tokens skipped, cut before the first stop string."""
    text = model.tokenizer.decode(token_ids, skip_special_tokens=True)
    cut = first_stop(text, stops)
    return text if cut is None else text[:cut]


def top_dict(model: Model, chosen: int, chosen_logprob: float, top: list[tuple[int, float]]) -> dict[str, float]:
    """Token text -> log-prob of the top alternatives and the chosen token; equal texts keep the highest."""
    out: dict[str, float] = {}
    for text, lp in zip(model.token_text([chosen] + [t for t, _ in top]), [chosen_logprob] + [lp for _, lp in top]):
        out[text] = max(lp, out.get(text, lp))
    return out


@dataclass
class LogprobsBuilder:
    """The ``logprobs`` object of one choice, built token by token (streamed chunks take slices of it)."""

    model: Model
    offset: int = 0  # text offset of the next token
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, ids: list[int], logprobs: list[float | None], tops: list[list[tuple[int, float]] | None]) -> dict:
        """Append tokens; returns the object of just these tokens."""
        start = len(self.tokens)
        for text, t, lp, top in zip(self.model.token_text(ids), ids, logprobs, tops):
            self.tokens.append(text)
            self.token_logprobs.append(lp)
            self.top_logprobs.append(None if top is None else top_dict(self.model, t, lp, top))
            self.text_offset.append(self.offset)
            self.offset += len(text)
        return self.since(start)

    def add_prompt(self, prompt: list[int], scores: PromptScores) -> dict:
        logprobs, tops = scores
        return self.add(prompt, [None] + logprobs, [None] + (tops or [[] for _ in logprobs]))

    def add_result(self, res: Result, start: int = 0) -> dict:
        """The Result's tokens from ``start`` on."""
        tops = res.top_logprobs[start:] or [[] for _ in res.token_ids[start:]]
        return self.add(res.token_ids[start:], res.logprobs[start:], tops)

    def since(self, start: int) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def envelope(cid: str, model: Model, choices: list[dict], usage: dict | None = None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model.name,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body
