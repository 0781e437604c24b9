"""The context server: prefills each request's prompt but its last token (docs/design.md §1.3) and hands the KV over.

It runs on ``tensor_parallel_size`` t ranks (world ranks 0..t-1, their own group): each is a HelixModel with
tensor-parallel attention's layout (helix/factory.py ``build_context_model``: H / t heads and an FFN share in
prefill, one all-reduce per attention and FFN as in local prefill) and a cache of one sequence at a time that
holds every block. Per request, on every context rank: prefill, signal ``ready`` (rank 0), post one send per
(layer, generation rank this rank serves that owns blocks; generation rank g is served by context rank g mod t,
kv_transfer.py), free its cache blocks (the sends carry staged copies). It runs ahead of the generation server
by at most ``max_batch_size`` requests, which bounds the staged copies.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from helix.comm import Comm
from helix.disagg.handoff import Handoff, handed_over
from helix.disagg.kv_transfer import send_prompt_kv
from helix.engine import Request
from helix.factory import build_context_model
from helix.spec import RunSpec

log = logging.getLogger(__name__)


class ContextServer:
    def __init__(self, dep: RunSpec, comm: Comm, device: torch.device):
        """``comm``: the group of the context server's ranks (context rank c = world rank c)."""
        self.dep, self.rank = dep, comm.rank
        self.model = build_context_model(dep, comm, device)
        # The generation server's KV dtype: an FP8 cache is written here and handed over as it is stored.
        self.cache = self.model.new_cache(dep.context.max_tokens, max_batch_size=1, kv_dtype=dep.generation.kv_dtype)

    def prefill(self, req: Request) -> int:
        """Write the KV of prompt[:-1] into the cache as sequence ``req.req_id``; returns its token count."""
        n = len(req.prompt) - 1
        self.cache.add(req.req_id)
        slots = self.cache.append(req.req_id, n).to(self.model.device)
        if n:
            self.model.prefill(torch.tensor(req.prompt[:-1], device=self.model.device), slots, self.cache)
        return n

    def serve(self, requests: list[Request], handoff: Handoff) -> None:
        lookahead = self.dep.generation.max_batch_size
        pending: deque[tuple[int, list]] = deque()
        for req in handed_over(requests, self.dep):
            n = self.prefill(req)
            if self.rank == 0:
                handoff.mark_ready(req.req_id)
            pending.append((req.req_id, send_prompt_kv(self.cache, req.req_id, n, self.rank, self.dep.context_ranks,
                                                       self.dep.generation_ranks, self.dep.handoff_device)))
            self.cache.release(req.req_id)
            log.debug("context server: request %d prefilled (%d tokens), KV sent", req.req_id, n)
            while len(pending) > lookahead:
                self._finish(pending.popleft(), handoff)
        while pending:
            self._finish(pending.popleft(), handoff)

    def _finish(self, entry: tuple[int, list], handoff: Handoff) -> None:
        req_id, sends = entry
        handoff.wait_admitted(req_id, self.rank)
        for work, _ in sends:
            work.wait()
