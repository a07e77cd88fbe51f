"""One way to turn a seed and a key into a random generator.

Keys are mixed by NumPy's `SeedSequence` (a hash designed for this), so (seed, 1) and (seed + 1, 0)
give unrelated streams, unlike `seed * C + k` arithmetic. The training keys: (seed, 0, epoch) the
data order, (seed, 1, step) the flips, (seed, 2, step) noise levels and noise, (seed, 3, step)
the network's dropout, (seed, 3, step, 1) the label dropout of conditional runs, (seed, 4) the
subjects held out (data/subjects.py) and (seed, 6, step) an upsampler's noise augmentation; sampling:
(seed, image index).
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit integer seed determined by (seed, *key) alone."""
    state = np.random.SeedSequence([int(seed), *map(int, key)]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)


def seeded_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU torch generator determined by (seed, *key) alone."""
    return torch.Generator().manual_seed(derive_seed(seed, *key))


def image_generators(seed: int, indices) -> list[torch.Generator]:
    """One generator per image index: image i of `seed` gets the same noise in any batch or process
    (as EDM's StackedRandomGenerator does)."""
    return [seeded_generator(seed, i) for i in indices]


def randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise; with a list of generators, row i is drawn from generator i."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)
