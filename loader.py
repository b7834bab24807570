"""The batches `fit` trains on, off the reading path: torch's DistributedSampler and DataLoader,
made resumable mid-epoch (a resumed run skips the samples it already saw, without loading
them) and reproducible with loader workers.

    Batches            endless micro-batches, epoch after epoch, with (epoch, position)
    ResumableSampler   DistributedSampler that starts at a position of this rank's share
    loader_workers     --num_workers=-1 resolved (workers feed a GPU; none on a CPU)
    to_device          a batch's tensors onto the device
"""

import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (the same order for a seed and epoch: a permutation padded to
    a multiple of the world size, every world_size-th index for this rank) that starts at
    `start_index` of this rank's share, so a resumed run continues the epoch where it stopped
    without loading the samples before that point. State = (epoch, start_index)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0):
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"ResumableSampler: start_index {start_index} is outside 0..{self.num_samples}")
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def loader_workers(num_workers: int, device, in_memory: bool = False) -> int:
    """--num_workers, with -1 resolved: on CUDA the processes on this machine share its cores,
    one each kept for the training process, at most 8 (decoding 336 px PNG/JPEG frames is what
    feeds a GPU; one process would starve it); on the CPU, 0 (workers would take the cores the
    model computes on). A dataset that keeps its data in memory (`dataset.in_memory`, e.g.
    cache_videos) is read in the main process: each worker would hold its own copy."""
    if num_workers >= 0:
        return num_workers
    if in_memory or torch.device(device).type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (os.cpu_count() or 2) // local - 1))


def _seed_worker(worker_id: int):
    # torch seeds python `random` and torch in each worker; numpy needs it too
    np.random.seed(torch.initial_seed() % 2**32)


class _WithEpoch(torch.utils.data.Dataset):
    """The dataset, read by (epoch, index): a worker that lives across epochs (persistent
    workers) holds its own copy of the dataset, so the epoch of its per-(seed, epoch, index)
    random draws comes with each index instead of from `set_epoch` in the main process."""

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


class _EpochIndices(torch.utils.data.Sampler):
    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return ((self.sampler.epoch, i) for i in self.sampler)


class Batches:
    """Endless micro-batches, epoch after epoch; `epoch` and `position` (this rank's samples
    consumed in the epoch) say where it stands after the last batch handed out. One
    DataLoader for the whole run: its workers (if any) persist across epochs."""

    def __init__(self, dataset, collate_fn, batch_size: int, num_workers: int, seed: int, dist,
                 drop_last: bool = False, epoch: int = 0, position: int = 0):
        self.dataset, self.collate_fn, self.drop_last = dataset, collate_fn, drop_last
        self.batch_size, self.num_workers, self.seed, self.dist = batch_size, num_workers, seed, dist
        self.sampler = ResumableSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed)
        self.epoch, self.position = epoch, position

    @property
    def batches_per_epoch(self) -> int:
        n = self.sampler.num_samples / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        # the loader's own generator, so that making it draws nothing from the global RNG
        # (a resumed run makes its loader at another moment than the uninterrupted one)
        seq = np.random.SeedSequence([self.seed, self.epoch, self.dist.rank]).generate_state(1)[0]
        loader = DataLoader(_WithEpoch(self.dataset), batch_size=self.batch_size, sampler=_EpochIndices(self.sampler),
                            collate_fn=self.collate_fn, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0, pin_memory=self.dist.device.type == "cuda",
                            drop_last=self.drop_last, generator=torch.Generator().manual_seed(int(seq)),
                            worker_init_fn=_seed_worker)
        while True:
            self.sampler.set_epoch(self.epoch, self.position)   # read by the loader's next pass
            for batch in loader:
                self.position = min(self.position + self.batch_size, self.sampler.num_samples)
                yield batch
            self.epoch, self.position = self.epoch + 1, 0


def to_device(batch, device):
    """Tensors inside dicts/lists/tuples moved to `device`; everything else as it is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
