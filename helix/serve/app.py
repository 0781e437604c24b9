"""The HTTP frontend of ``helix serve``: OpenAI-compatible routes over a running Cluster.

    POST /v1/completions   protocol.py's body; JSON, or server-sent events with "stream": true
    GET  /v1/models        the one model served
    GET  /health           200 while the cluster serves, 503 once it is down

Each prompt of a request becomes one engine Request submitted to the cluster's serving loop
(``Cluster.submit``): it joins the running decode batch as soon as its KV has arrived and a slot is free, beside
every other client's requests. Its events (prompt scores, streamed tokens, the Result) come back on the
cluster's dispatcher thread and reach the request's task through its asyncio queue.

Errors are OpenAI's JSON with the status: 400 for a bad request (the parameter and the rule: an unknown key, a
value out of range, a prompt over the KV capacity, which fails alone), 404 for another model's name, 500 when a
request fails in the model (non-finite logits), 503 once the cluster is down (a rank failed: every waiting
request gets it within seconds). A stream that fails after its first chunk ends with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from helix.disagg.cluster import Cluster, ClusterDown, failure_headline
from helix.engine import Request
from helix.serve.protocol import (APIError, CompletionRequest, LogprobsBuilder, Model, completion_id,
                                  completion_text, envelope, to_requests)


def build_app(cluster: Cluster, model: Model) -> FastAPI:
    app = FastAPI(title="helix serve", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"] if x != "body")
        if err["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {where}"
        elif where.startswith("prompt"):  # a union: pydantic reports its first member's rule only
            where, message = "prompt", ("prompt: must be a string, a list of strings, a list of token ids or a list of "
                                        "lists of token ids")
        elif err["type"] == "json_invalid":
            message = f"the body is not valid JSON ({err['msg']})"
        else:
            message = f"{where}: {err['msg']} (got {err.get('input')!r})"
        return JSONResponse(APIError(400, message, where.split(".")[0] or None).body(), status_code=400)

    @app.get("/health")
    async def health() -> JSONResponse:
        up = cluster.pool is not None
        return JSONResponse({"status": "ok" if up else "down"}, status_code=200 if up else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0, "owned_by": "helix",
                                            "max_model_len": model.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        requests = to_requests(body, model)
        for req in requests:
            if (error := cluster.check(req)) is not None:
                raise APIError(400, error, "prompt", "context_length_exceeded")  # request i: the i-th prompt
        events = _submit(cluster, requests)
        if body.stream:
            return StreamingResponse(_stream(body, model, requests, events), media_type="text/event-stream")
        return await _complete(body, model, requests, events)

    return app


def _submit(cluster: Cluster, requests: list[Request]) -> asyncio.Queue:
    """Submit every prompt's Request; their events, as (prompt index, kind, payload), arrive on the queue."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def sink(i: int):
        def on_event(kind: str, payload) -> None:  # on the cluster's dispatcher thread
            if not loop.is_closed():  # a server stopped meanwhile: nobody waits for it
                loop.call_soon_threadsafe(events.put_nowait, (i, kind, payload))
        return on_event

    try:
        for req in requests:
            cluster.submit(req, sink(req.req_id))
    except ClusterDown as e:
        raise APIError(503, str(e)) from None
    return events


def _failed(payload: BaseException) -> APIError:
    return APIError(503, f"the cluster is down: {failure_headline(payload)}")


def _check(i: int, error: str | None) -> None:
    if error is not None:
        raise APIError(500, f"prompt {i} failed: {error}")


async def _until_done(events: asyncio.Queue, n: int) -> AsyncIterator[tuple[int, str, object]]:
    """The events of n submitted prompts until each is done; a failed cluster raises the 503."""
    while n:
        i, kind, payload = await events.get()
        if kind == "failed":
            raise _failed(payload)
        n -= kind == "done"
        yield i, kind, payload


