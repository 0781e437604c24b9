"""The one place a run's model and engine are built from its ``RunSpec``: every server and benchmark calls it.

    generation rank g of N:  build_engine(spec, comm, device)     HelixMapping(g, N, T), the spec's KV capacity
    context server:          build_model(spec, context_mapping(spec), Comm(0, 1), device)   a world of one

The weights come from ``spec.model`` (a checkpoint directory or ``synthetic:PRESET``, helix/sources.py), each
rank reading only its slices; ``source`` overrides that with an already opened checkpoint (a benchmark keeps one
across the variants it times).
"""

from __future__ import annotations

from typing import Callable

import torch

from helix.attention import HelixMLA
from helix.checkpoint import DTYPES, Checkpoint, SyntheticCheckpoint
from helix.comm import Comm
from helix.engine import HelixEngine, Request
from helix.mapping import HelixMapping
from helix.model import HelixModel
from helix.sources import open_source
from helix.spec import RunSpec


def build_model(spec: RunSpec, mapping: HelixMapping, comm: Comm, device: torch.device, attention: type = HelixMLA,
                source: Checkpoint | SyntheticCheckpoint | None = None) -> HelixModel:
    """This rank's slice of the model. ``attention`` swaps the attention module (benchmarks: the TP baseline)."""
    ckpt = source if source is not None else open_source(spec.model, device)
    try:
        return HelixModel(ckpt, mapping, comm, dtype=DTYPES[spec.dtype], device=device,
                          moe_parallel=spec.generation.moe_parallel, execution=spec.execution, attention=attention)
    finally:
        if source is None:
            ckpt.close()


def build_engine(spec: RunSpec, comm: Comm, device: torch.device,
                 stop_check: Callable[[Request, list[int]], bool] | None = None) -> HelixEngine:
    """Generation rank ``comm.rank`` of ``comm.world_size``: its model and a cache of the spec's capacity."""
    gen = spec.generation
    model = build_model(spec, HelixMapping(comm.rank, comm.world_size, gen.tokens_per_block), comm, device)
    return HelixEngine(model, gen.max_tokens, gen.max_batch_size, stop_check,
                       cuda_graphs=spec.execution.cuda_graphs and device.type == "cuda")


def context_mapping(spec: RunSpec) -> HelixMapping:
    """The context server is a world of one: every block is local."""
    return HelixMapping(0, 1, spec.context.tokens_per_block)
