"""The generation server: N Helix ranks decoding with continuous batching, each request starting at its last
prompt token with the prompt's KV received from the context server.

It runs the engine's one loop (``HelixEngine.serve``) over the serving loop's request log (handoff.py,
``LogAdmissions``). Every generation rank runs the same engine calls in the same order (engine.py's contract), so
admission must be decided identically everywhere: between decode steps the leader (generation rank 0) reads the
new log entries, counts how many waiting requests, in log order, have their KV ready and fit a free batch slot,
and one tiny all-reduce over the generation group gives every rank that count (and whether the log is closed
and drained: then every rank leaves the loop). Each rank then reads those requests from the log, reserves their
blocks, receives the blocks it owns straight from the context server and starts them; the next step decodes
them together with the requests already running. Finished requests leave and free their blocks. With nothing to
decode every rank waits on the store for the next log entry, with no collective pending, however long.

The leader reports to the driver (``emit``): a request's prompt scores when it starts (if asked), its new
tokens after every step (if it streams), and its Result, with the engine steps at which it joined and finished.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

import torch

from helix.comm import Comm
from helix.disagg.handoff import Handoff
from helix.disagg.kv_transfer import kv_sender, recv_prompt_kv
from helix.engine import HelixEngine, Request, Result
from helix.factory import build_engine
from helix.sampling import first_stop
from helix.sources import load_source_tokenizer
from helix.spec import RunSpec

log = logging.getLogger(__name__)


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

    def serve(self, handoff: Handoff, emit: Callable[[Any], None]) -> None:
        """Serve the log of one serving loop until it closes and every request is done."""
        self.engine.serve(LogAdmissions(self, handoff, emit))


class LogAdmissions:
    """The engine's admissions (engine.Admissions) over the request log, agreed by the generation group."""

    def __init__(self, server: GenerationServer, handoff: Handoff, emit: Callable[[Any], None]):
        self.server, self.handoff, self.emit = server, handoff, emit
        self.leader = server.g == 0
        self.next = 0  # log index of the next request to start (every rank)
        self.read, self.closed = 0, False  # leader: log entries read, and whether the closing entry was among them
        self.waiting: deque[Request] = deque()  # leader: read, not started
        self.joined: dict[int, int] = {}  # leader: engine step at which each running request joined
        self.sent: dict[int, int] = {}  # leader: tokens already reported of each running streamed request

    def join(self, engine: HelixEngine) -> bool:
        if not engine.active:  # idle: wait for work on the store, not in a collective (no timeout applies)
            self.handoff.wait_request(self.next)
        count, stop = self._agree(engine)
        if stop:
            return False
        for _ in range(count):
            req = self.waiting.popleft() if self.leader else self.handoff.request(self.next)
            self.next += 1
            self._start(engine, req)
        return True

    def _agree(self, engine: HelixEngine) -> tuple[int, bool]:
        """How many of the first waiting requests join before the next step, and whether the loop ends: the
        leader's decision, everywhere."""
        count, stop = 0, False
        if self.leader:
            while not self.closed and self.handoff.has(self.read):
                req = self.handoff.request(self.read)
                self.read += 1
                self.closed = req is None
                if req is not None:
                    self.waiting.append(req)
            limit = min(self.server.dep.generation.max_batch_size - len(engine.active), len(self.waiting))
            if limit and not engine.active:
                self.handoff.wait_ready(self.waiting[0].req_id)  # nothing to decode meanwhile
            while count < limit and self.handoff.is_ready(self.waiting[count].req_id):
                count += 1
            stop = self.closed and not self.waiting and not engine.active
        agreed = torch.tensor([count, int(stop)], dtype=torch.int64, device=engine.model.device)
        count, stop = self.server.comm.all_reduce(agreed).tolist()
        return count, bool(stop)

    def _start(self, engine: HelixEngine, req: Request) -> None:
        server = self.server
        engine.reserve_prompt(req)  # allocates this rank's blocks for prompt[:-1]
        if self.leader:
            self.handoff.mark_admitted(req.req_id)
        recv_prompt_kv(engine.cache, req.req_id, len(req.prompt) - 1, server.context_rank, server.g, server.n,
                       server.dep.handoff_device)
        engine.start(req)
        if self.leader:
            if req.prompt_logprobs:
                self.emit(("prompt", req.req_id, self.handoff.take_prompt_scores(req.req_id)))
            self.joined[req.req_id] = engine.steps
            if req.stream:
                self.sent[req.req_id] = 0
        log.debug("generation rank %d: request %d joined at step %d", server.g, req.req_id, engine.steps)

    def report(self, engine: HelixEngine, finished: list[Result]) -> None:
        if not self.leader:
            return
        for res in finished:
            self.sent.pop(res.req_id, None)
            self.emit(("done", res.req_id, res, self.joined.pop(res.req_id), engine.steps))
        for k, sent in self.sent.items():  # streamed requests still running: this step's token
            res = engine.active[k].result
            self.sent[k] = len(res.token_ids)
            self.emit(("tokens", k, res.token_ids[sent:], res.logprobs[sent:], res.top_logprobs[sent:]))
