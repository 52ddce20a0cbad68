"""Where an activation function puts int8 tensors in a TFLite file.

The converter keeps a layer's activation as an op of its own unless it fuses it into the conv
or matmul (ReLU, ReLU6, none). Each op's output is an int8 tensor, so QAT needs a range on
the layer's linear output *and* on the activation's output; composite activations add the
tensors in between (``silu(x) = x * sigmoid(x)`` is LOGISTIC then MUL). The int8 kernels of
SOFTMAX, LOGISTIC and TANH only accept one fixed output grid; simulating exactly that grid
keeps the file and its Keras QAT model in step (a learned range there would cost a requantize
op and a coarser grid).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

#: activations the converter fuses into the producing conv / matmul: no tensor of their own
FUSED = ("linear", "relu", "relu6")

#: output grids the int8 kernels require: [min, max] with 256 steps (scale 1/256 or 1/128)
FIXED_RANGES = {
    "softmax": (0.0, 255.0 / 256.0),
    "sigmoid": (0.0, 255.0 / 256.0),
    "hard_sigmoid": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0),
}


def name_of(activation) -> str | None:
    """The name of a built-in Keras activation function, None for a user's own."""
    if activation is None:
        return "linear"
    name = getattr(activation, "__name__", None)
    try:
        builtin = name is not None and keras.activations.get(name) is activation
    except ValueError:
        builtin = False
    return name if builtin else None


def unfused(layer) -> bool:
    """Whether ``layer`` applies an activation the converter leaves as an op of its own."""
    # an attribute the layer applies to its output; an RNN's ``activation`` is a property
    # of its cell, applied inside the recurrence
    function = vars(layer).get("activation")
    return callable(function) and name_of(function) not in FUSED


def fixed_fake_quant(x, name: str):
    lo, hi = FIXED_RANGES[name]
    return keras.quantizers.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)


def _silu(x):
    return x * fixed_fake_quant(ops.sigmoid(x), "sigmoid")


#: activations whose TFLite lowering holds an int8 tensor inside them, written with it
_COMPOSITE: dict[str, Callable] = {"silu": _silu}


def quantized(name: str | None, function: Callable) -> Callable:
    """``function`` with the inner tensors of its TFLite lowering fake-quantized."""
    return _COMPOSITE.get(name, function)
