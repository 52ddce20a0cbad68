"""Structure detected from weight values: the one place that decides what "sparse" and
"clustered" mean, shared by cluster() (sparsity to keep) and quantize() (PQAT/CQAT/PCQAT).

A weight counts as clustered when its non-zero values repeat (float weights that were never
clustered practically never hold the same value twice) and there are at most 256 of them.
Per channel, every channel must repeat values or be no larger than the codebook itself.
When both readings hold, values shared *between* channels mean a per-tensor codebook;
per-channel codebooks (trained float centroids) never share a value across channels.
"""

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
    clustered_per_tensor: bool
    clustered_per_channel: bool

    @property
    def sparse(self) -> bool:
        return self.sparsity >= MIN_SPARSITY

    @property
    def clustered(self) -> bool:
        return self.clustered_per_tensor or self.clustered_per_channel


def unique_per_channel(w2d: np.ndarray) -> np.ndarray:
    """Distinct values in each row of a (channels, elements) array, vectorised."""
    s = np.sort(w2d, axis=1)
    return 1 + np.count_nonzero(np.diff(s, axis=1), axis=1)


def distinct_nonzero(w2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: number of distinct non-zero values, number of non-zero values."""
    nonzero = np.count_nonzero(w2d, axis=1)
    has_zero = nonzero < w2d.shape[1]
    return unique_per_channel(w2d) - has_zero, nonzero


def detect(w: np.ndarray, channel_axes: tuple[int, ...]) -> Structure:
    w = np.asarray(w)
    w2d = channels_first_2d_np(w, channel_axes)
    d_c, n_c = distinct_nonzero(w2d)
    d_t, n_t = distinct_nonzero(w.reshape(1, -1))
    k_channel = int(d_c.max())
    per_channel = bool(k_channel <= MAX_CLUSTERS and np.any(d_c < n_c)
                       and np.all((d_c < n_c) | (n_c <= k_channel)))
    per_tensor = bool(d_t[0] <= MAX_CLUSTERS and d_t[0] < n_t[0])
    if per_channel and per_tensor:
        # Per-channel centroids are distinct floats, so no value is shared between channels;
        # a per-tensor codebook shares its values across channels.
        per_tensor = bool(d_t[0] < d_c.sum())
        per_channel = not per_tensor
    return Structure(
        sparsity=float(np.mean(w == 0)),
        unique=int(np.unique(w).size),
        unique_per_channel_max=int(unique_per_channel(w2d).max()),
        size=int(w.size),
        channel_size=int(w2d.shape[1]),
        clustered_per_tensor=per_tensor,
        clustered_per_channel=per_channel,
    )
