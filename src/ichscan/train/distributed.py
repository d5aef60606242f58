"""Single process by default; DistributedDataParallel when launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; with them, each process takes one GPU (NCCL)
or a share of the CPU cores (gloo), the training set is split by a DistributedSampler, and
gradients are averaged so every rank ends each step with the same weights. Multi-node is the
same command with torchrun's --nnodes/--rdzv options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        ids = [self.local_rank] if self.device.type == "cuda" else None
        # A frozen backbone leaves parameters without gradients.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=False
        )

    def sampler(self, dataset: Dataset, seed: int) -> DistributedSampler | None:
        if not self.distributed:
            return None
        return DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's BatchNorm statistics to every rank. DDP broadcasts buffers at the
        start of each forward, so after the last step each rank holds its own; validation
        and the saved model must see one set."""
        if self.distributed:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def agree(self, decision: int) -> int:
        """Rank 0's decision, on every rank: a choice made from each rank's own clock could
        send one rank out of the training loop while the others wait for it."""
        if not self.distributed:
            return decision
        flag = torch.tensor([decision], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return int(flag.item())

    def gather(self, obj: object) -> list[object]:
        """``obj`` of every rank, in rank order (a list of one without torchrun)."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def shutdown(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_from_env() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        # Without LOCAL_WORLD_SIZE (a launcher other than torchrun, e.g. srun), the world
        # spans nodes we cannot count: only this rank's own GPU is known to be needed.
        per_node = max(local + 1, int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)))
        if per_node > gpus:
            # NCCL cannot put two ranks on one GPU; say so before a cryptic NCCL error. Every
            # rank of the node refuses, rank 0 included, so the one that prints says it.
            from ichscan.train.loop import TrainingError

            raise TrainingError(
                None,
                f"torchrun started {per_node} processes, but this node has {gpus} GPU(s): "
                f"use --nproc_per_node {gpus} (or CUDA_VISIBLE_DEVICES= for CPU processes)",
            )
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # Ranks on one CPU machine share its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, _cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistContext(rank, world, local, device)


def default_workers(ctx: DistContext) -> int:
    """DataLoader workers: none on a small CPU machine (the cores are busy with the model),
    a few per GPU process."""
    if ctx.device.type == "cuda" or torch.cuda.is_available():
        return min(8, max(1, _cores() // max(1, ctx.world_size) - 1))
    return 0 if _cores() <= 2 else min(4, _cores() // (2 * ctx.world_size))
