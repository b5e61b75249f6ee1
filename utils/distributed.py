"""Several processes under `torchrun` (DistributedDataParallel); one process without it.

    python train_unimatch.py --gpu 0                                   # one process, no group
    torchrun --nproc_per_node 4 train_unimatch.py                      # 4 GPUs: cuda:LOCAL_RANK
    torchrun --standalone --nproc_per_node 2 train_supervised.py --gpu -1   # CPU processes (gloo)

torchrun gives each process RANK, WORLD_SIZE and LOCAL_RANK in its environment; no flag is
needed. Without them (a plain `python train_x.py`, or torchrun with one process) the world size
is 1, no process group starts and every function here is the identity or does nothing, so one
process runs exactly as it always did.

Under torchrun every process runs the whole script on its own share of each global batch
(builders.iterations_per_epoch and the epoch loaders), the gradients are averaged by DDP, and
rank 0 alone writes files and prints; everything decided from a validation score is broadcast
from rank 0 so that no process drifts or waits forever. A process that stops (bad input, a NaN,
a crash) makes torchrun stop the others; a peer that vanishes without torchrun noticing (another
node) ends the others after `timeout_minutes`.
"""
import atexit
import contextlib
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def rank():
    return int(os.environ.get("RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank():
    """The process's index on its node: its CUDA device under torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size():
    """Processes on this node (torchrun's --nproc_per_node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_distributed():
    return world_size() > 1


def is_main():
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def print_from_main_only():
    """Silence the standard output of every rank but 0 (errors still reach stderr)."""
    if not is_main() and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")


def start(device, timeout_minutes):
    """Join the process group of a torchrun launch: NCCL on CUDA, gloo on the CPU. Does nothing
    in one process or when already started (train_teacher_student.py's teacher run is a second
    training in the same processes)."""
    if not is_distributed() or dist.is_initialized():
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if cuda else None)
    atexit.register(stop)
    print(f"torchrun: {world_size()} processes ({'NCCL' if cuda else 'gloo'}), this one rank "
          f"{rank()} on {device}; batch_size and lr are per process (README: Several GPUs or "
          "nodes)")


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may write: the phantom, a decoded-image cache), then the
    others, who find its files there."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value):
    """[value of rank 0, value of rank 1, …] on every rank."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_ranks(values, device):
    """{name: float} averaged over the ranks (names in the same set on every rank). A NaN or
    inf on one rank makes the mean non-finite on all of them, which is how a diverged process
    stops the others at the same step."""
    if not dist.is_initialized() or not values:
        return values
    names = sorted(values)
    stacked = torch.tensor([float(values[name]) for name in names], dtype=torch.float64,
                           device=device)
    dist.all_reduce(stacked)
    return dict(zip(names, (stacked / world_size()).tolist()))


def sync_buffers(module):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before
    each forward. With per-process BatchNorm (the CPU) they differ after a step; a teacher that
    copies them must copy the same ones everywhere."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class Applied(nn.Module):
    """`forward(function, *args)` = `function(model, *args)`.

    DDP averages the gradients of the forwards that go through its own `forward`; a training
    step that also calls `model.encode`/`model.decode` (UniMatch's feature perturbation, edge
    guidance) or several forwards would escape it. Running the whole loss computation as one
    call through this module keeps every forward of the step inside DDP, with no method flag on
    the networks' `forward`.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, function, *args, **kwargs):
        return function(self.model, *args, **kwargs)


def data_parallel(model, device):
    """The callable a training loop computes its loss through: `forward(train_step, batch…)`
    runs `train_step(model, batch…)`, under torchrun inside DDP (gradients averaged over the
    processes; BatchNorm becomes SyncBatchNorm on CUDA). Checkpoints keep saving `model` itself
    (no `module.` keys)."""
    applied = Applied(model)
    if not is_distributed():
        return applied
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(applied)  # in place below the root
    elif has_batchnorm:
        print("note: BatchNorm statistics are per process on the CPU (SyncBatchNorm needs CUDA); "
              "rank 0's running statistics are the ones kept")
    # SegFormer's depthwise convolutions have weights [C, 1, k, k]: their gradients' stride
    # along the size-1 axis differs from DDP's bucket view, the same layout in memory
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(applied, device_ids=[device.index] if device.type == "cuda"
                                   else None)
