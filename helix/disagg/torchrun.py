"""A deployment under torchrun, on one node or many (docs/design.md §5.5).

    every node i of K:  torchrun --nnodes K --node-rank i --nproc-per-node P_i --rdzv-backend c10d \\
                                 --rdzv-endpoint HOST:PORT -m helix generate --config deploy.yaml ...

torch.distributed's own rendezvous gives each process its RANK in a world of WORLD_SIZE, which must be the
deployment's: its role comes from the deployment file (world ranks 0..t-1 the context server, then the N
generation ranks; on CUDA each process takes GPU LOCAL_RANK of its node). The store torchrun sets up for the
world (MASTER_ADDR:MASTER_PORT) is the control plane, as a RankPool's store is locally.

``TorchrunPool`` is RankPool's interface (``run(fn, *args, ranks=, on_event=)``, ``store``, ``close``) over that
world: world rank 0 is the driver, which publishes each command in the store, runs its own share in a thread and
collects the other ranks' results and what they emit while the command runs (``ctx.emit``: event i of rank r in
command k at ``evt/k/r/i``, delivered before r's result, in order); a rank that raises sends its traceback, and
the call raises ``WorkerError`` naming it. Every other rank runs ``serve_commands`` until the driver closes the
pool. The driver's threads each have their own store connection (the submitting thread's ``store``, the polling
thread's, world rank 0's own share's), so a rank's blocking wait never holds up the driver. So a
``Cluster`` works unchanged on world rank 0 (``drive``), and ``helix serve`` can put its front end there the
same way. A rank that dies without a word is noticed through its peers: their collectives fail after
``collective_timeout_s`` and they report it; when world rank 0's process ends, torchrun ends its node's
processes and the others lose the store.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import threading
import time
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from helix.comm import backend_for, destroy, init_process_group
from helix.config import ConfigError
from helix.disagg.cluster import Cluster
from helix.disagg.deploy import load_deployment
from helix.disagg.handoff import STORE_WAIT
from helix.gpu_env import GPU_SAFE_ENV
from helix.spec import RunSpec
from helix.workers import RankContext, TorchrunEnv, WorkerError, run_command

T = TypeVar("T")

POLL_S = 0.01  # how often the driver looks for the other ranks' results


class _StoreOutbox:
    """``ctx.emit``'s channel on a rank other than the driver's: event i of command k at ``evt/k/<rank>/i``."""

    def __init__(self, store: dist.Store):
        self.store, self.command, self.count = store, 0, 0

    def start(self, k: int) -> None:
        self.command, self.count = k, 0

    def put(self, item: tuple[int, str, Any]) -> None:
        rank, _, payload = item
        self.store.set(f"evt/{self.command}/{rank}/{self.count}", pickle.dumps(payload))
        self.count += 1


class TorchrunPool:
    def __init__(self, spec: RunSpec, env: TorchrunEnv):
        """Join the torchrun world as the rank ``env.rank`` of ``spec``'s layout."""
        if env.world_size != spec.world_size:
            raise ConfigError(f"WORLD_SIZE={env.world_size}: must equal the deployment's ranks "
                              f"({len(spec.context_ranks)} context + {len(spec.generation_ranks)} generation = "
                              f"{spec.world_size}): make torchrun's --nnodes x --nproc-per-node add up to it")
        if spec.colocated:
            raise ConfigError("context_servers.colocate=True: not under torchrun, which runs one process per GPU")
        self.rank, self.world_size, self.role_of = env.rank, env.world_size, spec.role_of
        os.environ.update(GPU_SAFE_ENV)  # this process is a rank, as a RankPool's workers are (docs/design.md §5.3)
        device = torch.device(f"cuda:{env.local_rank}" if spec.device == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=spec.execution.collective_timeout_s)

        def client(host: bool) -> dist.Store:
            return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host,
                                 wait_for_workers=False, timeout=timeout)

        base = client(env.rank == 0 and not env.agent_store)
        rank_store = dist.PrefixStore("helix", base)
        devices = spec.devices()
        init_process_group(env.rank, env.world_size, device, store=dist.PrefixStore("helix-pg", base),
                           timeout_s=spec.execution.collective_timeout_s, backend=backend_for(devices))
        # world rank 0's own share emits into a local queue the driver drains; the others through the store
        self._own_events: queue.SimpleQueue | None = queue.SimpleQueue() if env.rank == 0 else None
        self._outbox = self._own_events if env.rank == 0 else _StoreOutbox(rank_store)
        self.ctx = RankContext(env.rank, env.world_size, device, rank_store, self._outbox)
        for key in (tuple(spec.context_ranks), tuple(spec.generation_ranks)):  # every rank creates every group
            group = dist.new_group(list(key), backend=backend_for([devices[r] for r in key]))
            if env.rank in key:
                self.ctx.groups[key] = group
        # The driver's connections: ``store`` for the thread that submits (a Cluster publishes requests there),
        # one for polling results and events while its share of a command runs in a thread.
        self.store = dist.PrefixStore("helix", client(False)) if env.rank == 0 else rank_store
        self._results = dist.PrefixStore("helix", client(False)) if env.rank == 0 else None
        self._next, self._closed = 0, False

    # ------------------------------------------------------------------ world rank 0: the driver
    def run(self, fn: Callable, *args, ranks: list[int] | None = None, n: int | None = None,
            timeout_s: float | None = None, on_event: Callable[[int, Any], None] | None = None,
            **kwargs) -> list[Any]:
        """fn(ctx, *args, **kwargs) on ``ranks`` (default: the world); results in rank order; ``on_event(rank,
        payload)`` receives what the command emits, on this thread. ``timeout_s`` is RankPool's signature; a
        torchrun world's waits are bounded by its collective timeout instead."""
        if self.rank != 0 or self._closed:
            raise RuntimeError("TorchrunPool.run: only world rank 0 drives, while the pool is open")
        ranks = ranks if ranks is not None else list(range(n or self.world_size))
        k, self._next = self._next, self._next + 1
        self.store.set(f"cmd/{k}", pickle.dumps((fn, args, kwargs, ranks)))
        own: dict[int, tuple[str, Any]] = {}
        thread = None
        if 0 in ranks:
            thread = threading.Thread(target=lambda: own.update({0: run_command(fn, self.ctx, args, kwargs)}), daemon=True)
            thread.start()
        pending, got = {r: f"res/{k}/{r}" for r in ranks if r != 0}, {}
        seen = dict.fromkeys(pending, 0)  # events delivered per rank
        while pending or (thread is not None and 0 not in got):
            new = {r: key for r, key in pending.items() if self._results.check([key])}
            events = self._deliver_events(k, seen, on_event)  # a rank's events precede its result
            for r, key in new.items():
                got[r] = pickle.loads(self._results.get(key))
                self._results.delete_key(key)
                del pending[r]
            if thread is not None and 0 not in got and not thread.is_alive():
                self._deliver_events(k, {}, on_event)
                got[0] = own[0]
            for r, (status, payload) in got.items():
                if status == "err":
                    self.close()
                    raise WorkerError(r, payload, self.role_of(r))
            if not new and not events:
                time.sleep(POLL_S)
        return [got[r][1] for r in ranks]

    def _deliver_events(self, k: int, seen: dict[int, int], on_event: Callable[[int, Any], None] | None) -> int:
        """Hand command k's new events to ``on_event``: world rank 0's from its queue, rank r's from the store
        from index ``seen[r]`` on. Returns how many."""
        count = 0
        while not self._own_events.empty():
            payload = self._own_events.get()[2]
            count += 1
            if on_event is not None:
                on_event(0, payload)
        for r in seen:
            while self._results.check([key := f"evt/{k}/{r}/{seen[r]}"]):
                payload = pickle.loads(self._results.get(key))
                self._results.delete_key(key)
                seen[r] += 1
                count += 1
                if on_event is not None:
                    on_event(r, payload)
        return count

    def close(self) -> None:
        """Tell every other rank to stop serving commands (a rank stuck in a collective with a failed peer sees it
        once its collective times out)."""
        if self.rank == 0 and not self._closed:
            self._closed = True
            self.store.set(f"cmd/{self._next}", pickle.dumps(None))

    # ------------------------------------------------------------------ every other rank
    def serve_commands(self) -> None:
        """Run the driver's commands on this rank, in order, until it closes the pool."""
        k = 0
        while True:
            key = f"cmd/{k}"
            self.store.wait([key], STORE_WAIT)
            msg = pickle.loads(self.store.get(key))
            if msg is None:
                return
            fn, args, kwargs, ranks = msg
            self._outbox.start(k)
            if self.rank in ranks:
                self.store.set(f"res/{k}/{self.rank}", pickle.dumps(run_command(fn, self.ctx, args, kwargs)))
            k += 1


def drive(config: "str | os.PathLike | dict | RunSpec", env: TorchrunEnv, driver: Callable[[Cluster], T],
          on_failure: Callable[[BaseException], None] | None = None) -> T | None:
    """Every process of the torchrun world calls this with the same deployment: world rank 0 starts the
    deployment's ``Cluster`` over the world (``on_failure`` as in ``Cluster``) and returns ``driver(cluster)``, then
    shuts it down; every other rank serves the cluster's commands and returns None once it is shut down."""
    spec = load_deployment(config)
    pool = TorchrunPool(spec, env)
    if env.rank != 0:
        pool.serve_commands()
        out = None
    else:
        with Cluster(spec, on_failure, pool=pool) as cluster:
            out = driver(cluster)
    destroy()  # after a failure the process just ends: a rank may still sit in a collective with the failed one
    return out
