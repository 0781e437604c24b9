"""The generation server: N Helix ranks decoding with continuous batching, each request starting at its last
prompt token with the prompt's KV received from the context server.

Every generation rank runs the same engine calls in the same order (engine.py's contract), so admission
must be decided identically everywhere: between decode steps the leader (generation rank 0) counts how
many waiting requests, in hand-over order, have their KV ready and fit a free batch slot, and one tiny
all-reduce over the generation group gives every rank that count. Each rank then reserves the request's
blocks, receives the blocks it owns straight from the context server and starts the request; the next step
decodes it together with the requests already running. Finished requests leave and free their blocks.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from helix.comm import Comm
from helix.disagg.handoff import Handoff, admission_error, handed_over
from helix.disagg.kv_transfer import kv_sender, recv_prompt_kv
from helix.engine import Request, Result
from helix.factory import build_engine
from helix.sampling import first_stop
from helix.sources import load_source_tokenizer
from helix.spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    results: list[Result]  # in request order
    joined_step: dict[int, int]  # req_id -> decode steps of this batch already run when it joined
    steps: int  # decode steps the batch took


class GenerationServer:
    def __init__(self, dep: RunSpec, comm: Comm, device: torch.device):
        self.dep, self.comm = dep, comm
        self.g, self.n = comm.rank, comm.world_size
        self.context_rank = kv_sender(self.g, dep.context_ranks)  # the context rank that sends this rank its blocks
        self.engine = build_engine(dep, comm, device, self._stopped)
        self._tokenizer = None

    def _stopped(self, req: Request, token_ids: list[int]) -> bool:
        """Stop strings, on the decoded text of the generated tokens (every rank decides the same)."""
        if not req.sampling.stop_strings:
            return False
        if self._tokenizer is None:
            self._tokenizer = load_source_tokenizer(self.dep.model)
        text = self._tokenizer.decode(token_ids, skip_special_tokens=True)
        return first_stop(text, req.sampling.stop_strings) is not None

    # ------------------------------------------------------------------ one batch
    def serve(self, requests: list[Request], handoff: Handoff) -> BatchReport | None:
        eng, start_step = self.engine, self.engine.steps
        results: dict[int, Result] = {}
        for req in requests:
            if req.num_outputs == 0:
                results[req.req_id] = Result(req.req_id, logits=[] if req.keep_logits else None)
            elif (error := admission_error(req, self.dep)) is not None:
                results[req.req_id] = Result(req.req_id, finish_reason="error", error=error)
        waiting = deque(handed_over(requests, self.dep))
        joined: dict[int, int] = {}
        while waiting or eng.active:
            for _ in range(self._agree_admissions(waiting, handoff) if waiting else 0):
                req = waiting.popleft()
                self._admit(req, handoff)
                joined[req.req_id] = eng.steps - start_step
            for res in eng.step():
                results[res.req_id] = res
        if self.g != 0:
            return None
        return BatchReport([results[r.req_id] for r in requests], joined, eng.steps - start_step)

    def _agree_admissions(self, waiting: deque[Request], handoff: Handoff) -> int:
        """How many of the first waiting requests join before the next step: the leader's count, everywhere."""
        count = 0
        if self.g == 0:
            free = self.dep.generation.max_batch_size - len(self.engine.active)
            limit = min(free, len(waiting))
            if limit and not self.engine.active:
                handoff.wait_ready(waiting[0].req_id)  # nothing to decode meanwhile
            while count < limit and handoff.is_ready(waiting[count].req_id):
                count += 1
        agreed = torch.tensor([count], dtype=torch.int64, device=self.engine.model.device)
        return int(self.comm.all_reduce(agreed))

    def _admit(self, req: Request, handoff: Handoff) -> None:
        self.engine.reserve_prompt(req)  # allocates this rank's blocks for prompt[:-1]
        if self.g == 0:
            handoff.mark_admitted(req.req_id)
        recv_prompt_kv(self.engine.cache, req.req_id, len(req.prompt) - 1, self.context_rank, self.g, self.n,
                       self.dep.handoff_device)
        self.engine.start(req)
        log.debug("generation rank %d: request %d joined at step %d", self.g, req.req_id, self.engine.steps)
