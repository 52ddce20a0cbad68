"""The transform protocol: one step of a weight's chain (prune mask, cluster, fake-quant).

A transform is a small Keras layer so that its state (masks, centroids, ranges) is tracked,
trained, saved and restored by Keras itself, with no side files. It is never called through
``__call__``: the wrapper calls :meth:`update` (training-time state changes) and
:meth:`apply` (the pure function of the weight) directly.
"""

from __future__ import annotations

import keras
import numpy as np


class Transform(keras.layers.Layer):
    """Base class: ``apply(w)`` maps a float weight to its optimised form."""

    #: True for transforms whose output must stay in the exported graph (weight fake-quant);
    #: False for those ``strip`` bakes into the weight (masks, centroids).
    kept_at_export = False

    def __init__(self, channel_axes=(-1,), reduction_axes=(0,), **kwargs):
        super().__init__(**kwargs)
        self.channel_axes = tuple(int(a) for a in channel_axes)
        self.reduction_axes = tuple(int(a) for a in reduction_axes)

    def build_for(self, shape: tuple[int, ...]) -> None:
        """Create the state variables for a weight of ``shape`` (values set later)."""
        self.weight_shape = tuple(int(s) for s in shape)
        self.built = True

    def initialize(self, weight: np.ndarray) -> None:
        """Set the state from the weight's current value (host side, once, at wrap time)."""

    def update(self, w, step) -> None:
        """Training-time state change before the forward pass (e.g. recompute a mask)."""

    def apply(self, w, training: bool = False):
        raise NotImplementedError

    def n_channels(self) -> int:
        rank = len(self.weight_shape)
        return int(np.prod([self.weight_shape[a % rank] for a in self.channel_axes]))

    def get_config(self):
        config = super().get_config()
        config.update(channel_axes=list(self.channel_axes),
                      reduction_axes=list(self.reduction_axes))
        return config
