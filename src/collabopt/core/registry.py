"""Which weights of which layer are optimizable, and how their axes are laid out.

This is the single place that knows layer internals. Every technique asks it two questions:
which variables of a layer it may transform, and along which axes the output channels
(per-channel clustering and quantization) and the reduction (m:n sparsity) lie.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras


@dataclass(frozen=True)
class WeightSpec:
    """One optimizable weight of a layer.

    name: the variable's short name inside the layer (``kernel``, ``depthwise_kernel``...).
    channel_axes: axes that together index output channels (flattened in order). For a
        depthwise kernel ``(kh, kw, in, mult)`` these are ``(-2, -1)``: TFLite stores it as
        ``(1, kh, kw, in*mult)`` and quantizes along that last, flattened axis.
    reduction_axes: axes summed over by the layer (the m:n groups run along them).
    int8_per_channel: whether QAT gives the weight per-channel scales. The converter
        transposes FULLY_CONNECTED weights and rejects a per-channel fake-quant on them, so
        QAT quantizes Dense-like weights per tensor; post-training conversion would scale them
        per channel, and export keeps them per tensor where they hold a per-tensor codebook.
    """

    name: str
    channel_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    int8_per_channel: bool = True


_L = keras.layers

_DENSE = (WeightSpec("kernel", (-1,), (0,), int8_per_channel=False),)
_CONV = (WeightSpec("kernel", (-1,), (-2,)),)
_CONV_TRANSPOSE = (WeightSpec("kernel", (-2,), (-1,), int8_per_channel=False),)
_DEPTHWISE_1D = (WeightSpec("kernel", (-2, -1), (0,)),)
_DEPTHWISE_2D = (WeightSpec("kernel", (-2, -1), (0, 1)),)

_REGISTRY: dict[type, tuple[WeightSpec, ...]] = {
    _L.Dense: _DENSE,
    _L.EinsumDense: _DENSE,
    _L.Embedding: (WeightSpec("embeddings", (0,), (-1,), int8_per_channel=False),),
    _L.Conv1D: _CONV,
    _L.Conv2D: _CONV,
    _L.Conv3D: _CONV,
    _L.Conv1DTranspose: _CONV_TRANSPOSE,
    _L.Conv2DTranspose: _CONV_TRANSPOSE,
    _L.Conv3DTranspose: _CONV_TRANSPOSE,
    _L.DepthwiseConv1D: _DEPTHWISE_1D,
    _L.DepthwiseConv2D: _DEPTHWISE_2D,
    _L.SeparableConv1D: (
        WeightSpec("depthwise_kernel", (-2, -1), (0,)),
        WeightSpec("pointwise_kernel", (-1,), (-2,)),
    ),
    _L.SeparableConv2D: (
        WeightSpec("depthwise_kernel", (-2, -1), (0, 1)),
        WeightSpec("pointwise_kernel", (-1,), (-2,)),
    ),
}

# Depthwise/Separable subclass Conv in some Keras versions: match the most specific class first.
_ORDER = sorted(_REGISTRY, key=lambda cls: len(cls.__mro__), reverse=True)

# Layers that only move or select values: int8 scale passes through them unchanged, so QAT
# needs no activation range after them.
PASS_THROUGH = (
    _L.InputLayer,
    _L.Flatten,
    _L.Reshape,
    _L.Permute,
    _L.MaxPooling1D,
    _L.MaxPooling2D,
    _L.MaxPooling3D,
    _L.GlobalMaxPooling1D,
    _L.GlobalMaxPooling2D,
    _L.Dropout,
    _L.SpatialDropout1D,
    _L.SpatialDropout2D,
    _L.ZeroPadding1D,
    _L.ZeroPadding2D,
    _L.Cropping1D,
    _L.Cropping2D,
    _L.UpSampling2D,
)


def weight_specs(layer: keras.layers.Layer) -> tuple[WeightSpec, ...] | None:
    """The optimizable weights of ``layer``, or None if the registry does not know it."""
    for cls in _ORDER:
        if type(layer) is cls:
            return _REGISTRY[cls]
    for cls in _ORDER:
        if isinstance(layer, cls):
            return _REGISTRY[cls]
    return None


def find_variable(layer: keras.layers.Layer, name: str) -> keras.Variable:
    """The variable of ``layer`` whose short name is ``name``."""
    for v in layer.weights:
        if v.name == name or v.path.endswith("/" + name):
            return v
    raise KeyError(f"layer {layer.name!r} has no weight named {name!r}")


def variable_attribute(layer: keras.layers.Layer, variable: keras.Variable) -> str:
    """Name of the attribute of ``layer`` that holds ``variable`` (``_kernel`` for Dense).

    The wrapper swaps this attribute for the transformed tensor during ``call``; finding it by
    identity keeps us independent of each layer's private naming.
    """
    for attr, value in vars(layer).items():
        if value is variable:
            return attr
    raise KeyError(f"no attribute of {layer.name!r} holds {variable.path}")


def channels_first_2d(x, channel_axes: tuple[int, ...]):
    """View of a weight as ``(channels, elements per channel)`` (keras.ops, any backend)."""
    from keras import ops

    rank = len(x.shape)
    axes = [a % rank for a in channel_axes]
    rest = [a for a in range(rank) if a not in axes]
    moved = ops.transpose(x, axes + rest)
    n_channels = 1
    for a in axes:
        n_channels *= x.shape[a]
    return ops.reshape(moved, (n_channels, -1))


def from_channels_first_2d(x2d, shape, channel_axes: tuple[int, ...]):
    """Inverse of :func:`channels_first_2d`."""
    from keras import ops

    rank = len(shape)
    axes = [a % rank for a in channel_axes]
    rest = [a for a in range(rank) if a not in axes]
    perm = axes + rest
    moved = ops.reshape(x2d, [shape[a] for a in perm])
    inverse = [perm.index(i) for i in range(rank)]
    return ops.transpose(moved, inverse)


def channels_first_2d_np(x, channel_axes: tuple[int, ...]):
    """NumPy twin of :func:`channels_first_2d`, for initialisation and inspection."""
    import numpy as np

    rank = x.ndim
    axes = [a % rank for a in channel_axes]
    rest = [a for a in range(rank) if a not in axes]
    return np.transpose(x, axes + rest).reshape(int(np.prod([x.shape[a] for a in axes])), -1)
