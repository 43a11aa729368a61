"""Tuning spread over processes (data parallel within each block).

Every process holds the whole block and every calibration sample, draws the same batches from the same
generator, and computes the loss of its share of each batch (``idx[rank::size]``). Summing the shares'
gradients (each share's mean loss divided by the number of processes) gives the gradient of the whole
batch's mean loss, so every process takes the same signed step, keeps the same best step and ends with
the same weights as one process would, within float rounding. Time per step falls with the number of
processes; the block's forward for the targets is repeated on each (cheap next to the tuning steps).

Started by ``torchrun --nproc-per-node N -m quantize ...`` (or ``--gpus N``): NCCL on GPUs, gloo on CPUs.
Process 0 prints, keeps the resume state and writes the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from quantize.model import UserError


@dataclass(frozen=True)
class Team:
    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.rank :: self.size]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise UserError(f"--batch_size {batch_size} does not split evenly over {self.size} processes: use a multiple of {self.size}")

    def sum(self, value: float, device: torch.device) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()

    def sum_grads(self, tensors: list[torch.Tensor]) -> None:
        """Sum the gradients of ``tensors`` over the team, in one collective."""
        if self.size == 1:
            return
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for t, g in zip(tensors, grads):
            t.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()

    def agree(self, flag: bool, device: torch.device) -> bool:
        """The leader's ``flag``, on every process."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def current() -> Team:
    if dist.is_available() and dist.is_initialized():
        return Team(dist.get_rank(), dist.get_world_size())
    return Team()


def launched() -> bool:
    """Started by torchrun (or --gpus) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> tuple[Team, torch.device]:
    """Join the team torchrun started; on CUDA each process takes the GPU of its local rank."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} has no GPU of its own ({torch.cuda.device_count()} visible): start fewer processes")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current(), device
