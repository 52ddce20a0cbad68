"""Layers that TFLite lowers to several int8 ops, written out op by op.

A ``Rescaling`` becomes MUL then ADD, a ``Normalization`` SUB then MUL, a
``LayerNormalization`` MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, MUL, ADD. Each op's output is an
int8 tensor with its own scale, so QAT needs a range on every one of them: the wrapper runs
these functions in place of the layer's call, with ``q(i, tensor)`` fake-quantizing the
``i``-th inner tensor (the last op's output gets the wrapper's output range).

Written this way, a layer norm also needs no NEG op: Keras computes ``-mean * inv + beta``,
and the converter has no int8 NEG, so post-training export uses the same function with no
ranges (``export_form``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import ops


@dataclass(frozen=True)
class Lowering:
    inner_tensors: int
    call: Callable  # (layer, x, q) -> output


def _rescaling(layer, x, q):
    y = x * ops.cast(layer.scale, x.dtype)
    if isinstance(layer.offset, (int, float)) and layer.offset == 0:
        return y
    return q(0, y) + ops.cast(layer.offset, x.dtype)


def _normalization(layer, x, q):
    denominator = ops.maximum(ops.sqrt(layer.variance), keras.backend.epsilon())
    return q(0, x - layer.mean) * ops.cast(1.0 / denominator, x.dtype)


def _axes(layer) -> tuple[int, ...]:
    return (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)


def _layer_norm(layer, x, q):
    axis = _axes(layer)
    mean = q(0, ops.mean(x, axis=axis, keepdims=True))
    centred = q(1, x - mean)
    variance = q(3, ops.mean(q(2, centred * centred), axis=axis, keepdims=True))
    inv = q(5, ops.rsqrt(q(4, variance + layer.epsilon)))
    y = centred * inv
    if layer.gamma is not None:
        y = q(6, y) * _broadcast(layer, layer.gamma, x)
    if layer.beta is not None:
        y = q(7, y) + _broadcast(layer, layer.beta, x)
    return y


def _broadcast(layer, weight, x):
    shape = [1] * len(x.shape)
    for a in _axes(layer):
        shape[a] = x.shape[a]
    return ops.reshape(ops.cast(weight, x.dtype), shape)


def get(layer) -> Lowering | None:
    """The lowering of ``layer``, None when TFLite lowers it to one op (or ours is unknown)."""
    L = keras.layers
    if isinstance(layer, L.Rescaling):
        return Lowering(1, _rescaling)
    if isinstance(layer, L.Normalization) and not layer.invert:
        return Lowering(1, _normalization)
    if isinstance(layer, L.LayerNormalization) and not layer.rms_scaling:
        return Lowering(8, _layer_norm)
    return None


def _no_range(_, tensor):
    return tensor


@contextlib.contextmanager
def export_form(layers):
    """Run the layer norms among ``layers`` as their op-by-op form (no NEG) while exporting."""
    patched = [layer for layer in layers if isinstance(layer, keras.layers.LayerNormalization)
               and get(layer) is not None and "call" not in vars(layer)]
    for layer in patched:
        form = get(layer).call
        object.__setattr__(layer, "call",
                           lambda x, *a, _layer=layer, _form=form, **k: _form(_layer, x,
                                                                             _no_range))
    try:
        yield
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
