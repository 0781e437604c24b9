"""The one description of a run (docs/design.md §4.4): which weights, in what dtype, on which devices, with which
Helix keys, serving limits and execution switches.

Every entry point produces a ``RunSpec`` and nothing else: the deployment file (``helix.disagg.load_deployment``),
``helix generate`` (local ranks or torchrun), ``helix eval`` and the lm-eval adapter (``from_checkpoint``: a
context server + Helix generation server on a checkpoint), ``helix bench``. Every server builds its model and
engine from it through helix/factory.py. A spec is frozen and keyword-only; ``dataclasses.replace`` makes a
variant.

Rank layout: the context server's rank(s) come first, then the N generation ranks. Without a context server
(``context`` None) the generation ranks prefill prompts themselves (heads split, each block written by its
owner), as ``helix generate --backend helix`` and torchrun do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from helix.comm import DEFAULT_TIMEOUT_S
from helix.config import HelixConfig, fail
from kernels._triton import PATHS as KERNEL_PATHS

@dataclass(frozen=True, kw_only=True)
class Execution:
    """How the ranks execute a spec; none of it changes the math beyond the tolerance policy (docs/design.md §6).

    Environment variables are documented defaults, read once where a command starts (``from_env``); the ranks
    receive the resolved values and read no environment themselves."""

    kernels: str = "auto"  # HELIX_KERNELS: auto (GPU kernels on CUDA, torch reference on CPU); cuda; triton; torch
    fuse: bool = True  # HELIX_FUSE: torch.compile the decode step's small elementwise chains on CUDA
    cuda_graphs: bool = True  # capture the decode step, one graph per batch size (CUDA only)
    microbatches: int = 1  # HOP-B: micro-batches whose all-to-all overlaps the next one's attention
    collective_timeout_s: float = DEFAULT_TIMEOUT_S  # HELIX_COLLECTIVE_TIMEOUT_S: bound on every wait

    def __post_init__(self):
        if self.kernels not in KERNEL_PATHS:
            fail("kernels", self.kernels, f"must be one of {list(KERNEL_PATHS)}")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            fail("microbatches", self.microbatches, "must be an integer >= 1")
        if not self.collective_timeout_s > 0:
            fail("collective_timeout_s", self.collective_timeout_s, "must be > 0 seconds")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides) -> "Execution":
        """The defaults the environment sets (README, "Environment variables"), then ``overrides``."""
        values: dict = {}
        if (kernels := env.get("HELIX_KERNELS", "").strip().lower()) != "":
            if kernels not in KERNEL_PATHS:
                fail("HELIX_KERNELS", kernels, f"must be one of {list(KERNEL_PATHS)}")
            values["kernels"] = kernels
        if (fuse := env.get("HELIX_FUSE", "").strip()) != "":
            if fuse not in ("0", "1"):
                fail("HELIX_FUSE", fuse, "must be 0 (off) or 1 (on)")
            values["fuse"] = fuse == "1"
        if (timeout := env.get("HELIX_COLLECTIVE_TIMEOUT_S", "").strip()) != "":
            try:
                values["collective_timeout_s"] = float(timeout)
            except ValueError:
                fail("HELIX_COLLECTIVE_TIMEOUT_S", timeout, "must be a number of seconds > 0")
            if not values["collective_timeout_s"] > 0:
                fail("HELIX_COLLECTIVE_TIMEOUT_S", timeout, "must be a number of seconds > 0")
        return cls(**{**values, **overrides})


@dataclass(frozen=True, kw_only=True)
class ContextServerConfig:
    """The context server's keys (docs/design.md §4.3)."""

    tensor_parallel_size: int = 1  # t context ranks: prefill splits the heads over them, each caches every row
    tokens_per_block: int = 32
    max_tokens: int = 8192  # longest prompt it prefills (its KV capacity for one sequence)
    colocate: bool = False  # on CUDA: run on generation rank 0's GPU (N GPUs in all instead of N + 1)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    model: str  # an HF checkpoint directory (absolute), or synthetic:PRESET (helix/sources.py)
    dtype: str = "float32"  # the runtime's compute dtype: float32 | bfloat16
    device: str = "cpu"  # cpu (gloo) | cuda (nccl, one GPU per rank)
    generation: HelixConfig = field(default_factory=HelixConfig)  # Helix keys and serving limits
    context: ContextServerConfig | None = None  # None: the generation ranks prefill prompts themselves
    execution: Execution = field(default_factory=Execution)
    source: str | None = None  # the deployment file it came from, for messages

    # ------------------------------------------------------------------ rank layout
    @property
    def context_ranks(self) -> list[int]:
        return list(range(self.context.tensor_parallel_size)) if self.context is not None else []

    @property
    def generation_ranks(self) -> list[int]:
        c = len(self.context_ranks)
        return list(range(c, c + self.generation.context_parallel_size))

    @property
    def world_size(self) -> int:
        return len(self.context_ranks) + self.generation.context_parallel_size

    @property
    def colocated(self) -> bool:
        return self.context is not None and self.context.colocate

    def devices(self) -> list[str]:
        """One device per rank, in rank order: one GPU each on CUDA, except that a colocated context server
        shares GPU 0 with generation rank 0."""
        if self.device == "cpu":
            return ["cpu"] * self.world_size
        if self.colocated:
            return ["cuda:0"] + [f"cuda:{g}" for g in range(self.generation.context_parallel_size)]
        return [f"cuda:{r}" for r in range(self.world_size)]

    @property
    def handoff_device(self) -> str:
        """Where the KV hand-over's tensors travel: host memory when the context server shares a GPU (its
        group with the generation ranks is then gloo: NCCL does not connect two ranks on one GPU)."""
        return "cpu" if self.colocated else self.device

    def role_of(self, rank: int) -> str:
        if rank in self.context_ranks:
            return f"context server rank {rank} (world rank {rank})"
        return f"generation server rank {rank - len(self.context_ranks)} (world rank {rank})"

    @property
    def tokens_per_block(self) -> int:
        return self.generation.tokens_per_block
