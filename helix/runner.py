"""Run the Helix engine on N ranks that prefill their own prompts (a ``RunSpec`` without a context server): from
a local RankPool (the embedded default: gloo on CPU, one GPU per rank on CUDA) or under torchrun (one process per
GPU, ``env://``)."""

from __future__ import annotations

import torch

from helix.comm import destroy, init_process_group
from helix.engine import HelixEngine, Request, Result
from helix.factory import build_engine
from helix.spec import RunSpec
from helix.workers import RankContext, RankPool, TorchrunEnv


def _check_local(spec: RunSpec) -> None:
    if spec.context is not None:
        raise ValueError("spec.context: a run with a context server is a deployment; launch it with "
                         "helix.disagg.launch")


def rank_engine(ctx: RankContext, spec: RunSpec) -> HelixEngine:
    """The engine of ``spec`` on this rank, built once and kept in the rank's state."""
    key = ("engine", spec)
    if key not in ctx.state:
        ctx.state[key] = build_engine(spec, ctx.comm(spec.world_size), ctx.device)
    return ctx.state[key]


def rank_generate(ctx: RankContext, spec: RunSpec, requests: list[Request]) -> list[Result] | None:
    results = rank_engine(ctx, spec).run(requests)
    return results if ctx.rank == 0 else None


def helix_generate(spec: RunSpec, requests: list[Request], pool: RankPool | None = None) -> list[Result]:
    """Serve ``requests`` on the spec's N Helix ranks; spawns (and closes) a pool unless one is given."""
    _check_local(spec)
    if pool is not None:
        return pool.run(rank_generate, spec, requests, n=spec.world_size)[0]
    with RankPool(spec.world_size, spec.devices(), collective_timeout_s=spec.execution.collective_timeout_s) as own:
        return own.run(rank_generate, spec, requests)[0]


def torchrun_generate(spec: RunSpec, requests: list[Request], env: TorchrunEnv) -> list[Result] | None:
    """Inside torchrun: this process is Helix rank ``env.rank`` (its node's GPU ``env.local_rank``). Rank 0 gets
    the results."""
    _check_local(spec)
    if env.world_size != spec.world_size:
        raise ValueError(f"--cp={spec.world_size}: must equal torchrun's WORLD_SIZE={env.world_size}")
    device = torch.device(f"cuda:{env.local_rank}" if spec.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = init_process_group(env.rank, env.world_size, device, "env://",
                              timeout_s=spec.execution.collective_timeout_s)
    try:
        results = build_engine(spec, comm, device).run(requests)
    finally:  # left to interpreter exit, gloo's threads can be torn down while still joinable (SIGABRT)
        destroy()
    return results if env.rank == 0 else None