async def _complete(body: CompletionRequest, model: Model, requests: list[Request], events: asyncio.Queue) -> dict:
    results, scores = [None] * len(requests), [None] * len(requests)
    async for i, kind, payload in _until_done(events, len(requests)):
        if kind == "prompt":
            scores[i] = payload
        elif kind == "done":
            results[i] = payload[0]
    choices = []
    for req, res, prompt_scores in zip(requests, results, scores):
        _check(req.req_id, res.error)
        text = completion_text(model, res.token_ids, req.sampling.stop_strings)
        logprobs = None
        if body.logprobs is not None:
            lp = LogprobsBuilder(model)
            if body.echo:
                lp.add_prompt(req.prompt, prompt_scores)
            lp.add_result(res)
            logprobs = lp.since(0)
        if body.echo:
            text = _prompt_text(body, model, req) + text
        choices.append({"index": req.req_id, "text": text, "logprobs": logprobs, "finish_reason": res.finish_reason})
    prompt_tokens = sum(len(r.prompt) for r in requests)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return envelope(completion_id(), model, choices, {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": completion_tokens,
                                                      "total_tokens": prompt_tokens + completion_tokens})


def _prompt_text(body: CompletionRequest, model: Model, req: Request) -> str:
    """What ``echo`` repeats: the prompt as sent (text), or its tokens decoded."""
    prompt = body.prompts()[req.req_id]
    return prompt if isinstance(prompt, str) else model.tokenizer.decode(req.prompt)


class _StreamedChoice:
    """One prompt's share of a stream: text is sent once it can no longer become part of a stop string or of a
    character still incomplete (a multi-byte character split across tokens)."""

    def __init__(self, body: CompletionRequest, model: Model, req: Request):
        self.body, self.model, self.req = body, model, req
        self.ids: list[int] = []
        self.sent = 0  # characters of the completion already sent
        self.hold = max((len(s) for s in req.sampling.stop_strings), default=1) - 1
        self.logprobs = LogprobsBuilder(model) if body.logprobs is not None else None

    def chunk(self, text: str, logprobs: dict | None, finish: str | None = None) -> dict:
        return {"index": self.req.req_id, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def echo(self, scores) -> dict:
        lp = self.logprobs.add_prompt(self.req.prompt, scores) if self.logprobs is not None else None
        return self.chunk(_prompt_text(self.body, self.model, self.req), lp)

    def tokens(self, ids: list[int], logprobs: list[float], top: list) -> dict | None:
        self.ids += ids
        lp = self.logprobs.add(ids, logprobs, top or [[] for _ in ids]) if self.logprobs is not None else None
        text = completion_text(self.model, self.ids, self.req.sampling.stop_strings)
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        delta, self.sent = text[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return self.chunk(delta, lp) if delta or lp else None

    def done(self, res) -> dict:
        _check(self.req.req_id, res.error)
        lp = self.logprobs.add_result(res, len(self.ids)) if self.logprobs is not None else None
        text = completion_text(self.model, res.token_ids, self.req.sampling.stop_strings)
        return self.chunk(text[self.sent:], lp, res.finish_reason)


async def _stream(body: CompletionRequest, model: Model, requests: list[Request],
                  events: asyncio.Queue) -> AsyncIterator[str]:
    cid = completion_id()
    choices = [_StreamedChoice(body, model, req) for req in requests]

    def sse(choice: dict) -> str:
        return f"data: {json.dumps(envelope(cid, model, [choice]))}\n\n"

    try:
        if body.echo and body.logprobs is None:
            for c in choices:
                yield sse(c.echo(None))
        async for i, kind, payload in _until_done(events, len(requests)):
            if kind == "prompt":
                yield sse(choices[i].echo(payload))
            elif kind == "tokens":
                if (chunk := choices[i].tokens(*payload)) is not None:
                    yield sse(chunk)
            elif kind == "done":
                yield sse(choices[i].done(payload[0]))
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"
