"""The driver API of a disaggregated deployment: ``launch(config) -> Cluster``.

    with helix.disagg.launch("deploy.yaml") as cluster:
        ids = cluster.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16))
        logprobs, greedy = cluster.score([([1, 2, 3], [4, 5])])[0]

``launch`` validates the deployment (before any process starts), spawns one process per rank (the context
server's first, then the N generation ranks; one GPU each on CUDA), builds the servers and checks the KV
path between the context server and every generation rank.

Requests are served by one long-lived serving loop on every rank (started by the first request): ``submit``
appends a request to the loop's log (handoff.py) and returns at once; the context server prefills it while the
generation ranks decode, and it joins the running decode batch as soon as its KV has arrived and a slot is free,
whoever sent it and whatever else is running. What the generation leader reports (prompt scores, streamed
tokens, the Result) reaches the request's ``on_event`` on the cluster's dispatcher thread. The batch calls
(``serve``, ``run``, ``generate``, ``score``) submit every request of a batch and wait for their Results.

A rank that raises or dies fails every waiting request within seconds with ``WorkerError``, naming the server
and rank and carrying the traceback; the cluster is then shut down and ``on_failure`` (if given) is called.
``shutdown()`` (also on leaving the ``with`` block, on Ctrl-C inside it, and at interpreter exit) closes the
log, lets the loop finish what it holds (a few seconds at most) and ends every rank process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from helix.config import ConfigError
from helix.disagg.context_server import ContextServer
from helix.disagg.deploy import load_deployment
from helix.disagg.generation_server import GenerationServer
from helix.disagg.handoff import Handoff, admission_error
from helix.disagg.kv_transfer import connect
from helix.engine import Request, RequestError, Result
from helix.sampling import SamplingParams, per_prompt
from helix.sources import load_source_tokenizer
from helix.spec import RunSpec
from helix.workers import RankContext, RankPool

log = logging.getLogger(__name__)

DRAIN_S = 5.0  # how long shutdown lets the loop finish the requests it holds before the ranks are ended

# on_event(kind, payload) of a submitted request, on the dispatcher thread, in this order:
#   "prompt" (logprobs, top) of prompt[1:], first, when the request asks for prompt_logprobs;
#   "tokens" (ids, logprobs, top) after each step, when it streams;
#   "done"   (Result, joined at engine step, finished at engine step), last;
#   or "failed" (the exception: a WorkerError when a rank failed), last, instead.
OnEvent = Callable[[str, Any], None]


class ClusterDown(RuntimeError):
    """The cluster is shut down (or a rank failed): it takes no more requests."""


@dataclass
class BatchReport:
    results: list[Result]  # in request order
    joined_step: dict[int, int]  # req_id -> decode steps of this batch already run when it joined
    steps: int  # decode steps the batch took


# --------------------------------------------------------------------------------------------- rank side


def _start_rank(ctx: RankContext, dep: RunSpec) -> None:
    if ctx.rank in dep.context_ranks:
        ctx.state["server"] = ContextServer(dep, ctx.comm(ranks=dep.context_ranks), ctx.device)
    else:
        ctx.state["server"] = GenerationServer(dep, ctx.comm(ranks=dep.generation_ranks), ctx.device)
    connect(ctx.rank, dep.context_ranks, dep.generation_ranks, dep.handoff_device)


def _serve_rank(ctx: RankContext, loop: int) -> None:
    """One serving loop, until its log closes and every request in it is done."""
    server = ctx.state["server"]
    handoff = Handoff(ctx.store, loop, len(server.dep.context_ranks))
    if isinstance(server, ContextServer):
        server.serve(handoff)
    else:
        server.serve(handoff, ctx.emit)


# --------------------------------------------------------------------------------------------- driver


def launch(config: "str | os.PathLike | dict | RunSpec",
           on_failure: Callable[[BaseException], None] | None = None) -> "Cluster":
    """Start the deployment described by a file path (YAML or JSON), its parsed dict, or a RunSpec with a
    context server.
    ``on_failure(error)`` is called (on the dispatcher thread) when a rank fails while the loop runs."""
    return Cluster(load_deployment(config), on_failure)


class Cluster:
    def __init__(self, dep: RunSpec, on_failure: Callable[[BaseException], None] | None = None, pool=None):
        """``on_failure``: told of a failed rank while a serving loop runs (helix serve stops its front end).
        ``pool``: the deployment's ranks, already joined, with RankPool's ``run``, ``store`` and ``close`` (world rank
        0's TorchrunPool under torchrun, helix/disagg/torchrun.py); None spawns a local RankPool."""
        self.dep, self.on_failure = dep, on_failure
        self.pool: RankPool | None = None
        gpus = len(set(dep.devices()))
        if pool is None and dep.device == "cuda" and torch.cuda.device_count() < gpus:
            raise ConfigError(f"model.device='cuda': the deployment needs {gpus} GPUs (context server "
                              f"{len(dep.context_ranks)}{' on GPU 0' if dep.context.colocate else ''} + "
                              f"generation_servers.context_parallel_size {len(dep.generation_ranks)}), "
                              f"{torch.cuda.device_count()} visible")
        self.tokenizer = load_source_tokenizer(dep.model)
        self._lock = threading.Lock()  # guards everything below and the store's driver handle
        self._loops = 0
        self._handoff: Handoff | None = None  # the running loop's log
        self._dispatcher: threading.Thread | None = None
        self._next = 0  # log index of the next request
        self._waiting: dict[int, OnEvent] = {}
        self._failure: BaseException | None = None
        self._closing = False
        devices, t = dep.devices(), len(dep.context_ranks)
        log.info("launching %s: context server TP=%d on %s, Helix generation server N=%d on %s",
                 dep.source or "deployment", t, ", ".join(devices[:t]), len(dep.generation_ranks), ", ".join(devices[t:]))
        self.pool = pool or RankPool(dep.world_size, dep.devices(), extra_groups=[dep.generation_ranks],
                                     role_of=dep.role_of, collective_timeout_s=dep.execution.collective_timeout_s)
        try:
            self.pool.run(_start_rank, dep)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ the serving loop
    def check(self, req: Request) -> str | None:
        """Why the deployment cannot serve ``req`` (too long for a KV capacity, empty), or None."""
        return admission_error(req, self.dep)

    def submit(self, req: Request, on_event: OnEvent) -> int:
        """Append ``req`` (which must pass ``check`` and ask for at least one output) to the serving loop; returns
        its index in the loop, which is its ``req_id`` in what ``on_event`` receives. Raises ClusterDown once the
        cluster is shut down or failed."""
        if req.num_outputs == 0 or (error := self.check(req)) is not None:
            raise ValueError(f"submit: {error or f'request {req.req_id}: no output asked'}")
        with self._lock:
            if self.pool is None or self._closing:
                raise ClusterDown("the cluster is shut down" + (f": {failure_headline(self._failure)}" if self._failure else ""))
            if self._handoff is None:
                self._start_loop()
            k, self._next = self._next, self._next + 1
            self._waiting[k] = on_event
            self._handoff.publish(k, dataclasses.replace(req, req_id=k))
        return k

    def _start_loop(self) -> None:
        self._loops += 1
        self._handoff, self._next = Handoff(self.pool.store, self._loops), 0
        self._dispatcher = threading.Thread(target=self._dispatch_loop, args=(self.pool, self._loops),
                                            name=f"helix-cluster-loop{self._loops}", daemon=True)
        self._dispatcher.start()

    def _dispatch_loop(self, pool: RankPool, loop: int) -> None:
        try:
            pool.run(_serve_rank, loop, on_event=self._dispatch)
        except BaseException as e:  # a failed rank (the pool is torn down already), or the pool closed under us
            with self._lock:
                failed = not self._closing
                if failed:
                    self._failure, self.pool = e, None
                waiting, self._waiting = self._waiting, {}
            for on_event in waiting.values():
                on_event("failed", e if failed else ClusterDown("the cluster is shut down"))
            if failed:
                pool.close()
                if self.on_failure is not None:
                    self.on_failure(e)

    def _dispatch(self, rank: int, event: tuple) -> None:
        kind, k, *payload = event
        with self._lock:
            on_event = self._waiting.pop(k) if kind == "done" else self._waiting[k]
            if kind == "done":
                self._handoff.forget(k)
        on_event(kind, payload[0] if len(payload) == 1 else tuple(payload))

    def _stop_loop(self) -> None:
        """Close the running loop's log and wait until the loop has finished every request in it."""
        with self._lock:
            handoff, thread, self._handoff = self._handoff, self._dispatcher, None
            if handoff is not None:
                handoff.publish(self._next, None)
        if thread is not None:
            thread.join()
        if self._failure is not None:
            raise ClusterDown(f"the cluster is shut down: {failure_headline(self._failure)}")

    def on_ranks(self, fn: Callable, *args, ranks: list[int] | None = None) -> list[Any]:
        """``pool.run(fn, *args, ranks=ranks)`` between serving loops (tests plant faults this way): waits for the
        requests in flight, runs the command, and the next request starts a new loop."""
        self._stop_loop()
        return self.pool.run(fn, *args, ranks=ranks)

    # ------------------------------------------------------------------ batches
    def serve(self, requests: list[Request]) -> BatchReport:
        """Serve a batch; every request's Result (failed ones carry ``error``) and when each joined."""
        ids = [r.req_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids must be unique within a batch: {ids}")
        results: dict[int, Result] = {}
        steps: dict[int, tuple[int, int]] = {}
        failures: list[BaseException] = []
        todo = threading.Semaphore(0)

        def on_event(req_id: int, kind: str, payload) -> None:
            if kind == "done":
                res, joined, finished = payload
                results[req_id], steps[req_id] = dataclasses.replace(res, req_id=req_id), (joined, finished)
            elif kind == "failed":
                failures.append(payload)
            if kind in ("done", "failed"):
                todo.release()

        submitted = 0
        try:
            for req in requests:
                if req.num_outputs == 0:
                    results[req.req_id] = Result.empty(req)
                elif (error := self.check(req)) is not None:
                    results[req.req_id] = Result.failed(req, error)
                else:
                    self.submit(req, lambda kind, payload, i=req.req_id: on_event(i, kind, payload))
                    submitted += 1
            for _ in range(submitted):
                todo.acquire()
        except BaseException:  # Ctrl-C: end the ranks (a failed rank has ended them already)
            self.shutdown()
            raise
        if failures:
            raise failures[0]
        start = min((j for j, _ in steps.values()), default=0)
        return BatchReport([results[i] for i in ids], {i: j - start for i, (j, _) in steps.items()},
                           max((f for _, f in steps.values()), default=start) - start)

    def run(self, requests: list[Request]) -> list[Result]:
        """Full Results (token ids, log-probs, greedy flags, logits when ``keep_logits``), in request order."""
        return self.serve(requests).results

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Generated token ids per prompt (stop token kept; a stop string ends generation at the token that
        completed it). Raises RequestError if any request failed."""
        params = per_prompt(sampling, len(prompts))
        results = self.run([Request(i, list(p), s) for i, (p, s) in enumerate(zip(prompts, params))])
        RequestError.raise_if_failed(results)
        return [r.token_ids for r in results]

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[list[float], list[bool]]]:
        """Per continuation token: log p(token | everything before it) and whether it is the argmax, each
        computed by a Helix decode step with the continuation teacher-forced."""
        for i, (context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(f"request {i}: score needs a non-empty context and continuation "
                                 f"(got {len(context)} and {len(continuation)} tokens)")
        results = self.run([Request(i, list(c), forced=list(f)) for i, (c, f) in enumerate(requests)])
        RequestError.raise_if_failed(results)
        return [(r.logprobs, r.greedy) for r in results]

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Close the log, give the loop DRAIN_S to finish what it holds, end every rank; idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pool, handoff, thread = self.pool, self._handoff, self._dispatcher
            if pool is not None and handoff is not None:
                handoff.publish(self._next, None)
        if thread is not None:
            thread.join(DRAIN_S)
        if pool is not None:
            pool.close()  # a loop still running ends with the pool: its requests get "failed"
        if thread is not None:
            thread.join()
        self.pool = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        if getattr(self, "pool", None) is not None:
            self.shutdown()


def failure_headline(error: BaseException) -> str:
    """A rank's failure in one line: who failed and how (its message's first and last unindented lines; the
    traceback between them is dropped)."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(" ")]
    return " ".join(lines[:1] + lines[1:][-1:])

