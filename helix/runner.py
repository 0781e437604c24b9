"""Run the Helix engine on N ranks: from a local RankPool (the embedded default: gloo on CPU, one GPU per
rank on CUDA) or under torchrun (one process per GPU, ``env://``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from helix.checkpoint import DTYPES, Checkpoint
from helix.comm import Comm, init_process_group
from helix.engine import HelixEngine, Request, Result
from helix.mapping import HelixMapping
from helix.model import HelixModel
from helix.workers import RankContext, RankPool


@dataclass(frozen=True)
class HelixSpec:
    """What a generation server runs: the checkpoint and the Helix keys of docs/design.md §4.2."""

    model: str
    cp: int
    tokens_per_block: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    max_tokens: int = 8192
    max_batch_size: int = 8
    moe_mode: str = "ep"
    cuda_graphs: bool = False  # capture the decode step (CUDA only)
    microbatches: int = 1  # HOP-B: micro-batches whose all-to-all overlaps the next one's attention
    kv_dtype: str = "auto"  # kv_cache_config.dtype: "auto" (the model's) or "fp8"

    def devices(self, first_gpu: int = 0) -> list[str]:
        if self.device == "cpu":
            return ["cpu"] * self.cp
        return [f"cuda:{first_gpu + r}" for r in range(self.cp)]


def build_engine(spec: HelixSpec, rank: int, comm: Comm, device: torch.device) -> HelixEngine:
    ckpt = Checkpoint(spec.model)
    mapping = HelixMapping(rank, spec.cp, spec.tokens_per_block)
    model = HelixModel(ckpt, mapping, comm, DTYPES[spec.dtype], device, spec.moe_mode,
                       microbatches=spec.microbatches)
    ckpt.close()
    return HelixEngine(model, spec.max_tokens, spec.max_batch_size, cuda_graphs=spec.cuda_graphs and device.type == "cuda",
                       kv_dtype=spec.kv_dtype)


def rank_engine(ctx: RankContext, spec: HelixSpec) -> HelixEngine:
    """The engine of ``spec`` on this rank, built once and kept in the rank's state."""
    key = ("engine", spec)
    if key not in ctx.state:
        ctx.state[key] = build_engine(spec, ctx.rank, ctx.comm(spec.cp), ctx.device)
    return ctx.state[key]


def rank_generate(ctx: RankContext, spec: HelixSpec, requests: list[Request]) -> list[Result] | None:
    results = rank_engine(ctx, spec).run(requests)
    return results if ctx.rank == 0 else None


def helix_generate(spec: HelixSpec, requests: list[Request], pool: RankPool | None = None) -> list[Result]:
    """Serve ``requests`` on ``spec.cp`` Helix ranks; spawns (and closes) a pool unless one is given."""
    if pool is not None:
        return pool.run(rank_generate, spec, requests, n=spec.cp)[0]
    with RankPool(spec.cp, spec.devices()) as own:
        return own.run(rank_generate, spec, requests)[0]


def torchrun_generate(spec: HelixSpec, requests: list[Request]) -> list[Result] | None:
    """Inside torchrun: this process is one Helix rank (LOCAL_RANK picks its GPU). Rank 0 gets the results."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != spec.cp:
        raise ValueError(f"--cp={spec.cp}: must equal torchrun's WORLD_SIZE={world}")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', rank)}") if spec.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = init_process_group(rank, world, device, "env://")
    results = build_engine(spec, rank, comm, device).run(requests)
    return results if rank == 0 else None
