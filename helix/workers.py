"""Local rank processes: started once, they run many commands, and any failure surfaces in the driver.

``RankPool(world_size)`` starts one process per rank (torch.multiprocessing, forked from a server that imported
torch once: see ``rank_processes``), joins them in a
torch.distributed world (gloo on CPU, nccl on CUDA; gloo for any group whose ranks share a GPU) and creates
the prefix groups {0..n-1} for every n, so one pool serves Helix runs with N = 1..world_size.
``pool.run(fn, *args, n=N)`` calls ``fn(ctx, *args)`` on ranks 0..N-1 (``fn`` must be a module-level function)
and returns their results. A long-running command streams results as it goes: ``ctx.emit(payload)`` on a rank
reaches ``on_event(rank, payload)`` in the driver, in emission order per rank, while ``run`` waits.

A rank that raises sends its traceback; a rank that dies is seen through its process sentinel. Either way
the driver tears the pool down and raises ``WorkerError`` naming the rank, within seconds: nothing hangs,
and no process outlives the pool. The ranks ignore Ctrl-C; the driver's KeyboardInterrupt closes the pool.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import signal
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helix.comm import DEFAULT_TIMEOUT_S, Comm, backend_for, destroy, init_process_group
from helix.gpu_env import GPU_SAFE_ENV

log = logging.getLogger(__name__)

DEATH_GRACE_S = 0.5  # how long a rank's error waits for a peer's death to become visible

STORE_HOST = "127.0.0.1"  # the pool's ranks run on the driver's host

# What the fork server imports once for every rank it will fork. Nothing here touches CUDA, so each rank still
# picks its own device after the fork.
FORK_SERVER_PRELOAD = ["torch", "torch.distributed", "helix.workers"]


def rank_processes():
    """The multiprocessing context rank processes start from: a fork server (one per driver process, started
    with the first pool) that imported torch once. A fresh interpreter per rank (spawn) costs each rank ~1.5 s of
    torch import and ~1.5 s of interpreter teardown on a CPU core, so a pool of three took ~4 s to start and ~2 s
    to close on 2 cores; forked from the server, both take ~0.05 s. The ranks are the server's children, never
    the driver's: they get the driver's environment as of the pool's start explicitly (``_worker``)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


class WorkerError(RuntimeError):
    """A rank raised or died. ``rank`` names it; the message carries its traceback."""

    def __init__(self, rank: int, message: str, who: str | None = None):
        super().__init__(f"{who or f'rank {rank}'} failed:\n{message}")
        self.rank = rank


@contextlib.contextmanager
def children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside ignore SIGINT from their first instruction on (an ignored signal is inherited).
    Ctrl-C sends SIGINT to the whole process group; the parent alone handles it and ends its children, which
    would otherwise each print a KeyboardInterrupt traceback."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


@dataclass
class RankContext:
    """What a command sees on its rank: identity, device, the prefix groups, the pool's store (a key-value
    control plane shared with the driver and every rank), the channel back to the driver and a dict that
    persists between commands (models and caches live there)."""

    rank: int
    world_size: int
    device: torch.device
    store: dist.Store
    outbox: Any  # the pool's results queue
    groups: dict[int, Any] = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    def emit(self, payload: Any) -> None:
        """Hand ``payload`` to the driver's ``on_event`` now, while the command still runs."""
        self.outbox.put((self.rank, "event", payload))

    def comm(self, n: int | None = None, ranks: list[int] | None = None) -> Comm:
        """Comm over ranks 0..n-1 (default: the world), or over an explicit list created at start-up."""
        key = tuple(ranks) if ranks is not None else tuple(range(n or self.world_size))
        members = list(key)
        return Comm(members.index(self.rank), len(members), self.groups[key])


def run_command(fn: Callable, ctx: RankContext, args: tuple, kwargs: dict) -> tuple[str, Any]:
    """One command on a rank: ("ok", its result) or ("err", the traceback), what the driver collects."""
    try:
        return "ok", fn(ctx, *args, **kwargs)
    except BaseException:
        return "err", traceback.format_exc()


def _worker(rank: int, world: int, devices: list[str], store_port: int, extra_groups: list[tuple[int, ...]],
            commands, results, env: dict, threads: int, timeout_s: float) -> None:
    os.environ.clear()  # the fork server's environment is that of the pool's first start; the driver's is current
    os.environ.update(env)
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    try:
        store = dist.TCPStore(STORE_HOST, store_port, world, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        init_process_group(rank, world, device, store=store, backend=backend_for(devices), timeout_s=timeout_s)
        ctx = RankContext(rank, world, device, store, results)
        for key in [tuple(range(n)) for n in range(1, world + 1)] + list(extra_groups):
            backend = backend_for([devices[r] for r in key])
            group = dist.new_group(list(key), backend=backend) if len(key) < world else dist.group.WORLD
            if rank in key:
                ctx.groups[key] = group
    except BaseException:
        results.put((rank, "err", traceback.format_exc()))
        return
    results.put((rank, "ready", None))
    while True:
        msg = commands.get()
        if msg is None:
            break
        fn, args, kwargs = msg
        results.put((rank, *run_command(fn, ctx, args, kwargs)))
    destroy()


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells a process, read once where the command starts."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool  # the agent hosts the world's store (torchrun's default); else world rank 0 hosts it

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "TorchrunEnv | None":
        """None unless this process is one rank of a torchrun world of more than one."""
        if int(env.get("WORLD_SIZE", "1")) <= 1:
            return None
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), env["MASTER_ADDR"],
                   int(env["MASTER_PORT"]), env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


