"""Running ``helix serve``: the deployment's Cluster behind the FastAPI app, under uvicorn, on a socket bound here.

The socket is bound before anything starts and handed to uvicorn (``--port 0`` takes a port the OS picks and
holds it: no probe-then-bind race), and connections wait in its backlog until the app serves them. A rank that
fails makes the Cluster fail every waiting request (503) and call ``on_failure``, which stops uvicorn; ``serve``
then raises the rank's WorkerError, so the command exits non-zero naming the rank, after the cluster has ended
every rank process. Ctrl-C or SIGTERM stop uvicorn gracefully (in-flight requests finish), then the cluster.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

import uvicorn

from helix.config import ConfigError
from helix.disagg.cluster import Cluster, launch
from helix.disagg.deploy import load_deployment
from helix.disagg.torchrun import drive
from helix.serve.app import build_app
from helix.serve.protocol import Model
from helix.sources import source_config
from helix.spec import RunSpec
from helix.workers import TorchrunEnv

log = logging.getLogger(__name__)

GRACEFUL_S = 5  # how long a stopping server waits for open connections


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 lets the OS pick."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--host={host!r} --port={port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    return sock


def served_model(cluster: Cluster, name: str | None = None) -> Model:
    """The frontend's view of the deployment's model; its name defaults to the model path, as vLLM's does (so
    lm-eval's ``model=`` finds the tokenizer there)."""
    dep = cluster.dep
    cfg = source_config(dep.model)
    return Model(name or dep.model, cluster.tokenizer, cfg.vocab_size, tuple(cfg.eos_token_ids),
                 min(dep.context.max_tokens, dep.generation.max_tokens))


class HelixServer:
    """uvicorn serving ``build_app(cluster, model)`` on ``sock``; ``run()`` blocks until ``stop()`` (or a signal,
    on the main thread)."""

    def __init__(self, cluster: Cluster, model: Model, sock: socket.socket):
        self.sock = sock
        config = uvicorn.Config(build_app(cluster, model), log_config=None, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_S)
        self.uvicorn = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def run(self) -> None:
        self.uvicorn.run(sockets=[self.sock])

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def serve(config: "str | os.PathLike | dict | RunSpec", host: str = "127.0.0.1", port: int = 8000,
          name: str | None = None, announce: Callable[[str], None] = print,
          torchrun: "TorchrunEnv | None" = None) -> None:
    """Serve the deployment until Ctrl-C / SIGTERM; raises the failed rank's WorkerError if one fails.

    ``torchrun``: this process is one rank of a torchrun world (helix/disagg/torchrun.py): world rank 0 binds the
    socket and runs the front end over the world's ranks, every other rank serves the cluster's commands until
    world rank 0 shuts it down."""
    dep = load_deployment(config)  # a bad file fails here, before a socket or a process
    if torchrun is not None and torchrun.rank != 0:
        drive(dep, torchrun, driver=None)
        return
    sock = bind(host, port)
    failures: list[BaseException] = []
    server: HelixServer | None = None

    def on_failure(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.stop()

    def front(cluster: Cluster) -> None:
        nonlocal server
        model = served_model(cluster, name)
        server = HelixServer(cluster, model, sock)
        announce(f"helix serve: {server.url}/v1 serves model {model.name!r}; Ctrl-C stops it")
        if not failures:
            server.run()

    try:
        if torchrun is None:
            with launch(dep, on_failure=on_failure) as cluster:
                front(cluster)
        else:
            drive(dep, torchrun, front, on_failure)
    finally:
        sock.close()
    if failures:
        raise failures[0]
