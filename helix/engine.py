"""Per-rank decode loop: requests in, tokens (or scored continuations) out.

Every rank runs the same engine on the same requests in the same order; host-side bookkeeping (block
tables, lengths, sampling) is therefore identical everywhere, and each step ends with the same logits on
every rank, so every rank picks the same token without a broadcast.

A request's prompt is split as docs/design.md §1.3 describes: all tokens but the last are prefilled (locally
here, or by a context server in disaggregated serving); the last prompt token is the input of the first decode step, so
every generated or scored token comes out of a Helix decode step. Requests join between steps (continuous
batching) and leave when done, freeing their blocks.

There is one continuous-batching loop, ``HelixEngine.serve(admissions)``: before each step ``admissions.join``
starts the requests that join (the same ones, in the same order, on every rank), one decode step runs over every
active request, and ``admissions.report`` hands the step's outputs on. ``run`` serves a fixed list with local
prefill (``Batch``); the disaggregated generation server serves a stream of requests whose KV comes from the
context server (helix/disagg/generation_server.py).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from helix.cuda_graph import GraphedDecodeStep
from helix.kv_cache import CapacityError
from helix.model import HelixModel
from helix.sampling import NonFiniteLogits, SamplingParams, check_finite, score_rows, select_token

log = logging.getLogger(__name__)


@dataclass
class Request:
    req_id: int
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    forced: list[int] | None = None  # a continuation to score (teacher forcing) instead of sampling
    keep_logits: bool = False  # return each step's float32 logits (parity tests)
    top_logprobs: int = 0  # per output token, also return the k most likely (id, log-prob) pairs
    prompt_logprobs: bool = False  # also score the prompt's tokens (disaggregated: the context server's prefill)
    stream: bool = False  # report each step's tokens as they come (disaggregated serving), not only the Result

    @property
    def num_outputs(self) -> int:
        return len(self.forced) if self.forced is not None else self.sampling.max_new_tokens

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV is written: the prompt plus every output but the last."""
        return len(self.prompt) + max(self.num_outputs - 1, 0)


@dataclass
class Result:
    req_id: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the step's distribution
    greedy: list[bool] = field(default_factory=list)  # token == argmax
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when asked
    logits: list[torch.Tensor] | None = None
    finish_reason: str = "length"  # length | stop | error
    error: str | None = None

    @classmethod
    def empty(cls, req: "Request") -> "Result":
        """The Result of ``req`` before its first output (logits kept when the request asks)."""
        return cls(req.req_id, logits=[] if req.keep_logits else None)

    @classmethod
    def failed(cls, req: "Request", error: str) -> "Result":
        return cls(req.req_id, finish_reason="error", error=error)


class RequestError(RuntimeError):
    """Some requests of a batch failed (e.g. longer than the KV capacity, or non-finite logits); the others
    finished. ``results`` holds every request's Result, failed ones with ``finish_reason == "error"``."""

    SHOWN = 3  # failures the message spells out: a NaN weight fails every request the same way

    def __init__(self, results: list[Result]):
        failed = [r.error for r in results if r.error is not None]
        more = f"; and {len(failed) - self.SHOWN} more" if len(failed) > self.SHOWN else ""
        super().__init__(f"{len(failed)} of {len(results)} requests failed: " + "; ".join(failed[:self.SHOWN]) + more)
        self.results = results

    @classmethod
    def raise_if_failed(cls, results: list[Result]) -> None:
        if any(r.error is not None for r in results):
            raise cls(results)


@dataclass
class _Active:
    req: Request
    result: Result
    next_input: int  # its global position is the sequence's cached length


