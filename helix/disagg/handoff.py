"""Who may start which request when: the admission rule both servers apply, and the two signals they exchange.

The context server and the generation ranks must agree, without a round trip, on which requests are handed
over: ``admission_error`` is a pure function of the request and the deployment, evaluated identically on
every rank, so a request that cannot fit fails alone and no KV is ever sent for it.

Signals ride on the rank pool's torch.distributed store, owned by the driver (the control plane; the KV
itself goes by point-to-point sends, kv_transfer.py), under keys namespaced ``handoff/batch<n>/``. Per batch
and request:

* ``ready/k``: the context server has prefilled request k and is posting its KV sends. The generation
  leader polls it between decode steps (a non-blocking key check: gloo receives cannot be polled).
* ``admitted/k/c``: the generation ranks have posted the receives for request k. Context rank c (of the
  context server's tensor-parallel ranks) waits for it before waiting on its sends, so a send never sits in a
  transport timeout while request k queues. ``ready/k`` comes from context rank 0: the t ranks prefill in
  lockstep (their collectives), and a receive waits for its send anyway.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from helix.engine import Request
from helix.spec import RunSpec

# A wait here is for work (a long prefill, a queue of long generations), not for a peer's collective; the
# driver notices a dead or failed peer within seconds and tears every rank down, so this only bounds a bug.
STORE_WAIT = datetime.timedelta(hours=6)


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


def handed_over(requests: list[Request], dep: RunSpec) -> list[Request]:
    """The requests whose KV goes from the context server to the generation server, in hand-over order."""
    return [r for r in requests if r.num_outputs > 0 and admission_error(r, dep) is None]


class Handoff:
    """The signals of one batch (keys are namespaced by the batch number, deleted once consumed) between a
    context server of ``context_tp`` ranks and the generation server."""

    def __init__(self, store: dist.Store, batch: int, context_tp: int = 1):
        self.store, self.prefix, self.context_tp = store, f"handoff/batch{batch}/", context_tp

    def _key(self, what: str, req_id: int) -> str:
        return f"{self.prefix}{what}/{req_id}"

    # context server
    def mark_ready(self, req_id: int) -> None:
        self.store.set(self._key("ready", req_id), b"1")

    def wait_admitted(self, req_id: int, context_rank: int) -> None:
        key = f"{self._key('admitted', req_id)}/{context_rank}"
        self.store.wait([key], STORE_WAIT)
        self.store.delete_key(key)

    # generation leader
    def is_ready(self, req_id: int) -> bool:
        return self.store.check([self._key("ready", req_id)])

    def wait_ready(self, req_id: int) -> None:
        self.store.wait([self._key("ready", req_id)], STORE_WAIT)

    def mark_admitted(self, req_id: int) -> None:
        self.store.delete_key(self._key("ready", req_id))
        for c in range(self.context_tp):
            self.store.set(f"{self._key('admitted', req_id)}/{c}", b"1")