class RankPool:
    def __init__(self, world_size: int, devices: list[str] | None = None,
                 extra_groups: list[list[int]] | None = None, role_of: Callable[[int], str] | None = None,
                 start_timeout_s: float = 120.0, collective_timeout_s: float = DEFAULT_TIMEOUT_S):
        """``collective_timeout_s`` bounds every collective and store wait of the ranks (a run's
        ``Execution.collective_timeout_s``); CPU ranks use ``HELIX_THREADS_PER_RANK`` torch threads (default 1)."""
        self.world_size = world_size
        self.devices = devices or ["cpu"] * world_size
        self.role_of = role_of or (lambda r: f"rank {r}")
        ctx = rank_processes()
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world_size)]
        # The driver owns the rendezvous store on a port the OS picks and holds for the pool's life: choosing a
        # free port and handing it to rank 0 to bind would race with every other socket on the host.
        self._store = dist.TCPStore(STORE_HOST, 0, world_size, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=collective_timeout_s))
        env = {**os.environ, **GPU_SAFE_ENV}
        threads = int(os.environ.get("HELIX_THREADS_PER_RANK", "1"))
        groups = [tuple(g) for g in extra_groups or []]
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, world_size, self.devices, self._store.port, groups,
                                        self.commands[r], self.results, env, threads, collective_timeout_s))
                      for r in range(world_size)]
        with children_ignore_ctrl_c():  # the driver's KeyboardInterrupt closes the pool
            for p in self.procs:
                p.start()
        try:
            self._collect(list(range(world_size)), start_timeout_s)
        except BaseException:  # Ctrl-C while the ranks start (a rank's failure has closed the pool already)
            self.close()
            raise

    # ------------------------------------------------------------------
    def _collect(self, ranks: list[int], timeout_s: float | None,
                 on_event: Callable[[int, Any], None] | None = None) -> dict[int, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        got: dict[int, Any] = {}
        while len(got) < len(ranks):
            try:
                rank, status, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                if not self.procs:  # closed by another thread (shutdown while a command runs)
                    raise RuntimeError("the rank pool is closed") from None
                self._raise_if_dead(0.0)
                if deadline is not None and time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"ranks {sorted(set(ranks) - set(got))} did not answer within {timeout_s:.0f} s")
                continue
            if status == "err":
                # A rank's death often reaches its peers first (a closed connection): name the dead rank.
                self._raise_if_dead(DEATH_GRACE_S)
                self.close(grace_s=0)  # its peers may wait on it forever: end them now
                raise WorkerError(rank, payload, self.role_of(rank))
            if status == "event":
                on_event(rank, payload)
                continue
            got[rank] = payload
        return got

    def _raise_if_dead(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while True:
            for r, p in enumerate(self.procs):
                if not p.is_alive():
                    self.close(grace_s=0)  # its peers may wait on it forever: end them now
                    raise WorkerError(r, f"process exited with code {p.exitcode} without reporting an error",
                                      self.role_of(r))
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    @property
    def store(self) -> dist.Store:
        """The driver's handle on the ranks' store (the control plane)."""
        return self._store

    def run(self, fn: Callable, *args, ranks: list[int] | None = None, n: int | None = None,
            timeout_s: float | None = None, on_event: Callable[[int, Any], None] | None = None, **kwargs) -> list[Any]:
        """fn(ctx, *args, **kwargs) on ``ranks`` (default 0..n-1, default n = world); results in rank order.
        ``on_event(rank, payload)`` receives what the command emits (``ctx.emit``), on this thread."""
        if not self.procs:
            raise RuntimeError("the rank pool is closed")
        ranks = ranks if ranks is not None else list(range(n or self.world_size))
        for r in ranks:
            self.commands[r].put((fn, args, kwargs))
        got = self._collect(ranks, timeout_s, on_event)
        return [got[r] for r in ranks]

    def close(self, grace_s: float = 5.0) -> None:
        """Ask every rank to exit; kill those still running after ``grace_s``."""
        procs, self.procs = self.procs, []
        for p, q in zip(procs, self.commands):
            if p.is_alive():
                q.put(None)
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._store = None  # the rendezvous port is freed once no rank can still need it

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "procs", None):
            self.close()
