"""The context server: prefills each request's prompt but its last token (docs/design.md §1.3) and hands the KV over.

It runs on ``tensor_parallel_size`` t ranks (world ranks 0..t-1, their own group): each is a HelixModel with
tensor-parallel attention's layout (helix/factory.py ``build_context_model``: H / t heads and an FFN share in
prefill, one all-reduce per attention and FFN as in local prefill) and a cache of one sequence at a time that
holds every block. Every context rank reads the serving loop's request log in order (handoff.py). Per request,
on every context rank: prefill (scoring the prompt's tokens when the request asks for them: ``prompt/k``, rank
0), signal ``ready`` (rank 0), post one send per (layer, generation rank this rank serves that owns blocks;
generation rank g is served by context rank g mod t, kv_transfer.py), free its cache blocks (the sends carry
staged copies). It runs ahead of the generation server by at most ``max_batch_size`` requests, which bounds the
staged copies, and completes hand-overs while no new request is waiting.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from helix.comm import Comm
from helix.disagg.handoff import Handoff, PromptScores
from helix.disagg.kv_transfer import send_prompt_kv
from helix.engine import Request
from helix.factory import build_context_model
from helix.sampling import score_rows
from helix.spec import RunSpec

log = logging.getLogger(__name__)


class ContextServer:
    def __init__(self, dep: RunSpec, comm: Comm, device: torch.device):
        """``comm``: the group of the context server's ranks (context rank c = world rank c)."""
        self.dep, self.rank = dep, comm.rank
        self.model = build_context_model(dep, comm, device)
        # The generation server's KV dtype: an FP8 cache is written here and handed over as it is stored.
        self.cache = self.model.new_cache(dep.context.max_tokens, max_batch_size=1, kv_dtype=dep.generation.kv_dtype)

    def prefill(self, req: Request) -> tuple[int, PromptScores | None]:
        """Write the KV of prompt[:-1] into the cache as sequence ``req.req_id``; returns its token count and, when
        the request asks, on context rank 0 (the one that publishes them), the log-probs of prompt[1:] (row t of
        the prefill predicts token t + 1)."""
        n = len(req.prompt) - 1
        self.cache.add(req.req_id)
        slots = self.cache.append(req.req_id, n).to(self.model.device)
        if not n:
            return n, ([], []) if req.prompt_logprobs else None
        tokens = torch.tensor(req.prompt[:-1], device=self.model.device)
        # Every rank takes part in the prefill's collectives; only rank 0 scores (a [T, V] host copy and softmax).
        rows = self.model.prefill(tokens, slots, self.cache, logits_from=0 if req.prompt_logprobs else None)
        if rows is None or self.rank != 0:
            return n, None
        logprobs, _, top = score_rows(rows.cpu(), req.prompt[1:], req.top_logprobs)
        return n, (logprobs, top)

    def serve(self, handoff: Handoff) -> None:
        """Prefill the log's requests in order until it closes."""
        lookahead = self.dep.generation.max_batch_size
        pending: deque[tuple[int, list]] = deque()
        k = 0
        while True:
            if pending and not handoff.has(k):  # nothing new: complete a hand-over meanwhile
                self._finish(pending.popleft(), handoff)
                continue
            handoff.wait_request(k)
            req = handoff.request(k)
            if req is None:
                break
            k += 1
            n, scores = self.prefill(req)
            if self.rank == 0:
                if scores is not None:
                    handoff.put_prompt_scores(req.req_id, scores)
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
