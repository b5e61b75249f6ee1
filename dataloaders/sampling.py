"""Which slices an epoch visits, in which order, and with which randomness — for any number of
DataLoader workers and training processes (README, Configuration: Augmentation).

For (seed, epoch, stream) there is one global sequence of samples, positions 0, 1, 2, ...:
position p holds a dataset index (back-to-back random permutations of range(len(dataset))) and a
sample seed drawn from `np.random.SeedSequence([seed, epoch, stream], spawn_key=(p,))`, from which
the dataset draws all of that sample's augmentation. Global batch b holds positions
[b·G, (b+1)·G) with G = batch_size · world_size, and rank r takes [b·G + r·B, b·G + (r+1)·B). So
2 processes × batch 2 see exactly the samples, seeds and pixels of 1 process × batch 4, workers
change nothing, and an epoch depends on (seed, epoch, stream) alone (exact resume).
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


def sample_seed(seed, epoch, stream, position):
    """The 64-bit seed of global position `position` of the epoch's `stream`."""
    sequence = np.random.SeedSequence([seed, epoch, stream], spawn_key=(position,))
    return int(sequence.generate_state(1, np.uint64)[0])


def epoch_order(size, count, seed, epoch, stream):
    """`(count,)` dataset indices of global positions 0..count-1: back-to-back random
    permutations of range(size), each slice visited once per pass."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, stream]))
    passes = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(passes)])[:count]


class EpochSampler(Sampler):
    """This rank's `(dataset index, sample seed)` pairs of the epoch, batch after batch:
    `num_batches · batch_size` of them (see the module docstring for the layout)."""

    def __init__(self, size, *, seed, epoch, stream, num_batches, batch_size, rank=0, world_size=1):
        if size < 1 or batch_size < 1 or num_batches < 0:
            raise ValueError(f"need size >= 1, batch_size >= 1, num_batches >= 0, "
                             f"got {size}, {batch_size}, {num_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 = 0..{world_size - 1}")
        self.seed, self.epoch, self.stream = seed, epoch, stream
        global_batch = batch_size * world_size
        starts = np.arange(num_batches) * global_batch + rank * batch_size
        self.positions = (starts[:, None] + np.arange(batch_size)).reshape(-1)
        self.order = epoch_order(size, num_batches * global_batch, seed, epoch, stream)

    def __iter__(self):
        for position in self.positions.tolist():
            yield int(self.order[position]), sample_seed(self.seed, self.epoch, self.stream, position)

    def __len__(self):
        return len(self.positions)


def epoch_loader(dataset, *, seed, epoch, stream, num_batches, batch_size, num_workers,
                 rank=0, world_size=1, pin_memory=False):
    """A DataLoader of this rank's `num_batches` full batches of the epoch's `stream`.

    `dataset[(index, sample_seed)]` must draw all its randomness from the sample seed (as
    `LabeledSlices`, `UnlabeledSlices` and `ConcatSlices` do).
    """
    sampler = EpochSampler(len(dataset), seed=seed, epoch=epoch, stream=stream,
                           num_batches=num_batches, batch_size=batch_size, rank=rank,
                           world_size=world_size)
    # The loader's own generator: building it then leaves torch's global generator alone. The
    # worker seeds it hands out are not used by the datasets.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0), pin_memory=pin_memory,
                      persistent_workers=False)
