"""The control plane of disaggregated serving: the request log the driver appends to, the admission rule, and
the signals the two servers exchange per request.

The context server and the generation ranks must agree, without a round trip, on what they serve: the driver
appends only requests that pass ``admission_error`` (a pure function of the request and the deployment, so a
request that cannot fit fails alone, before any rank sees it), and every rank reads the same log in order.

Everything rides on the rank pool's torch.distributed store, owned by the driver (the KV itself goes by
point-to-point sends, kv_transfer.py), under keys namespaced ``serve/<loop>/`` (one serving loop of the
cluster). Per request k (its index in the log, also its ``req_id`` on the ranks):

* ``req/k``: the pickled Request, set by the driver (``publish``); a pickled None closes the log. The context
  server prefills entries as they come; the generation ranks start them in log order.
* ``prompt/k``: the prompt's log-probs (``Request.prompt_logprobs``), set by context rank 0 before ``ready`` and
  taken by the generation leader, which reports them first (one producer per request: events stay ordered).
* ``ready/k``: the context server has prefilled request k and is posting its KV sends. The generation leader
  polls it between decode steps (a non-blocking key check: gloo receives cannot be polled). It comes from
  context rank 0: the t tensor-parallel context ranks prefill in lockstep (their collectives), and a receive
  waits for its send anyway.
* ``admitted/k/c``: the generation ranks have posted the receives for request k. Context rank c waits for it
  before waiting on its sends, so a send never sits in a transport timeout while request k queues.

Consumed signals are deleted by their reader; the driver deletes ``req/k`` once request k is done (every rank
has read it by then).
"""

from __future__ import annotations

import datetime
import pickle

import torch.distributed as dist

from helix.engine import Request
from helix.spec import RunSpec

# A wait here is for work (a long prefill, a queue of long generations, an idle server), not for a peer's
# collective; the driver notices a dead or failed peer within seconds and tears every rank down.
STORE_WAIT = datetime.timedelta(hours=6)

PromptScores = tuple[list[float], list[list[tuple[int, float]]]]  # per prompt token after the first: log-prob, top-k


def admission_error(req: Request, dep: RunSpec) -> str | None:
    """Why ``req`` cannot be served by this deployment, or None."""
    if not req.prompt:
        return f"request {req.req_id}: empty prompt (needs at least one token)"
    gen_max, ctx_max = dep.generation.max_tokens, dep.context.max_tokens
    if req.kv_tokens > gen_max:
        return (f"request {req.req_id}: {req.kv_tokens} tokens (prompt {len(req.prompt)} + {req.num_outputs} "
                f"outputs - 1) exceed the KV capacity generation_servers.kv_cache_config.max_tokens={gen_max}")
    if len(req.prompt) - 1 > ctx_max:
        return (f"request {req.req_id}: {len(req.prompt) - 1} prefill tokens exceed the KV capacity "
                f"context_servers.kv_cache_config.max_tokens={ctx_max}")
    return None


class Handoff:
    """The log and signals of one serving loop, between a context server of ``context_tp`` ranks and the
    generation server."""

    def __init__(self, store: dist.Store, loop: int, context_tp: int = 1):
        self.store, self.loop, self.prefix, self.context_tp = store, loop, f"serve/{loop}/", context_tp

    def _key(self, what: str, k: int) -> str:
        return f"{self.prefix}{what}/{k}"

    # driver
    def publish(self, k: int, req: Request | None) -> None:
        self.store.set(self._key("req", k), pickle.dumps(req))

    def forget(self, k: int) -> None:
        self.store.delete_key(self._key("req", k))

    # every rank: the log, in order
    def has(self, k: int) -> bool:
        return self.store.check([self._key("req", k)])

    def wait_request(self, k: int) -> None:
        """Block until entry k exists (an idle server waits here, however long)."""
        while True:
            try:
                return self.store.wait([self._key("req", k)], STORE_WAIT)
            except dist.DistStoreError:  # only the wait's own timeout: a dead driver ends this process
                continue

    def request(self, k: int) -> Request | None:
        """Entry k (it exists); None closes the log."""
        return pickle.loads(self.store.get(self._key("req", k)))

    # context server
    def put_prompt_scores(self, k: int, scores: PromptScores) -> None:
        self.store.set(self._key("prompt", k), pickle.dumps(scores))

    def mark_ready(self, k: int) -> None:
        self.store.set(self._key("ready", k), b"1")

    def wait_admitted(self, k: int, context_rank: int) -> None:
        key = f"{self._key('admitted', k)}/{context_rank}"
        self.store.wait([key], STORE_WAIT)
        self.store.delete_key(key)

    # generation leader
    def is_ready(self, k: int) -> bool:
        return self.store.check([self._key("ready", k)])

    def wait_ready(self, k: int) -> None:
        self.store.wait([self._key("ready", k)], STORE_WAIT)

    def take_prompt_scores(self, k: int) -> PromptScores:
        key = self._key("prompt", k)
        scores = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        return scores

    def mark_admitted(self, k: int) -> None:
        self.store.delete_key(self._key("ready", k))
        for c in range(self.context_tp):
            self.store.set(f"{self._key('admitted', k)}/{c}", b"1")
