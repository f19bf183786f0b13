"""Data-parallel SIRI on torch.distributed: the few process-group helpers the loop needs.

    torchrun --nproc_per_node 4 siri.py preset=qwen1.5b            # one node, 4 GPUs
    python siri.py                                                 # one process: no process group

torchrun starts one process per GPU (or per CPU worker) and sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; ``init`` reads them. The backend follows the run's device: NCCL on
CUDA, gloo on CPU. Data parallelism in SIRI means: every rank plays its own contiguous slice
(``shard``) of the task ids of a phase, so a GiGPO group (and its anchor-state step groups) never
straddles ranks; gradients of the trainable (LoRA) parameters are summed over ranks
(``all_reduce_grads``) and the loss is normalised by batch-wide token counts (``all_reduce_sum``),
so N ranks on a split batch take the same optimiser step as one process on the whole batch.

Every function is a pass-through when no process group is running (WORLD_SIZE unset or 1):
a single-process run executes exactly the code it did before this module existed.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from core import seed_of


def init(device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment; False (nothing done) if
    WORLD_SIZE is unset or 1, or a group is already running. ``device``: the run's device
    ("auto" | "cpu" | "cuda"), which picks the backend: NCCL for CUDA, gloo for CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank())  # one GPU per process; NCCL collectives use it
    # our choice: a long timeout, because a rank may wait at a barrier while rank 0 alone
    # runs the cold start or writes a checkpoint
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Index of this process on its node (torchrun's LOCAL_RANK): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only process that writes files (metrics, checkpoints, skill banks, plots)."""
    return rank() == 0


def device(requested: str) -> str:
    """The device of this rank: "cuda" / "auto" on a CUDA machine become this rank's GPU."""
    if not is_distributed() or dist.get_backend() != "nccl":
        return requested
    return f"cuda:{local_rank()}"


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence) -> list:
    """This rank's contiguous slice of ``items`` (e.g. the B task ids of an iteration).

    Slices differ in length by at most one (the first ``len % world`` ranks get one more); a
    rank may get none when there are fewer items than ranks. Concatenating the slices in rank
    order gives ``items`` back, which is how ``gather_objects`` restores the original order.
    """
    items = list(items)
    n, r, w = len(items), rank(), world_size()
    start = r * (n // w) + min(r, n % w)
    return items[start:start + n // w + (r < n % w)]


def rank_seed(seed: int) -> int:
    """Seed of this rank's rollouts, derived from (seed, rank); rank 0 keeps ``seed`` itself, so
    a single-process run is unchanged and no per-rank RNG state needs saving (resuming with a
    different number of ranks re-derives every seed)."""
    if rank() == 0:
        return seed
    return seed_of(seed, rank())


def all_reduce_sum(values):
    """Sum over ranks. A tensor is reduced in place and returned; a list of numbers comes back
    as a list of floats (reduced in float64). Pass-through when not distributed."""
    if not is_distributed():
        return values
    if torch.is_tensor(values):
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks (one flat buffer, one collective).

    A parameter without a gradient on this rank (its shard was empty) contributes zeros, so
    every rank joins the same collective. Summing, not averaging: the loss of each rank is
    already divided by batch-wide totals (see gigpo.update).
    """
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (Σ numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def broadcast_params(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def gather_objects(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
    if not is_distributed():
        return items
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (picklable)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()
