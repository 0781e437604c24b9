"""The driver API of a disaggregated deployment: ``launch(config) -> Cluster``.

    with helix.disagg.launch("deploy.yaml") as cluster:
        ids = cluster.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16))
        logprobs, greedy = cluster.score([([1, 2, 3], [4, 5])])[0]

``launch`` validates the deployment (before any process starts), spawns one process per rank (the context
server's first, then the N generation ranks; one GPU each on CUDA), builds the servers and checks the KV
path between the context server and every generation rank. A batch runs as one command on every rank
(``serve``): the context server prefills request after request while the generation ranks decode, and
each request joins the decode batch as soon as its KV has arrived and a slot is free.

A rank that raises or dies makes the call raise ``WorkerError`` within seconds, naming the server and rank
and carrying the traceback; the cluster is then shut down. ``shutdown()`` (also on leaving the ``with``
block, on Ctrl-C inside it, and at interpreter exit) ends every rank process.
"""

from __future__ import annotations

import logging
import os

import torch

from helix.config import ConfigError
from helix.disagg.context_server import ContextServer
from helix.disagg.deploy import load_deployment
from helix.disagg.generation_server import BatchReport, GenerationServer
from helix.disagg.handoff import Handoff
from helix.disagg.kv_transfer import connect
from helix.engine import Request, RequestError, Result
from helix.sampling import SamplingParams, per_prompt
from helix.sources import load_source_tokenizer
from helix.spec import RunSpec
from helix.workers import RankContext, RankPool

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- rank side


def _start_rank(ctx: RankContext, dep: RunSpec) -> None:
    if ctx.rank in dep.context_ranks:
        ctx.state["server"] = ContextServer(dep, ctx.comm(ranks=dep.context_ranks), ctx.device)
    else:
        ctx.state["server"] = GenerationServer(dep, ctx.comm(ranks=dep.generation_ranks), ctx.device)
    connect(ctx.rank, dep.context_ranks, dep.generation_ranks, dep.handoff_device)


def _serve_rank(ctx: RankContext, batch: int, requests: list[Request]) -> BatchReport | None:
    server = ctx.state["server"]
    return server.serve(requests, Handoff(ctx.store, batch, len(server.dep.context_ranks)))


# --------------------------------------------------------------------------------------------- driver


def launch(config: "str | os.PathLike | dict | RunSpec") -> "Cluster":
    """Start the deployment described by a file path (YAML or JSON), its parsed dict, or a RunSpec with a
    context server."""
    return Cluster(load_deployment(config))


class Cluster:
    def __init__(self, dep: RunSpec, pool=None):
        """``pool``: the deployment's ranks, already joined, with RankPool's ``run`` and ``close`` (world rank 0's
        TorchrunPool under torchrun, helix/disagg/torchrun.py); None spawns a local RankPool."""
        self.dep = dep
        self.pool: RankPool | None = None
        gpus = len(set(dep.devices()))
        if pool is None and dep.device == "cuda" and torch.cuda.device_count() < gpus:
            raise ConfigError(f"model.device='cuda': the deployment needs {gpus} GPUs (context server "
                              f"{len(dep.context_ranks)}{' on GPU 0' if dep.context.colocate else ''} + "
                              f"generation_servers.context_parallel_size {len(dep.generation_ranks)}), "
                              f"{torch.cuda.device_count()} visible")
        self.tokenizer = load_source_tokenizer(dep.model)
        self._batches = 0
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

    # ------------------------------------------------------------------ requests
    def serve(self, requests: list[Request]) -> BatchReport:
        """Serve a batch; every request's Result (failed ones carry ``error``) and when each joined."""
        if self.pool is None:
            raise RuntimeError("the cluster is shut down")
        ids = [r.req_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids must be unique within a batch: {ids}")
        self._batches += 1
        try:
            out = self.pool.run(_serve_rank, self._batches, requests)
        except BaseException:  # a failed rank (the pool is already torn down), or Ctrl-C
            self.shutdown()
            raise
        return out[self.dep.generation_ranks[0]]

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
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        if getattr(self, "pool", None) is not None:
            self.shutdown()

