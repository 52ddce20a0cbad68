"""Structure detected from weight values: the one place that decides what "sparse" and
"clustered" mean, shared by cluster() (sparsity to keep) and quantize() (PQAT/CQAT/PCQAT)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from collabopt.core.registry import channels_first_2d_np

#: share of exact zeros from which a weight counts as pruned
MIN_SPARSITY = 0.05
#: most shared values a weight may have and still count as clustered (an int8 codebook)
MAX_CLUSTERS = 256


@dataclass(frozen=True)
class Structure:
    sparsity: float
    unique: int
    unique_per_channel_max: int
    size: int
    channel_size: int

    @property
    def sparse(self) -> bool:
        return self.sparsity >= MIN_SPARSITY

    @property
    def clustered_per_tensor(self) -> bool:
        return self.unique <= MAX_CLUSTERS and self.unique * 4 <= self.size

    @property
    def clustered_per_channel(self) -> bool:
        return (not self.clustered_per_tensor
                and self.unique_per_channel_max <= MAX_CLUSTERS
                and self.unique_per_channel_max * 2 <= self.channel_size)


def unique_per_channel(w2d: np.ndarray) -> np.ndarray:
    """Distinct values in each row of a (channels, elements) array, vectorised."""
    s = np.sort(w2d, axis=1)
    return 1 + np.count_nonzero(np.diff(s, axis=1), axis=1)


def detect(w: np.ndarray, channel_axes: tuple[int, ...]) -> Structure:
    w2d = channels_first_2d_np(np.asarray(w), channel_axes)
    per_channel = unique_per_channel(w2d)
    return Structure(
        sparsity=float(np.mean(w == 0)),
        unique=int(np.unique(w).size),
        unique_per_channel_max=int(per_channel.max()),
        size=int(w.size),
        channel_size=int(w2d.shape[1]),
    )
