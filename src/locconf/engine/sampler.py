"""The deterministic data pipeline of :func:`locconf.engine.train.train`.

The data order and the augmentation of every sample are pure functions of
``(seed, epoch, position)``, never of the global RNG state:

- :class:`InfiniteBatchSampler` draws epoch ``e``'s permutation from a generator seeded with
  ``(seed, e)`` and hands out global batches of ``batch_size * world_size`` consecutive entries,
  rank ``r`` taking the ``r``-th slice of each (so the union over ranks of one step's batches is
  the batch a single process would draw with ``batch_size * world_size``);
- every entry carries a per-sample seed derived from ``(seed, epoch, index)`` (:func:`sample_seed`),
  and :class:`SeededDataset` seeds torch/NumPy/Python RNGs with it while the sample is loaded and
  transformed (the caller's RNG states are restored afterwards, see :func:`isolated_rng`).
  Transforms that draw from the global RNG (``generator=None``, the default of ``locconf.data``)
  are thereby reproducible in any worker, in any process and after a restart.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["sample_seed", "InfiniteBatchSampler", "SeededDataset", "isolated_rng", "seed_everything"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in ``epoch`` of a run seeded with ``seed``."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class InfiniteBatchSampler:
    """Endless per-rank batches of ``(index, sample_seed)`` keys, reshuffled every epoch.

    Epoch ``e`` is a permutation of ``range(num_samples)`` drawn from a generator seeded with
    ``(seed, e)`` (or the identity with ``shuffle=False``). It is cut into
    ``num_samples // (batch_size * world_size)`` global batches (the remainder is dropped); rank
    ``r`` yields the ``r``-th ``batch_size`` slice of each. Iteration starts at batch ``position``
    of ``epoch``, which is how a resumed run continues where its checkpoint left off.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epoch: int = 0,
        position: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"(batch_size={batch_size} x world_size={world_size})"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(
                f"need epoch >= 0 and 0 <= position < {self.batches_per_epoch}, got epoch={epoch}, position={position}"
            )
        self.epoch, self.position = epoch, position

    def permutation(self, epoch: int) -> Tensor:
        """The sample order of ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        while True:
            order = self.permutation(self.epoch).tolist()
            while self.position < self.batches_per_epoch:
                start = self.position * global_batch + self.rank * self.batch_size
                indices = order[start:start + self.batch_size]
                self.position += 1
                yield [(i, sample_seed(self.seed, self.epoch, i)) for i in indices]
            self.epoch, self.position = self.epoch + 1, 0


@contextlib.contextmanager
def isolated_rng(seed: int | None = None, cuda: bool = False) -> Iterator[None]:
    """Run a block with its own RNG states (seeded with ``seed`` when given), then restore the caller's."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if cuda and torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Index ``dataset`` with ``(index, sample_seed)`` keys; load each sample under its own seed.

    Torch's CPU RNG, NumPy's and Python's global RNGs are seeded with ``sample_seed`` while
    ``dataset[index]`` runs and restored afterwards, so random transforms depend only on the key.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with isolated_rng(seed):
            return self.dataset[index]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