class HelixEngine:
    def __init__(self, model: HelixModel, max_tokens: int, max_batch_size: int,
                 stop_check: Callable[[Request, list[int]], bool] | None = None, cuda_graphs: bool = False,
                 kv_dtype: str = "auto"):
        self.model, self.max_batch_size, self.stop_check = model, max_batch_size, stop_check
        self.cache = model.new_cache(max_tokens, max_batch_size, kv_dtype)
        self.active: dict[int, _Active] = {}
        self.steps = 0
        # CUDA graphs: one captured step per batch size, block tables padded to the cache's table_width.
        self.graphs: dict[int, GraphedDecodeStep] | None = {} if cuda_graphs else None

    # ------------------------------------------------------------------ admission
    def check(self, req: Request) -> None:
        if not req.prompt:
            raise ValueError(f"request {req.req_id}: empty prompt")
        self.cache.check_fits(req.req_id, req.kv_tokens)

    def reserve_prompt(self, req: Request) -> torch.Tensor:
        """Allocate the sequence and room for its prefilled tokens (prompt[:-1]); returns their write slots."""
        self.check(req)
        self.cache.add(req.req_id)
        try:
            return self.cache.append(req.req_id, len(req.prompt) - 1)
        except CapacityError:
            self.cache.release(req.req_id)
            raise

    def admit(self, req: Request) -> None:
        """Local prefill of prompt[:-1] on these ranks (heads split, each block written by its owner)."""
        slots = self.reserve_prompt(req)
        if len(req.prompt) > 1:
            tokens = torch.tensor(req.prompt[:-1], device=self.model.device)
            self.model.prefill(tokens, slots.to(self.model.device), self.cache)
        self.start(req)

    def start(self, req: Request) -> None:
        """Begin decoding a request whose prompt[:-1] KV is in the cache."""
        self.active[req.req_id] = _Active(req, Result.empty(req),
                                          req.prompt[-1])

    # ------------------------------------------------------------------ decode
    def step(self) -> list[Result]:
        """One decode step over every active request; returns the requests that finished."""
        states = list(self.active.values())
        if not states:
            return []
        cache, dev = self.cache, self.model.device
        ids = [s.req.req_id for s in states]
        positions = torch.tensor([cache.seqs[sid].length for sid in ids])
        slots = torch.cat([cache.append(sid, 1) for sid in ids])
        width = cache.table_width if self.graphs is not None else None
        table, local_lens = cache.block_table(ids, [cache.seqs[sid].length for sid in ids], width)
        inputs = (torch.tensor([s.next_input for s in states]), positions, slots, table, local_lens)
        if self.graphs is None:
            logits = self.model.decode_step(*(t.to(dev) for t in inputs), cache)
        else:
            if len(states) not in self.graphs:
                self.graphs[len(states)] = GraphedDecodeStep(self.model, cache, len(states), cache.table_width)
            logits = self.graphs[len(states)](*inputs)
        self.steps += 1
        finished = []
        for i, s in enumerate(states):
            if self._emit(s, logits[i].cpu()):
                cache.release(s.req.req_id)
                del self.active[s.req.req_id]
                finished.append(s.result)
        return finished

    def _emit(self, s: _Active, logits: torch.Tensor) -> bool:
        req, res = s.req, s.result
        k = len(res.token_ids)
        try:  # on the host copy the step reads anyway: no extra device sync
            check_finite(logits, "helix", req.req_id, k + 1)
        except NonFiniteLogits as e:  # the request fails alone, on every rank alike (all hold the same logits)
            res.finish_reason, res.error = "error", str(e)
            return True
        token = req.forced[k] if req.forced is not None else select_token(logits, req.sampling, k)
        logprobs, greedy, top = score_rows(logits[None], [token], req.top_logprobs)
        res.token_ids.append(token)
        res.logprobs += logprobs
        res.greedy += greedy
        res.top_logprobs += top
        if res.logits is not None:
            res.logits.append(logits)
        s.next_input = token
        if req.forced is None and (token in req.sampling.stop_token_ids
                                   or (self.stop_check is not None and self.stop_check(req, res.token_ids))):
            res.finish_reason = "stop"
            return True
        return len(res.token_ids) >= req.num_outputs

    # ------------------------------------------------------------------ the loop
    def serve(self, admissions: "Admissions") -> None:
        """The continuous-batching loop: join, step, report, until ``admissions`` says it is done."""
        while admissions.join(self):
            admissions.report(self, self.step())

    def run(self, requests: list[Request]) -> list[Result]:
        """Serve ``requests`` with continuous batching and local prefill; results in request order. A request that
        cannot fit, or whose logits turn NaN or inf, fails alone (finish_reason "error")."""
        batch = Batch(requests)
        self.serve(batch)
        return [batch.results[r.req_id] for r in requests]


class Admissions(Protocol):
    """Where the loop's requests come from and where its outputs go."""

    def join(self, engine: HelixEngine) -> bool:
        """Start the requests that join before the next step (the same ones, in the same order, on every rank);
        False once none is active and none will come."""

    def report(self, engine: HelixEngine, finished: list[Result]) -> None:
        """After a step: the requests that finished in it (the others' tokens are in ``engine.active``)."""


class Batch:
    """A fixed list of requests, each started with local prefill (``engine.admit``) as soon as a slot is free."""

    def __init__(self, requests: list[Request]):
        self.waiting = deque(requests)
        self.results: dict[int, Result] = {}

    def join(self, engine: HelixEngine) -> bool:
        while self.waiting and len(engine.active) < engine.max_batch_size:
            req = self.waiting.popleft()
            if req.num_outputs == 0:
                self.results[req.req_id] = Result.empty(req)
                continue
            try:
                engine.admit(req)
            except (CapacityError, ValueError) as e:
                self.results[req.req_id] = Result.failed(req, str(e))
        return bool(engine.active)

    def report(self, engine: HelixEngine, finished: list[Result]) -> None:
        for res in finished:
            self.results[res.req_id] = res
