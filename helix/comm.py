"""Process groups and the three collectives a Helix step uses.

Backend: gloo on CPU, nccl on CUDA. Every wait is bounded by the process-group timeout, so a dead peer turns
into an exception instead of a hang (for NCCL this relies on TORCH_NCCL_ASYNC_ERROR_HANDLING, set here).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0  # a run's Execution.collective_timeout_s (default: HELIX_COLLECTIVE_TIMEOUT_S)


def backend_for(devices: list[torch.device | str]) -> str:
    """nccl when every member has a GPU of its own; gloo otherwise (CPU ranks, or ranks that share a GPU:
    NCCL refuses to connect two ranks on one device)."""
    devs = [torch.device(d) for d in devices]
    return "nccl" if all(d.type == "cuda" for d in devs) and len(set(devs)) == len(devs) else "gloo"


@dataclass
class Comm:
    """A process group plus this rank's place in it. ``group`` None means the default (world) group."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    # All tensors below are on the group's device; collectives are synchronous (CUDA: stream-ordered).

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_to_all(self, send: torch.Tensor, async_op: bool = False):
        """send [N, ...] -> recv [N, ...]: recv[j] is what rank j put in its send[self.rank].
        With ``async_op`` returns (recv, work): recv is valid after ``work.wait()`` (work None: already)."""
        if self.world_size == 1:
            return (send, None) if async_op else send
        send = send.contiguous()
        recv = torch.empty_like(send)  # after .contiguous(): empty_like would copy a transposed layout
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=async_op)
        return (recv, work) if async_op else recv

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [...] -> [N, ...] (equal shapes on every rank)."""
        if self.world_size == 1:
            return x.unsqueeze(0)
        out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group)
        return out


def init_process_group(rank: int, world_size: int, device: torch.device | str, init_method: str | None = None,
                       store: dist.Store | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                       backend: str | None = None) -> Comm:
    """Join the world group through ``init_method`` (env:// under torchrun) or an already connected ``store``;
    ``backend`` defaults to this rank's device's (see ``backend_for``)."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = backend or backend_for([device])
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(backend, init_method=init_method, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return Comm(rank, world_size)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
