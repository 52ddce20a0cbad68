"""Which weights of which layer are optimizable, and how their axes are laid out.

This is the single place that knows layer internals. Every technique asks it two questions:
which variables of a layer it may transform, and along which axes the output channels
(per-channel clustering and quantization) and the reduction (m:n sparsity) lie.

A layer the table does not name is searched for sublayers it holds as attributes (an LSTM's
``cell``, a ``Bidirectional``'s two directions, MultiHeadAttention's four ``EinsumDense``
projections, the convs of a user's residual block), at any depth. Each weight is then named
by its attribute path from the layer the wrapper holds: ``kernel``, ``cell.recurrent_kernel``,
``forward_layer.cell.kernel``, ``_query_dense.kernel``. Users declare their own layer kinds
with :func:`register_layer`, once, for every technique.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
Specs = tuple[WeightSpec, ...]

_DENSE = (WeightSpec("kernel", (-1,), (0,), int8_per_channel=False),)
_CONV = (WeightSpec("kernel", (-1,), (-2,)),)
_CONV_TRANSPOSE = (WeightSpec("kernel", (-2,), (-1,), int8_per_channel=False),)
_DEPTHWISE_1D = (WeightSpec("kernel", (-2, -1), (0,)),)
_DEPTHWISE_2D = (WeightSpec("kernel", (-2, -1), (0, 1)),)

def _einsum_specs(layer) -> Specs:
    """EinsumDense from its equation: the kernel's letters that reach the output index output
    channels, the ones shared with the input only are summed over."""
    inputs, kernel_output = layer.equation.replace(" ", "").split(",")
    kernel, output = kernel_output.split("->")
    if "." in kernel:
        return (WeightSpec("kernel", (-1,), (0,), int8_per_channel=False),)
    rank = len(kernel)
    channels = tuple(i - rank for i, c in enumerate(kernel) if c in output)
    reduction = tuple(i for i, c in enumerate(kernel) if c in inputs and c not in output)
    if not channels or not reduction:  # an element-wise kernel: nothing to prune along
        return ()
    return (WeightSpec("kernel", channels, reduction, int8_per_channel=False),)


_RECURRENT = (WeightSpec("kernel", (-1,), (0,), int8_per_channel=False),
              WeightSpec("recurrent_kernel", (-1,), (0,), int8_per_channel=False))

_REGISTRY: dict[type, Specs | Callable[[keras.layers.Layer], Specs]] = {
    _L.Dense: _DENSE,
    _L.EinsumDense: _einsum_specs,
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
    # recurrent cells: the input and recurrent projections of every gate, side by side on
    # the last axis (4 units for LSTM, 3 for GRU, 1 for SimpleRNN); LSTM/GRU/SimpleRNN,
    # RNN(cell), StackedRNNCells and Bidirectional reach them through their sublayers
    _L.LSTMCell: _RECURRENT,
    _L.GRUCell: _RECURRENT,
    _L.SimpleRNNCell: _RECURRENT,
}

# Depthwise/Separable subclass Conv in some Keras versions: match the most specific class first.
_ORDER = sorted(_REGISTRY, key=lambda cls: len(cls.__mro__), reverse=True)


def register_layer(cls: type, *weights: WeightSpec):
    """Declare which weights of the layer class ``cls`` are optimizable, for pruning,
    clustering and quantization at once. Usable as a call or as a class decorator::

        @co.register_layer(co.WeightSpec("kernel", channel_axes=(-1,), reduction_axes=(0,)))
        class MyDense(keras.layers.Layer): ...

    ``name`` is the variable's short name (or an attribute path such as ``proj.kernel``);
    ``channel_axes`` index the output channels (per-channel clustering and int8 scales),
    ``reduction_axes`` the inputs summed per output (m:n sparsity groups).
    ``int8_per_channel=False`` for matmul-like weights, which TFLite scales per tensor.
    Subclasses inherit the declaration; registering again replaces it.
    """
    if isinstance(cls, WeightSpec):  # decorator form: register_layer(spec, ...)(cls)
        specs = (cls, *weights)
        return lambda klass: register_layer(klass, *specs)
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise TypeError(f"register_layer needs a keras.layers.Layer subclass, got {cls!r}")
    if not weights or not all(isinstance(w, WeightSpec) for w in weights):
        raise TypeError("register_layer(cls, *weights): give one co.WeightSpec per "
                        f"optimizable weight of {cls.__name__}, got {weights!r}")
    _REGISTRY[cls] = tuple(weights)
    _ORDER[:] = sorted(_REGISTRY, key=lambda c: len(c.__mro__), reverse=True)
    return cls


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


def _own_specs(layer) -> Specs | None:
    for cls in _ORDER:
        if type(layer) is cls:
            break
    else:
        cls = next((c for c in _ORDER if isinstance(layer, c)), None)
        if cls is None:
            return None
    specs = _REGISTRY[cls]
    return specs(layer) if callable(specs) else specs


def sublayers(layer: keras.layers.Layer):
    """``(attribute path, sublayer)`` for every layer ``layer`` holds as an attribute, or in a
    public list attribute, in definition order (Keras's own bookkeeping lists excluded)."""
    for attr, value in vars(layer).items():
        if isinstance(value, keras.layers.Layer):
            yield attr, value
        elif isinstance(value, (list, tuple)) and not attr.startswith("_"):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    yield f"{attr}.{i}", item


def weight_specs(layer: keras.layers.Layer) -> Specs | None:
    """The optimizable weights of ``layer`` (its own, or found in its sublayers, each named
    by its path), or None if neither the registry nor a sublayer knows any."""
    own = _own_specs(layer)
    if own is not None:
        return own
    found: list[WeightSpec] = []
    seen: set[int] = set()

    def walk(owner, prefix, depth):
        for attr, sub in sublayers(owner):
            if id(sub) in seen or isinstance(sub, keras.Model) or depth > 16:
                continue
            seen.add(id(sub))
            specs = _own_specs(sub)
            if specs is None:
                walk(sub, f"{prefix}{attr}.", depth + 1)
            else:
                found.extend(replace(s, name=f"{prefix}{attr}.{s.name}") for s in specs)

    walk(layer, "", 0)
    return tuple(found) if found else None


def locate(layer: keras.layers.Layer, path: str):
    """``(owner, attribute, variable)`` for the weight at ``path`` inside ``layer``: the
    wrapper swaps ``owner.attribute`` for the transformed tensor during ``call``."""
    *owners, name = path.split(".")
    owner = layer
    for step in owners:
        owner = owner[int(step)] if step.isdigit() else getattr(owner, step)
    for attr, value in vars(owner).items():
        if isinstance(value, keras.Variable) and value.name == name:
            return owner, attr, value
    for v in owner.weights:  # a variable kept elsewhere than a plain attribute
        if v.name == name or v.path.endswith("/" + name):
            return owner, variable_attribute(owner, v), v
    raise KeyError(f"layer {layer.name!r} has no weight named {path!r}")


def has_weight(layer: keras.layers.Layer, path: str) -> bool:
    try:
        locate(layer, path)
    except (KeyError, AttributeError, IndexError):
        return False
    return True


def find_variable(layer: keras.layers.Layer, name: str) -> keras.Variable:
    """The variable of ``layer`` at ``name`` (a short name or an attribute path)."""
    if "." in name:
        return locate(layer, name)[2]
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
