"""One ``helix serve`` per test session (per xdist worker), in this process: the tiny checkpoint in float32 behind
context server 1 + Helix generation server N=2 (gloo ranks), uvicorn on a loopback socket bound first, on a
thread of its own. The tests talk to it over HTTP with real clients (the openai package, requests, lm-eval)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

TOKENS_PER_BLOCK = 16
MAX_TOKENS = 1024  # KV capacity per sequence: lm-eval's 5-shot prompts cut to 512 tokens fit
MAX_BATCH_SIZE = 8


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    model: str  # the served model's name: the checkpoint path
    cluster: object  # the Cluster behind it (the in-process adapter shares it in test_lm_eval.py)

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@pytest.fixture(scope="session")
def served(tiny_checkpoint):
    from helix.disagg import from_checkpoint, launch
    from helix.serve.server import HelixServer, bind, served_model

    cluster = launch(from_checkpoint(str(tiny_checkpoint), cp=2, tokens_per_block=TOKENS_PER_BLOCK,
                                     max_tokens=MAX_TOKENS, max_batch_size=MAX_BATCH_SIZE))
    model = served_model(cluster)
    server = HelixServer(cluster, model, bind("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, name="helix-serve-test", daemon=True)
    thread.start()  # the socket listens already: requests wait in its backlog until uvicorn is up
    try:
        yield Served(server.url, model.name, cluster)
    finally:
        server.stop()
        thread.join()
        cluster.shutdown()


@pytest.fixture(scope="session")
def client(served):
    import openai

    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=120)
